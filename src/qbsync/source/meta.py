"""What the source knows about one torrent's layout: geometry, files, selection, location.

Built from qBittorrent's ``torrents/files`` (names as qBittorrent actually uses them on disk,
and priorities) and ``torrents/export`` (the .torrent, whose info dictionary is the
authoritative byte layout, padding files included, and carries the SHA-1 piece hashes). The
location part (where the files are right now) is refreshed without rebuilding everything when
qBittorrent moves a torrent (temp -> save path, category change).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from ..torrent import Geometry, MetainfoError, bdecode, parse_metainfo
from ..wire.messages import FileEntry, InitTorrent
from .paths import PathMapper, clean, content_parent, is_within

INCOMPLETE_EXT = ".!qB"


class MetaError(Exception):
    """qBittorrent's view of a torrent cannot be used (no v1 hashes, inconsistent files...)."""


@attrs.frozen
class FileSlot:
    """One file of the geometry. ``name`` is None for a BEP 47 padding file (all zeros)."""

    name: str | None
    size: int
    selected: bool
    qb_index: int = -1


@attrs.define
class SourceMeta:
    """What the source knows about one torrent it syncs: files, piece geometry, the raw
    ``.torrent`` (named apart from the destination's persisted ``TorrentMeta``)."""

    info_hash: str
    name: str
    geometry: Geometry
    slots: tuple[FileSlot, ...]
    torrent_file: bytes = attrs.field(repr=False)
    fingerprint: str
    selected_size: int
    mask: frozenset[int]  # pieces that touch no selected file: never sent
    # Location, refreshed when qBittorrent moves the files:
    qb_parent: str = ""
    local_dir: Path = Path()
    save_sub_path: str = ""

    @property
    def num_pieces(self) -> int:
        return self.geometry.num_pieces

    @property
    def partial(self) -> bool:
        return any(not s.selected for s in self.slots if s.name is not None)

    def locate(self, mapper: PathMapper, info: dict[str, Any]) -> bool:
        """Recompute where the files are from a torrent's ``content_path``/``save_path``.

        Two answers: where to *read* now (the actual location, from ``content_path``), and
        where the files belong on the destination (``save_sub_path``). They differ while
        qBittorrent downloads into its temp path: the files will move to ``save_path`` on
        completion, so the destination is told the final place from the start. (The Go
        reference sent the temp directory and relied on a relocation at finalize, which
        misplaced the files whenever finalize came before qBittorrent's move.)

        Returns True when the local read directory changed.
        """
        names = [s.name for s in self.slots if s.name is not None]
        save_path = str(info.get("save_path") or "")
        parent = content_parent(str(info.get("content_path") or ""), save_path, names)
        local = mapper.to_local(parent)
        changed = local != self.local_dir
        self.qb_parent = parent
        self.local_dir = local
        self.save_sub_path = mapper.save_sub_path(final_parent(mapper, info, parent))
        return changed

    def file_entries(self) -> tuple[FileEntry, ...]:
        """Files as qBittorrent lists them (padding files left out), with (device, inode)
        of the local file so the destination can detect hardlinked duplicates."""
        out = []
        for s in self.slots:
            if s.name is None:
                continue
            dev, ino = _stat_ids(self.local_dir / s.name)
            out.append(
                FileEntry(path=s.name, size=s.size, selected=s.selected, device=dev, inode=ino)
            )
        return tuple(out)

    def init_request(self, *, resync: bool = False) -> InitTorrent:
        """A full InitTorrent (blocking: it stats files; call it in a thread)."""
        return InitTorrent(
            info_hash=self.info_hash,
            name=self.name,
            torrent_file=self.torrent_file,
            files=self.file_entries(),
            piece_length=self.geometry.piece_length,
            total_size=self.geometry.total_size,
            num_pieces=self.geometry.num_pieces,
            save_sub_path=self.save_sub_path,
            resync=resync,
        )


def final_parent(mapper: PathMapper, info: dict[str, Any], parent: str) -> str:
    """Where the content's parent will be once qBittorrent is done with the temp path."""
    temp_dirs = [clean(str(info.get("download_path") or "")), mapper.qb_temp]
    save_path = clean(str(info.get("save_path") or ""))
    in_temp = any(d and is_within(parent, d) for d in temp_dirs)
    save_in_temp = bool(mapper.qb_temp) and is_within(save_path, mapper.qb_temp)
    if in_temp and save_path and not save_in_temp:
        return save_path
    return parent


def _stat_ids(path: Path) -> tuple[int, int]:
    for candidate in (path, path.with_name(path.name + INCOMPLETE_EXT)):
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        return st.st_dev & 0xFFFFFFFFFFFFFFFF, st.st_ino
    return 0, 0


def _pad_flags(raw: bytes) -> list[bool]:
    """Which entries of a multi-file info dict are BEP 47 padding files."""
    top = bdecode(raw)
    info = top.get(b"info", {}) if isinstance(top, dict) else {}
    files = info.get(b"files") if isinstance(info, dict) else None
    if not isinstance(files, list):
        return []
    flags = []
    for f in files:
        attr = f.get(b"attr", b"") if isinstance(f, dict) else b""
        flags.append(isinstance(attr, bytes) and b"p" in attr)
    return flags


def build_meta(
    info_hash: str,
    info: dict[str, Any],
    qb_files: Sequence[dict[str, Any]],
    torrent_file: bytes,
    mapper: PathMapper,
) -> SourceMeta:
    """Combine qBittorrent's file list with the exported .torrent (pure, no I/O)."""
    try:
        mi = parse_metainfo(torrent_file)
    except MetainfoError as exc:
        raise MetaError(f"exported .torrent is unusable: {exc}") from None
    if not mi.matches(info_hash):
        raise MetaError(f"exported .torrent has info-hash {mi.info_hash}, not {info_hash}")
    if not mi.has_v1:
        raise MetaError("v2-only torrent: no SHA-1 piece hashes to verify pieces with")
    geometry = mi.geometry
    pads = _pad_flags(torrent_file) or [False] * len(geometry.files)
    if len(pads) != len(geometry.files):
        pads = [False] * len(geometry.files)
    files = sorted(qb_files, key=lambda f: int(f["index"]))
    real = [i for i, pad in enumerate(pads) if not pad]
    if len(real) != len(files):
        raise MetaError(
            f"qBittorrent lists {len(files)} files, the .torrent has {len(real)} (non-padding)"
        )
    slots: list[FileSlot] = []
    qb_iter = iter(files)
    for tf, pad in zip(geometry.files, pads, strict=True):
        if pad:
            slots.append(FileSlot(None, tf.size, False))
            continue
        f = next(qb_iter)
        size = int(f.get("size", tf.size))
        if size != tf.size:
            raise MetaError(f"file {f.get('name')!r}: qBittorrent size {size} != {tf.size}")
        selected = int(f.get("priority", 1)) > 0
        slots.append(FileSlot(str(f["name"]), tf.size, selected, int(f["index"])))
    covered: set[int] = set()
    for i, s in enumerate(slots):
        if s.selected and s.size:
            covered.update(geometry.file_pieces(i))
    mask = frozenset(set(range(geometry.num_pieces)) - covered)
    fp = ",".join(str(s.qb_index) for s in sorted(slots, key=lambda s: s.qb_index) if s.selected)
    meta = SourceMeta(
        info_hash=info_hash,
        name=str(info.get("name") or mi.name),
        geometry=geometry,
        slots=tuple(slots),
        torrent_file=torrent_file,
        fingerprint=fp,
        selected_size=sum(s.size for s in slots if s.selected),
        mask=mask,
    )
    meta.locate(mapper, info)
    return meta
