"""Name claims between torrents: which torrent may write which name under ``--data``.

This is about torrents among themselves (one torrent's pieces never land in another's files);
which *files* qbsync may touch at all is :mod:`.ownership`'s business.

* A *tracked* torrent claims the final and ``.partial`` names of its selected files until it
  is finalized or aborted.
* A *finalized* torrent owns the same names for as long as its ``.finalized`` marker exists
  (qBittorrent seeds from those files) *and its file is still on disk*. The marker lists the
  names, so this is rebuilt at startup — markers are read before any unfinished torrent is
  loaded. It ends when the marker goes (a resync of that same torrent, or an operator
  deleting ``<data>/.qbsync/<hash>``; noticed at the next conflict, no restart needed), and
  name by name when the file goes: a name whose file is gone protects nothing, and a user who
  removed a finalized torrent and its files must not find its names blocked forever. The
  :class:`~.store.Store` checks that on a collision (``event=finalized_name_released``).

A torrent laid out at a name another torrent owns is refused with ``unsafe-path`` naming the
owner, before anything is created: otherwise its init would scan the owner's files, find its
own pieces missing and try to rewrite them. Deleting data skips every name another torrent
owns. Cross-seeding the *same* content under another info-hash at the same names is refused
too; sync it to another sub path. Markers from before names were recorded own nothing.

Everything here runs on the event loop (no locks): pure bookkeeping, no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from .. import paths
from ..wire.errors import ErrorCode, WireError

log = logging.getLogger("qbsync.destination.names")


def names_of(files: Iterable[paths.Parts]) -> list[paths.Parts]:
    """The names a file set occupies: each final name and its ``.partial`` twin."""
    return [name for parts in files for name in (parts, paths.partial_parts(parts))]


class NameClaims:
    def __init__(self) -> None:
        # Which tracked torrent writes which name (final and .partial).
        self._owner: dict[paths.Parts, str] = {}
        self._owned: dict[str, list[paths.Parts]] = {}
        # Which finalized torrents' files (from their .finalized markers) are at which name:
        # never scanned, renamed, written or deleted on another torrent's behalf. A set, since
        # markers written by older versions may overlap.
        self._final_owners: dict[paths.Parts, set[str]] = {}
        self._final_owned: dict[str, list[paths.Parts]] = {}  # finalized hash -> its files

    def check(
        self, info_hash: str, files: Sequence[paths.Parts], has_marker: Callable[[str], bool]
    ) -> None:
        """Raise ``unsafe-path`` naming the tracked or finalized torrent that owns one of the
        names of ``files``. Changes nothing but forgetting owners whose marker is gone."""
        for name in names_of(files):
            owner = self._owner.get(name)
            if owner is not None and owner != info_hash:
                raise WireError(
                    ErrorCode.UNSAFE_PATH,
                    f"file {'/'.join(name)!r} is already being synced by torrent {owner}",
                )
            for final_owner in sorted(self._final_owners.get(name, ())):
                if final_owner == info_hash:
                    continue
                if not has_marker(final_owner):
                    # The operator removed the marker: those files are no longer ours to guard.
                    log.info(
                        "event=finalized_owner_released hash=%s reason=marker_gone", final_owner
                    )
                    self.release_finalized(final_owner)
                    continue
                raise WireError(
                    ErrorCode.UNSAFE_PATH,
                    f"file {'/'.join(name)!r} belongs to finalized torrent {final_owner} "
                    "(qBittorrent seeds from it; it is never replaced): use another sub path",
                )

    def claim(self, info_hash: str, files: Sequence[paths.Parts]) -> None:
        """Record the names of a tracked torrent (after :meth:`check`)."""
        self.release(info_hash)
        names = names_of(files)
        for name in names:
            self._owner[name] = info_hash
        self._owned[info_hash] = names

    def release(self, info_hash: str) -> None:
        for name in self._owned.pop(info_hash, ()):
            if self._owner.get(name) == info_hash:
                del self._owner[name]

    def finalized_owners(self, files: Sequence[paths.Parts], info_hash: str) -> list[str]:
        """Finalized torrents other than ``info_hash`` owning one of the names of ``files``."""
        names = names_of(files)
        return sorted({o for n in names for o in self._final_owners.get(n, ()) if o != info_hash})

    def finalized_files(self, info_hash: str) -> list[paths.Parts]:
        return list(self._final_owned.get(info_hash, ()))

    def own_finalized(self, info_hash: str, files: Sequence[paths.Parts]) -> None:
        """Record that finalized torrent ``info_hash`` has its files at ``files`` (their
        ``.partial`` twins are owned too: writing one would be renamed over the file)."""
        self.release_finalized(info_hash)
        for name in names_of(files):
            self._final_owners.setdefault(name, set()).add(info_hash)
        self._final_owned[info_hash] = list(files)

    def release_finalized(self, info_hash: str) -> None:
        """Forget the names of finalized torrent ``info_hash`` (its marker is gone)."""
        for name in names_of(self._final_owned.pop(info_hash, ())):
            owners = self._final_owners.get(name)
            if owners is not None:
                owners.discard(info_hash)
                if not owners:
                    del self._final_owners[name]

    def foreign_owner(self, name: paths.Parts, info_hash: str) -> str | None:
        """Another torrent (tracked or finalized) that owns ``name``, if any."""
        owner = self._owner.get(name)
        if owner is not None and owner != info_hash:
            return owner
        others = self._final_owners.get(name, set()) - {info_hash}
        return min(others) if others else None
