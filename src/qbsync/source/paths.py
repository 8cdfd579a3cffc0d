"""Where a torrent's files are on *this* machine, and where they go on the destination.

qBittorrent reports paths as *it* sees them (often inside a container); ``--data`` is where this
process sees qBittorrent's default save path. Everything here is pure string/path arithmetic
(no I/O), so the many layouts qBittorrent produces can be unit-tested exhaustively:

* single-file torrents, multi-file torrents with a root folder, and "No subfolder" multi-file
  torrents (whose ``content_path`` is the save directory itself);
* category sub-directories and nested categories (``media/movies``);
* the temp download path (``temp_path_enabled``) inside or beside the default save path;
* ``save_path`` drifting away from the real location after "Set Location" or Auto-TMM moves,
  which is why the authoritative location is derived from ``content_path`` (see
  docs/design-decisions.md#content-path-is-authoritative).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from pathlib import Path

import attrs


def clean(path: str) -> str:
    """Normalize a qBittorrent path for comparisons: no trailing slash, no ``.``/``..``."""
    if not path:
        return ""
    path = path.replace("\\", "/")
    return posixpath.normpath(path)


def is_within(path: str, root: str) -> bool:
    """True when cleaned ``path`` equals ``root`` or lies below it (component-wise)."""
    if not path or not root:
        return False
    if root == "/":
        return path.startswith("/")
    return path == root or path.startswith(root + "/")


def relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` (both cleaned, ``path`` within ``root``); "" when equal."""
    return "" if path == root else path[len(root) :].lstrip("/")


def content_parent(content_path: str, save_path: str, file_names: Sequence[str]) -> str:
    """The directory that qBittorrent's file names are relative to (the rule is in
    docs/design-decisions.md#content-path-is-authoritative).

    ``file_names`` are the names ``torrents/files`` reports (they include the root folder of a
    multi-file torrent, if it has one). Falls back to the cleaned ``save_path`` when the
    ``content_path`` is unusable (empty or relative) or the torrent has no files.
    """
    cp = clean(content_path)
    if not cp or not cp.startswith("/") or not file_names:
        return clean(save_path)
    names = [clean(n).lstrip("/") for n in file_names]
    if len(names) == 1:
        name = names[0]
        if cp.endswith("/" + name):
            return cp[: -len(name) - 1] or "/"
        return posixpath.dirname(cp) or "/"
    roots = {n.split("/", 1)[0] for n in names}
    has_root = all("/" in n for n in names) and len(roots) == 1
    if not has_root:
        # "No subfolder" layout: content_path is the directory holding the files.
        return cp
    root = roots.pop()
    if cp.endswith("/" + root):
        return cp[: -len(root) - 1] or "/"
    if cp.endswith("/" + names[0]):
        return cp[: -len(names[0]) - 1] or "/"
    return posixpath.dirname(cp) or "/"


@attrs.frozen
class PathMapper:
    """Maps qBittorrent directories to local directories under ``--data``.

    ``qb_default`` is qBittorrent's default save path (it maps to ``data``). When the temp
    download path is enabled, ``qb_temp`` maps to ``data`` joined with its path relative to
    ``qb_default`` (``incomplete`` for ``<save>/incomplete``, ``../temp`` for a sibling).
    Anything else falls back to ``data`` itself, like the Go reference (a category saved
    outside the default save path cannot be read unless it is mounted there).
    """

    data: Path
    qb_default: str
    qb_temp: str = ""

    @classmethod
    def from_preferences(cls, data: Path, prefs: dict[str, object]) -> PathMapper:
        default = clean(str(prefs.get("save_path") or ""))
        temp = ""
        if prefs.get("temp_path_enabled") and prefs.get("temp_path"):
            temp = clean(str(prefs["temp_path"]))
        return cls(data=data, qb_default=default, qb_temp=temp)

    @property
    def local_temp(self) -> Path | None:
        if not self.qb_temp or not self.qb_default:
            return None
        rel = posixpath.relpath(self.qb_temp, self.qb_default)
        return Path(posixpath.normpath(str(self.data / rel)))

    def to_local(self, qb_dir: str) -> Path:
        d = clean(qb_dir)
        # The temp dir is usually *inside* the default save path; a directory inside it maps
        # the same either way, so checking the default first is correct.
        if is_within(d, self.qb_default):
            rel = relative(d, self.qb_default)
            return self.data / rel if rel else self.data
        temp = self.local_temp
        if temp is not None and is_within(d, self.qb_temp):
            rel = relative(d, self.qb_temp)
            return temp / rel if rel else temp
        return self.data

    def save_sub_path(self, parent: str) -> str:
        """``parent`` relative to the default save path; "" when equal or outside it."""
        p = clean(parent)
        if not is_within(p, self.qb_default):
            return ""
        return relative(p, self.qb_default)
