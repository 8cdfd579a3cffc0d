"""Files on disk of one torrent: what is there (probes), what is created, what is demoted.

Every function here is blocking (run it in a worker thread) and follows the ownership rule of
:mod:`.ownership`: a file is created with ``O_EXCL`` and recorded before a byte is written,
and only recorded files are ever truncated, renamed or removed. A name holding anything else
is a :class:`~.ownership.ConflictError` (wire code ``conflict``), raised before anything is
created.

What happens to files found on disk
    A file is *verified, never trusted*: a final-named file of the right size (left by an
    earlier sync, a previous selection, a hardlink we just made, or the user's own copy)
    starts as ``EXISTING`` and its pieces are SHA-1-checked by a background scan before they
    count. One qbsync created whose pieces do not all verify is put back to ``.partial`` (or,
    when it has other hard links, its name is removed) and the missing pieces are streamed;
    a foreign one must verify completely or the torrent is refused. After a fresh init or a
    resync the ``.partial`` files are scanned the same way, so a selection change never
    re-sends data that is already here. On a plain restart the persisted bitmap is trusted
    for ``.partial`` files (that is what the flush invariant guarantees), except that bits of
    files that are gone or shorter than their size are cleared.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import attrs

from .. import metrics, paths
from ..log import paths_kv
from . import statetree
from .durable import atomic_write
from .hardlinks import HardlinkRegistry
from .ownership import OWNED_NAME, ConflictError, Ledger
from .state import (
    META_NAME,
    PIECES_NAME,
    TORRENT_NAME,
    DataFile,
    FileStatus,
    TorrentState,
    dump_json,
    read_optional,
)

log = logging.getLogger("qbsync.destination.files")


@attrs.frozen
class FileProbe:
    final: os.stat_result | None
    partial: os.stat_result | None

    @property
    def final_size(self) -> int | None:
        st = self.final
        return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None

    @property
    def partial_size(self) -> int | None:
        st = self.partial
        return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None


def _probe(root: Path, f: DataFile) -> FileProbe:
    final = paths.lstat(root, f.parts)
    partial = paths.lstat(root, paths.partial_parts(f.parts))
    for st in (final, partial):
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise paths.UnsafePathError(f"symlink at {f.path!r}")
    return FileProbe(final, partial)


def _check_conflict(root: Path, ledger: Ledger, f: DataFile, probe: FileProbe) -> None:
    """Raise :class:`ConflictError` when a name ``f`` needs holds something qbsync did not
    create and cannot adopt: anything but a regular file of exactly the torrent's size at the
    final name (that one is verified read-only, see :meth:`Store._settle_existing`), or any
    ``.partial`` it did not create (it would be written into)."""
    final_ours = ledger.owns_file(probe.final, str(paths.join(root, f.parts)))
    if probe.final is not None and not final_ours:
        if not stat.S_ISREG(probe.final.st_mode):
            raise ConflictError(f.parts, "exists and is not a regular file")
        if probe.final.st_size != f.size:
            raise ConflictError(
                f.parts,
                f"exists with {probe.final.st_size} bytes (the torrent's file has {f.size}) "
                "and was not created by qbsync",
            )
        return  # verified read-only; a .partial next to it is never used
    partial = paths.partial_parts(f.parts)
    if probe.partial is not None and not ledger.owns_file(
        probe.partial, str(paths.join(root, partial))
    ):
        raise ConflictError(paths.partial_parts(f.parts), "exists and was not created by qbsync")


def open_for_write(root: Path, state: TorrentState, f: DataFile) -> int:
    """Open ``<path>.partial`` for writing — only the one this torrent created (its device
    and inode are in the ledger; anything else at that name is refused, never written). A
    ``.partial`` that vanished is created again (and recorded); a longer stale one of ours is
    cut to size."""
    parts = paths.partial_parts(f.parts)
    try:
        fd = paths.open_file(root, parts, os.O_RDWR)
    except FileNotFoundError:
        state.ledger.create(root, parts, f.size)  # O_EXCL: never someone else's file
        state.ledger.save(state.meta_dir)  # recorded before a byte is written into it
        fd = paths.open_file(root, parts, os.O_RDWR)
    try:
        st = os.fstat(fd)
        if not state.ledger.owns_file(st, fd):
            raise paths.UnsafePathError(f"{'/'.join(parts)!r} was not created by qbsync")
        if st.st_size != f.size:
            os.ftruncate(fd, f.size)  # ours (checked above)
    except BaseException:
        os.close(fd)
        raise
    return fd


def prepare(root: Path, registry: HardlinkRegistry, state: TorrentState, fresh: bool) -> set[int]:
    """Blocking part of :meth:`.Store.create`: state directory, file probes, files created.
    Returns the files whose bytes on disk must be scanned.

    Every name is probed and checked against the ownership rule *before* anything is
    created, so a refused torrent (``conflict``) leaves nothing behind. A ``.partial`` is
    created on first write (:func:`open_for_write`: ``O_EXCL``, recorded in the ledger
    before any byte is written), so every file the writer writes is one this torrent
    made."""
    to_scan: set[int] = set()
    selected = [f for f in state.files if f.selected]
    paths.precheck_no_symlinks(root, [f.parts for f in selected])
    mdir = state.meta_dir
    ledger = Ledger.load(mdir)
    if not fresh and not statetree.exists(mdir, OWNED_NAME):
        # State written by a version without a ledger: its .partial files were created by
        # that version for this state directory. Final names are never taken over this way.
        for f in selected:
            st = paths.lstat(root, paths.partial_parts(f.parts))
            if st is not None and stat.S_ISREG(st.st_mode):
                ledger.files.add((st.st_dev, st.st_ino))
    state.ledger = ledger
    probes = {f.index: _probe(root, f) for f in selected}
    for f in selected:
        _check_conflict(root, ledger, f, probes[f.index])
    if fresh:
        clear_state_dir(mdir, keep=OWNED_NAME)
        atomic_write(mdir, TORRENT_NAME, state.metainfo.raw)
        atomic_write(mdir, META_NAME, dump_json(state.meta))
    else:
        raw = read_optional(mdir / PIECES_NAME)
        if raw is not None:
            state.load_pieces(raw)
        statetree.drop_tmp(mdir)
    try:
        to_scan = _lay_out(root, registry, state, selected, probes, fresh)
    finally:
        ledger.save(mdir)
    return to_scan


def _lay_out(
    root: Path,
    registry: HardlinkRegistry,
    state: TorrentState,
    selected: list[DataFile],
    probes: dict[int, FileProbe],
    fresh: bool,
) -> set[int]:
    to_scan: set[int] = set()
    ledger = state.ledger
    geometry = state.geometry
    cleared = 0
    for f in selected:
        probe = probes[f.index]
        final_ours = ledger.owns_file(probe.final, str(paths.join(root, f.parts)))
        if f.size == 0:
            # A selected empty file exists from the start and is never streamed. One
            # already there (ours, or anyone's: an empty file is an empty file) is kept.
            if probe.final is not None and probe.final_size != 0:
                ledger.unlink(root, f.parts)  # ours (_check_conflict refused others)
                probe = FileProbe(None, probe.partial)
            if probe.final is None:
                ledger.create(root, f.parts, 0)
            elif not final_ours:
                ledger.adopted.add(f.parts)
            f.become(FileStatus.COMPLETE)
            continue
        pieces = geometry.file_pieces(f.index)
        if probe.final_size == f.size:
            f.foreign = not final_ours
            st = probe.final
            f.handed = f.foreign and st is not None and (st.st_dev, st.st_ino) in ledger.handed
            all_set = all(state.written[i] for i in pieces)
            if all_set and not fresh:
                f.become(FileStatus.COMPLETE)
            else:
                f.become(FileStatus.EXISTING)
                to_scan.add(f.index)
            continue
        if probe.final is not None:
            # Ours (others were refused), of the wrong size: the source has the data.
            ledger.unlink(root, f.parts)
        if probe.partial_size is not None:
            f.become(FileStatus.STREAMING)
            if fresh and probe.partial_size == f.size:
                to_scan.add(f.index)
            elif probe.partial_size != f.size and not fresh:
                cleared += state.clear_pieces(pieces)
            continue
        f.become(FileStatus.STREAMING)
        if not fresh:
            cleared += state.clear_pieces(pieces)
        elif _try_link(root, registry, state, f):
            f.become(FileStatus.EXISTING)
            f.linked = True
            to_scan.add(f.index)
            continue
        # Created now, all at once (one ledger save for the torrent, not one per file), empty
        # and sparse: it holds nothing a scan could prove.
        ledger.create(root, paths.partial_parts(f.parts), f.size)
        f.created_empty = True
    if cleared:
        metrics.stale_bitmap_pieces_cleared.inc(cleared)
        log.warning(
            "event=stale_pieces_cleared hash=%s pieces=%d reason=data_file_missing_or_short",
            state.info_hash,
            cleared,
        )
    return to_scan


def _try_link(root: Path, registry: HardlinkRegistry, state: TorrentState, f: DataFile) -> bool:
    """Hardlink ``f`` to an already verified file with the same source (device, inode)."""
    if not (f.device or f.inode):
        return False
    source = registry.lookup(f.device, f.inode, f.size, root)
    if source is None or source == f.parts:
        return False
    created: list[paths.Parts] = []
    try:
        with (
            paths.open_parent(root, source, create=False) as sfd,
            paths.open_parent(root, f.parts, create=True, created=created) as dfd,
        ):
            if os.fstat(sfd).st_dev != os.fstat(dfd).st_dev:
                return False
            os.link(source[-1], f.parts[-1], src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            # The name is ours (we made it); the inode is shared, so it is never written
            # into (see _demote) — only this name is ever removed.
            st = os.stat(f.parts[-1], dir_fd=dfd, follow_symlinks=False)
            state.ledger.files.add((st.st_dev, st.st_ino))
            os.fsync(dfd)
    except (OSError, paths.UnsafePathError) as exc:
        state.ledger.record_dirs(created)
        metrics.hardlink_errors.labels("destination").inc()
        log.info(
            "event=hardlink_failed hash=%s file=%s source=%s error=%s",
            state.info_hash,
            paths_kv(f.parts),
            paths_kv(source),
            paths_kv(str(exc)),
        )
        return False
    state.ledger.record_dirs(created)
    metrics.hardlinks_created.inc()
    log.info(
        "event=hardlinked hash=%s file=%s source=%s",
        state.info_hash,
        paths_kv(f.parts),
        paths_kv(source),
    )
    return True


def demote_file(root: Path, state: TorrentState, f: DataFile) -> None:
    """Put a complete (or found) file of this torrent back to ``.partial`` so its missing or
    bad pieces are streamed again (blocking).

    Proof required for each step: the file is one this torrent created (ledger), else
    :class:`ConflictError` and nothing changes. A file with other hard links is never written
    into (that would change the other names): our name is removed — the inode lives on under
    the other names — and a fresh ``.partial`` is created. Otherwise it is renamed back,
    never over an existing name."""
    ledger = state.ledger
    st = paths.lstat(root, f.parts)
    partial = paths.partial_parts(f.parts)
    if st is None:
        state.clear_pieces(state.geometry.file_pieces(f.index))
    elif f.foreign or not ledger.owns_file(st, str(paths.join(root, f.parts))):
        raise ConflictError(f.parts, "was not created by qbsync: it is left untouched")
    elif f.linked or st.st_nlink > 1:
        ledger.unlink(root, f.parts)
        state.clear_pieces(state.geometry.file_pieces(f.index))
        f.linked = True
    else:
        ledger.unlink(root, partial)  # a stale .partial of ours, if any
        ledger.rename(root, f.parts, partial)
    ledger.save(state.meta_dir)
    f.become(FileStatus.STREAMING)
    f.linked = False


def clear_state_dir(mdir: Path, *, keep: str) -> None:
    """Empty a state directory except ``keep`` (the ownership ledger: the data files it
    names stay on disk, so who created them must not be forgotten)."""
    statetree.clear(mdir, keep=(keep,))
