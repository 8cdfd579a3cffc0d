"""The torrent store: creating, resuming, scanning, flushing and deleting per-torrent state.

One :class:`Store` owns every tracked :class:`~.state.TorrentState`. All bookkeeping happens on
the Trio event loop, so the maps need no locks; disk work (directory walks, reads, ``fsync``,
atomic writes) runs in worker threads and its results are applied back on the loop. Operations
that change a torrent's lifecycle (init, resync, finalize, abort) take the torrent's
:meth:`Store.lock` so two of them never interleave on the same hash; piece writes never take it.

What happens to files found on disk
    A file is *verified, never trusted*: a final-named file of the right size (left by an
    earlier sync, a previous selection, or a hardlink we just made) starts as ``EXISTING`` and
    its pieces are SHA-1-checked by a background scan before they count. Proven pieces are set;
    a file whose every piece is proven becomes ``COMPLETE``; otherwise it is renamed back to
    ``.partial`` (or, when it has other hard links, removed — writing into it would change the
    other names too) and the missing pieces are streamed. After a fresh init or a resync the
    ``.partial`` files are scanned the same way, so a selection change never re-sends data that
    is already here. On a plain restart the persisted bitmap is trusted for ``.partial`` files
    (that is what the flush invariant guarantees), except that bits of files that are gone or
    shorter than their size are cleared.

Names are owned, so one torrent's pieces never land in another torrent's files:

* a *tracked* torrent owns the final and ``.partial`` names of its selected files until it is
  finalized or aborted;
* a *finalized* torrent owns the same names for as long as its ``.finalized`` marker exists
  (qBittorrent seeds from those files) *and its file is still on disk*. The marker lists the
  names, so this ownership is rebuilt at startup — markers are read before any unfinished
  torrent is loaded. It ends when the marker goes (a resync of that same torrent, or an
  operator deleting ``<data>/.qbsync/<hash>``; noticed at the next conflict, no restart
  needed), and name by name when the file goes: ownership exists to protect verified data,
  and a name whose file is gone protects nothing. A user who removes a finalized torrent and
  its files from qBittorrent must not find its names blocked forever (a re-release, or the
  same content under a new hash). So when a new torrent collides with a finalized owner, the
  owner's files are ``lstat``-ed (in a thread, under the owner's lock): a file counts as
  present while its final name *or* its ``.partial`` twin exists (or cannot be checked); the
  colliding names of absent files are released (``event=finalized_name_released``) and
  dropped from the marker, so a restart does not hand them back to the owner over the new
  torrent's files. When none of the owner's files is left, the whole marker directory is
  removed (``event=finalized_owner_released reason=files_gone``): a marker listing nothing
  on disk would otherwise survive forever (the orphan reaper never touches markers) and keep
  answering "complete" for data that is gone. Data files are never deleted by this. Abort
  and the orphan reaper never remove a marker.

A torrent laid out at a name another torrent owns is refused with ``unsafe-path`` naming the
owner, before anything is created: otherwise its init would scan the owner's files, find its
own pieces missing and rename them to ``.partial`` or unlink them (then write into them).
Deleting data (abort with ``delete_files``, the orphan reaper) skips every name another
torrent owns. Cross-seeding the *same* content under another info-hash at the same names is
refused too (it could be verified read-only, but a single differing piece would have to be
written into the seeded file); sync it to another sub path, or let qBittorrent add it over the
existing files. Markers from before names were recorded (or unreadable ones) own nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import attrs
import trio

from .. import metrics, paths
from ..bitfield import Bitfield
from ..log import paths_kv as paths_kv  # re-exported: writer.py imports it from here
from ..torrent import Metainfo, MetainfoError, parse_metainfo
from ..wire.errors import ErrorCode, WireError
from .hardlinks import HardlinkRegistry
from .ownership import OWNED_NAME, ConflictError, Ledger
from .state import (
    FINALIZED_NAME,
    META_NAME,
    PIECES_NAME,
    SCHEMA_VERSION,
    TMP_PREFIX,
    TORRENT_NAME,
    DataFile,
    FileMeta,
    FileStatus,
    FinalizedFile,
    FinalizedMarker,
    Phase,
    TorrentMeta,
    TorrentState,
    atomic_write,
    decode_pieces,
    dump_json,
    encode_pieces,
    load_marker,
    load_meta,
    mkdir_durable,
    read_optional,
)

log = logging.getLogger("qbsync.destination.store")

SCAN_READ_LIMIT = 2  # concurrent verification reads (scans, read-back), apart from writers
# How long a torrent being created waits for the lock of a finalized torrent whose vanished
# names it wants; then ``busy`` (retryable). Bounded, so two inits waiting on each other's
# locks cannot deadlock.
OWNER_LOCK_WAIT = 5.0


# --- layout: the request's file table checked against the parsed metainfo -------------------


def pad_flags(metainfo: Metainfo) -> list[bool]:
    """Which geometry files are BEP 47 padding files (see :attr:`Metainfo.pads`). qBittorrent
    hides them from its file list, the geometry keeps them; they are all zeros, never written
    to disk, and the source sends zeros for them."""
    pads = list(metainfo.pads)
    n = len(metainfo.geometry.files)
    return pads if len(pads) == n else [False] * n


def build_files(metainfo: Metainfo, entries: Sequence[FileMeta], sub: str) -> list[DataFile]:
    """Lay out the torrent's files under ``sub`` using the source's names.

    Geometry (sizes, offsets, order, piece hashes) is the metainfo's; only names and the
    selection come from the request, and the request must agree with the metainfo on the number
    of files and every size. Raises :class:`WireError` ``bad-request`` or ``unsafe-path``.
    """
    geometry = metainfo.geometry
    pads = pad_flags(metainfo)
    try:
        sub_parts = paths.split_relative(sub, allow_empty=True)
    except paths.UnsafePathError as exc:
        raise WireError(ErrorCode.UNSAFE_PATH, f"save_sub_path: {exc}") from None
    if len(entries) == len(geometry.files):
        targets = list(range(len(geometry.files)))
    else:
        targets = [i for i, pad in enumerate(pads) if not pad]
        if len(entries) != len(targets):
            raise WireError(
                ErrorCode.BAD_REQUEST,
                f"file list has {len(entries)} entries, the torrent has {len(targets)} files",
            )
    by_geometry: dict[int, tuple[int, FileMeta]] = {}
    for request_index, (entry, gi) in enumerate(zip(entries, targets, strict=True)):
        tf = geometry.files[gi]
        if entry.size != tf.size:
            raise WireError(
                ErrorCode.BAD_REQUEST,
                f"file {request_index} size {entry.size} differs from the torrent's {tf.size}",
            )
        by_geometry[gi] = (request_index, entry)
    files: list[DataFile] = []
    rels: list[paths.Parts] = []
    for tf in geometry.files:
        if tf.index not in by_geometry:
            files.append(
                DataFile(
                    index=tf.index,
                    request_index=-1,
                    parts=(),
                    size=tf.size,
                    offset=tf.offset,
                    selected=False,
                    pad=True,
                    status=FileStatus.SKIPPED,
                )
            )
            continue
        request_index, entry = by_geometry[tf.index]
        try:
            rel = paths.split_relative(entry.path)
        except paths.UnsafePathError as exc:
            raise WireError(ErrorCode.UNSAFE_PATH, f"file {request_index}: {exc}") from None
        pad = pads[tf.index]
        if not pad:
            rels.append(rel)
        files.append(
            DataFile(
                index=tf.index,
                request_index=request_index,
                parts=sub_parts + rel,
                size=tf.size,
                offset=tf.offset,
                selected=entry.selected and not pad,
                pad=pad,
                device=entry.device,
                inode=entry.inode,
                status=FileStatus.STREAMING if entry.selected and not pad else FileStatus.SKIPPED,
            )
        )
    try:
        paths.check_layout(sub_parts, rels)
    except paths.UnsafePathError as exc:
        raise WireError(ErrorCode.UNSAFE_PATH, str(exc)) from None
    return files


# --- blocking helpers (run in threads) --------------------------------------------------------


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


def _check_conflict(ledger: Ledger, f: DataFile, probe: FileProbe) -> None:
    """Raise :class:`ConflictError` when a name ``f`` needs holds something qbsync did not
    create and cannot adopt: anything but a regular file of exactly the torrent's size at the
    final name (that one is verified read-only, see :meth:`Store._settle_existing`), or any
    ``.partial`` it did not create (it would be written into)."""
    final_ours = ledger.owns_stat(probe.final)
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
    if probe.partial is not None and not ledger.owns_stat(probe.partial):
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
        if (st.st_dev, st.st_ino) not in state.ledger.files:
            raise paths.UnsafePathError(f"{'/'.join(parts)!r} was not created by qbsync")
        if st.st_size != f.size:
            os.ftruncate(fd, f.size)  # ours (checked above)
    except BaseException:
        os.close(fd)
        raise
    return fd


@attrs.frozen
class ReadSpan:
    parts: paths.Parts | None  # None: a padding file, read as zeros
    file_offset: int
    length: int


@attrs.frozen
class PieceCheck:
    index: int
    expected: bytes
    spans: tuple[ReadSpan, ...]


def verify_pieces(
    root: Path, checks: Sequence[PieceCheck], *, drop_cache: bool = False
) -> set[int]:
    """Read and SHA-1 each piece from disk; return the indices that match. Each file is
    ``fdatasync``'ed before it is read (see :func:`_open_synced`); unreadable, unsyncable or
    short data counts as a mismatch. With ``drop_cache`` the page cache of each file is dropped
    first, so the bytes come from the disk."""
    ok: set[int] = set()
    fds: dict[paths.Parts, int | None] = {}
    buf = bytearray(max((sum(s.length for s in c.spans) for c in checks), default=0))
    try:
        for check in checks:
            view = memoryview(buf)
            pos = 0
            good = True
            for span in check.spans:
                chunk = view[pos : pos + span.length]
                if span.parts is None:
                    chunk[:] = bytes(span.length)
                else:
                    if span.parts not in fds:
                        fds[span.parts] = _open_synced(root, span.parts, drop_cache)
                    fd_or_none = fds[span.parts]
                    if fd_or_none is None or not _pread_exact(fd_or_none, chunk, span.file_offset):
                        good = False
                        break
                pos += span.length
            if good and hashlib.sha1(view[:pos]).digest() == check.expected:
                ok.add(check.index)
    finally:
        for open_fd in fds.values():
            if open_fd is not None:
                os.close(open_fd)
    return ok


def _open_synced(root: Path, parts: paths.Parts, drop_cache: bool) -> int | None:
    """Open a file for a verification read, after making its bytes durable: a piece proven
    here gets its bit persisted, and the bytes may still be only in the page cache (a file left
    by an abort, a resync or a killed process). ``fdatasync`` also makes ``DONTNEED`` effective
    (dirty pages are not dropped). None when it cannot be opened or synced."""
    try:
        fd = paths.open_file(root, parts, os.O_RDONLY)
    except OSError:
        return None
    try:
        os.fdatasync(fd)
        if drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        os.close(fd)
        return None
    return fd


def _pread_exact(fd: int, into: memoryview, offset: int) -> bool:
    while into:
        try:
            n = os.preadv(fd, [into], offset)
        except OSError:
            return False
        if n <= 0:
            return False
        into = into[n:]
        offset += n
    return True


# --- the store ---------------------------------------------------------------------------------


Spawner = Callable[[TorrentState, Callable[[], Awaitable[None]]], None]


class Store:
    """All tracked torrents of one destination, and their state directories."""

    def __init__(
        self, data: Path, *, dry_run: bool = False, registry: HardlinkRegistry | None = None
    ) -> None:
        self.root = data
        self.state_root = data / paths.STATE_DIR_NAME
        self.dry_run = dry_run
        self.registry = registry if registry is not None else HardlinkRegistry()
        self.torrents: dict[str, TorrentState] = {}
        # Which tracked torrent writes which name (final and .partial): two torrents laid out
        # at the same names would overwrite each other's pieces.
        self._owner: dict[paths.Parts, str] = {}
        self._owned: dict[str, list[paths.Parts]] = {}
        # Which finalized torrents' files (from their .finalized markers) are at which name:
        # never scanned, renamed, written or deleted on another torrent's behalf. A set, since
        # markers written by older versions may overlap.
        self._final_owners: dict[paths.Parts, set[str]] = {}
        self._final_owned: dict[str, list[paths.Parts]] = {}  # finalized hash -> its files
        self._locks: dict[str, trio.Lock] = {}
        self.read_limiter = trio.CapacityLimiter(SCAN_READ_LIMIT)
        self._nursery: trio.Nursery | None = None
        self.on_file_complete: Callable[[TorrentState, DataFile], None] | None = None

    # -- plumbing --------------------------------------------------------------------------------

    def attach(self, nursery: trio.Nursery) -> None:
        """Give the store the nursery its background work (scans, early finalizes, finalize
        jobs) runs in — the runner's, so nothing runs unsupervised."""
        self._nursery = nursery

    def spawn(self, state: TorrentState, fn: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``fn`` as a background task of ``state``: abort cancels it and waits for it.

        Exceptions are logged with a traceback and end only that task (a failing scan of one
        torrent must not stop the daemon); the task's own code turns expected failures into
        results before that."""
        if self._nursery is None:
            raise RuntimeError("store not attached to a nursery")
        scope = trio.CancelScope()
        state.task_started(scope)

        async def runner() -> None:
            try:
                with scope:
                    await fn()
            except Exception:
                log.exception("event=background_task_failed hash=%s task=%s", state.info_hash, name)
            finally:
                state.task_finished(scope)

        self._nursery.start_soon(runner, name=f"{name}:{state.info_hash[:8]}")

    def lock(self, info_hash: str) -> trio.Lock:
        lock = self._locks.get(info_hash)
        if lock is None:
            lock = self._locks[info_hash] = trio.Lock()
        return lock

    def meta_dir(self, info_hash: str) -> Path:
        return self.state_root / info_hash

    def read_marker(self, info_hash: str) -> FinalizedMarker | None:
        raw = read_optional(self.meta_dir(info_hash) / FINALIZED_NAME)
        if raw is None:
            return None
        marker = load_marker(raw)
        return marker if marker is not None else FinalizedMarker(info_hash, 0.0)

    def has_marker(self, info_hash: str) -> bool:
        return (self.meta_dir(info_hash) / FINALIZED_NAME).exists()

    def copy_problem(self, marker: FinalizedMarker) -> str | None:
        """Why the finalized copy of ``marker``'s torrent is not whole on disk right now, or
        None when every file it lists is a regular file of the recorded size (blocking).

        This is what stands between a hand-off and the loss of the last copy: qBittorrent
        keeps showing a stopped torrent at progress 1.0 after its files were deleted, so only
        a look at the files themselves tells that the copy is gone."""
        if not marker.files:
            return "the .finalized marker lists no files (written by an older version)"
        if marker.released:
            return f"file {marker.released[0]!r} was deleted and its name given to another torrent"
        for f in marker.files:
            parts = _split(f.path)
            if parts is None:
                return f"unusable path {f.path!r} in the .finalized marker"
            try:
                size = paths.regular_size(self.root, parts)
            except (OSError, paths.UnsafePathError) as exc:
                return f"file {f.path!r} cannot be checked: {exc}"
            if size != f.size:
                what = "missing" if size is None else f"{size} bytes, not {f.size}"
                return f"file {f.path!r} is {what}"
        return None

    # -- creation and recovery --------------------------------------------------------------------

    async def create(self, meta: TorrentMeta, metainfo: Metainfo, *, fresh: bool) -> TorrentState:
        """Build the state of a torrent and register it.

        ``fresh``: a new torrent or a resync — the state directory is (re)written and files on
        disk are scanned. Otherwise (recovery) the persisted bitmap is loaded and trusted for
        ``.partial`` files. In dry run nothing is written and nothing on disk is looked at.
        Raises :class:`WireError` (``bad-request``, ``unsafe-path``, ``io``).
        """
        files = build_files(metainfo, meta.files, meta.save_sub_path)
        if not self.dry_run:
            await self.release_vanished(meta.info_hash, files)
        self._claim_paths(meta.info_hash, files)
        try:
            return await self._create(meta, metainfo, files, fresh=fresh)
        except BaseException:
            self._release_paths(meta.info_hash)
            raise

    async def _create(
        self, meta: TorrentMeta, metainfo: Metainfo, files: list[DataFile], *, fresh: bool
    ) -> TorrentState:
        n = metainfo.geometry.num_pieces
        state = TorrentState(
            info_hash=meta.info_hash,
            meta=meta,
            metainfo=metainfo,
            files=files,
            written=Bitfield(n),
            unverified=Bitfield(n),
            meta_dir=self.meta_dir(meta.info_hash),
            dry_run=self.dry_run,
        )
        if self.dry_run:
            state.dry_seen = Bitfield(n)
            state.recount_remaining()
            self.torrents[state.info_hash] = state
            return state
        try:
            to_scan = await trio.to_thread.run_sync(self._prepare, state, fresh)
        except ConflictError as exc:
            log.warning(
                "event=ownership_conflict hash=%s path=%s error=%s",
                state.info_hash,
                paths_kv(exc.parts),
                paths_kv(str(exc)),
            )
            raise WireError(ErrorCode.CONFLICT, str(exc)) from None
        except paths.UnsafePathError as exc:
            raise WireError(ErrorCode.UNSAFE_PATH, str(exc)) from None
        except OSError as exc:
            raise WireError(ErrorCode.IO, f"preparing files: {exc}") from None
        state.recount_remaining()
        state.flushed_version = state.version
        self.torrents[state.info_hash] = state
        if to_scan:
            self.start_scan(state, to_scan)
        elif self.on_file_complete is not None:
            # A crash between a file's last piece and its rename: finish that now.
            for f in state.files:
                if f.status is FileStatus.STREAMING and f.remaining == 0:
                    self.on_file_complete(state, f)
        return state

    def check_claims(self, info_hash: str, files: Sequence[DataFile]) -> None:
        """Raise ``unsafe-path`` naming the tracked or finalized torrent that owns one of the
        names ``files`` write; changes nothing but forgetting owners whose marker is gone.
        Run before a request acts (a resync wipes state only once the new layout is known to
        be acceptable)."""
        for name in _names(f.parts for f in files if f.selected and f.parts):
            owner = self._owner.get(name)
            if owner is not None and owner != info_hash:
                raise WireError(
                    ErrorCode.UNSAFE_PATH,
                    f"file {'/'.join(name)!r} is already being synced by torrent {owner}",
                )
            for final_owner in sorted(self._final_owners.get(name, ())):
                if final_owner == info_hash:
                    continue
                if not self.has_marker(final_owner):
                    # The operator removed the marker: that torrent's files are no longer ours
                    # to protect.
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

    def _claim_paths(self, info_hash: str, files: Sequence[DataFile]) -> None:
        """Reserve the names ``files`` write (before anything is created), or raise
        ``unsafe-path`` naming the tracked or finalized torrent that owns one of them."""
        self.check_claims(info_hash, files)
        names = _names(f.parts for f in files if f.selected and f.parts)
        self._release_paths(info_hash)
        for name in names:
            self._owner[name] = info_hash
        self._owned[info_hash] = names

    async def release_vanished(self, info_hash: str, files: Sequence[DataFile]) -> None:
        """Release the names ``files`` would take from finalized torrents whose files at
        those names are gone from disk (see the module docstring). Names whose file is still
        there are left owned; :meth:`_claim_paths` refuses them."""
        names = set(_names(f.parts for f in files if f.selected and f.parts))
        owners = sorted(
            {o for name in names for o in self._final_owners.get(name, ()) if o != info_hash}
        )
        for owner in owners:
            await self._release_vanished_of(owner, names)

    async def _release_vanished_of(self, owner: str, wanted: set[paths.Parts]) -> None:
        # The owner's lock: its state directory is only ever changed under it (a resync
        # wipes and recreates it), so the marker rewrite cannot land in a new state directory.
        lock = self.lock(owner)
        acquired = False
        with trio.move_on_after(OWNER_LOCK_WAIT):
            await lock.acquire()
            acquired = True
        if not acquired:
            raise WireError(
                ErrorCode.BUSY, f"finalized torrent {owner} owning these names is busy: retry"
            )
        try:
            finals = self._final_owned.get(owner)
            if not finals:
                return  # released while we waited
            try:
                outcome = await trio.to_thread.run_sync(
                    self._drop_vanished, owner, list(finals), wanted
                )
            except OSError as exc:
                raise WireError(
                    ErrorCode.IO, f"updating the marker of finalized torrent {owner}: {exc}"
                ) from None
            if outcome is None:
                return
            released, remaining = outcome
            for parts in released:
                log.info("event=finalized_name_released hash=%s path=%s", owner, paths_kv(parts))
            if remaining is None:
                log.info("event=finalized_owner_released hash=%s reason=files_gone", owner)
                self.release_finalized(owner)
            else:
                self.own_finalized(owner, remaining)
        finally:
            lock.release()

    def _drop_vanished(
        self, owner: str, finals: list[paths.Parts], wanted: set[paths.Parts]
    ) -> tuple[list[paths.Parts], list[paths.Parts] | None] | None:
        """Blocking part of :meth:`_release_vanished_of`. Returns ``None`` when nothing is
        released, else the released files and the owner's files still owned (``None`` when
        none is left: the marker directory was removed). Only state files are touched."""
        mdir = self.meta_dir(owner)
        if not (mdir / FINALIZED_NAME).exists():
            return None  # the marker is gone: :meth:`_claim_paths` releases the whole owner
        gone = [p for p in finals if not self._present(p)]
        released = [p for p in gone if p in wanted or paths.partial_parts(p) in wanted]
        if not released:
            return None
        if len(gone) == len(finals):
            shutil.rmtree(mdir)
            return released, None
        marker = self.read_marker(owner)
        if marker is None:
            return None  # removed meanwhile, as above
        dropped = set(released)
        kept = tuple(f for f in marker.files if _split(f.path) not in dropped)
        gave = marker.released + tuple("/".join(p) for p in released)
        atomic_write(
            mdir, FINALIZED_NAME, dump_json(attrs.evolve(marker, files=kept, released=gave))
        )
        return released, [p for p in finals if p not in dropped]

    def _present(self, parts: paths.Parts) -> bool:
        """A finalized file counts as present while its final name or its ``.partial`` twin
        exists — or cannot be checked (fail closed: never give away data we cannot see)."""
        for name in (parts, paths.partial_parts(parts)):
            try:
                if paths.lstat(self.root, name) is not None:
                    return True
            except (OSError, paths.UnsafePathError):
                return True
        return False

    def _release_paths(self, info_hash: str) -> None:
        for name in self._owned.pop(info_hash, ()):
            if self._owner.get(name) == info_hash:
                del self._owner[name]

    def own_finalized(self, info_hash: str, files: Sequence[paths.Parts]) -> None:
        """Record that finalized torrent ``info_hash`` has its files at ``files`` (their
        ``.partial`` twins are owned too: writing one would be renamed over the file)."""
        self.release_finalized(info_hash)
        for name in _names(files):
            self._final_owners.setdefault(name, set()).add(info_hash)
        self._final_owned[info_hash] = list(files)

    def own_finalized_state(self, state: TorrentState) -> None:
        self.own_finalized(state.info_hash, _marker_parts(state))

    def release_finalized(self, info_hash: str) -> None:
        """Forget the names of finalized torrent ``info_hash`` (its marker is gone)."""
        for name in _names(self._final_owned.pop(info_hash, ())):
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

    def start_scan(self, state: TorrentState, files: set[int]) -> None:
        """Verify the given files' unwritten pieces in the background (phase SCANNING)."""
        state.phase = Phase.SCANNING
        state.scan_done = trio.Event()
        self.spawn(state, lambda: self._scan(state, files), "scan")

    def ensure_scanned(self, state: TorrentState) -> None:
        """Restart the scan if EXISTING files are left over (an earlier scan failed)."""
        if state.phase is Phase.ACTIVE:
            existing = {f.index for f in state.files if f.status is FileStatus.EXISTING}
            if existing:
                self.start_scan(state, existing)

    def _prepare(self, state: TorrentState, fresh: bool) -> set[int]:
        """Blocking part of :meth:`create`: state directory, file probes, files created.
        Returns the files whose bytes on disk must be scanned.

        Every name is probed and checked against the ownership rule *before* anything is
        created, so a refused torrent (``conflict``) leaves nothing behind. A ``.partial`` is
        created on first write (:func:`open_for_write`: ``O_EXCL``, recorded in the ledger
        before any byte is written), so every file the writer writes is one this torrent
        made."""
        to_scan: set[int] = set()
        root = self.root
        selected = [f for f in state.files if f.selected]
        paths.precheck_no_symlinks(root, [f.parts for f in selected])
        mdir = state.meta_dir
        ledger = Ledger.load(mdir)
        if not fresh and not (mdir / OWNED_NAME).exists():
            # State written by a version without a ledger: its .partial files were created by
            # that version for this state directory. Final names are never taken over this way.
            for f in selected:
                st = paths.lstat(root, paths.partial_parts(f.parts))
                if st is not None and stat.S_ISREG(st.st_mode):
                    ledger.files.add((st.st_dev, st.st_ino))
        state.ledger = ledger
        probes = {f.index: _probe(root, f) for f in selected}
        for f in selected:
            _check_conflict(ledger, f, probes[f.index])
        if fresh:
            _clear_state_dir(mdir, keep=OWNED_NAME)
            mkdir_durable(mdir)
            atomic_write(mdir, TORRENT_NAME, state.metainfo.raw)
            atomic_write(mdir, META_NAME, dump_json(state.meta))
        else:
            raw = read_optional(mdir / PIECES_NAME)
            if raw is not None:
                state.written, state.unverified = decode_pieces(raw, state.num_pieces)
            for leftover in mdir.glob(TMP_PREFIX + "*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        try:
            to_scan = self._lay_out(state, selected, probes, fresh)
        finally:
            ledger.save(mdir)
        return to_scan

    def _lay_out(
        self,
        state: TorrentState,
        selected: list[DataFile],
        probes: dict[int, FileProbe],
        fresh: bool,
    ) -> set[int]:
        to_scan: set[int] = set()
        root = self.root
        ledger = state.ledger
        geometry = state.geometry
        cleared = 0
        for f in selected:
            probe = probes[f.index]
            final_ours = ledger.owns_stat(probe.final)
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
                f.status = FileStatus.COMPLETE
                continue
            pieces = geometry.file_pieces(f.index)
            if probe.final_size == f.size:
                f.foreign = not final_ours
                all_set = all(state.written[i] for i in pieces)
                if all_set and not fresh:
                    f.status = FileStatus.COMPLETE
                else:
                    f.status = FileStatus.EXISTING
                    to_scan.add(f.index)
                continue
            if probe.final is not None:
                # Ours (others were refused), of the wrong size: the source has the data.
                ledger.unlink(root, f.parts)
            if probe.partial_size is not None:
                f.status = FileStatus.STREAMING
                if fresh and probe.partial_size == f.size:
                    to_scan.add(f.index)
                elif probe.partial_size != f.size and not fresh:
                    cleared += state.clear_pieces(pieces)
                continue
            f.status = FileStatus.STREAMING
            if not fresh:
                cleared += state.clear_pieces(pieces)
            elif self._try_link(state, f):
                f.status = FileStatus.EXISTING
                f.linked = True
                to_scan.add(f.index)
        if cleared:
            metrics.stale_bitmap_pieces_cleared.inc(cleared)
            log.warning(
                "event=stale_pieces_cleared hash=%s pieces=%d reason=data_file_missing_or_short",
                state.info_hash,
                cleared,
            )
        return to_scan

    def _try_link(self, state: TorrentState, f: DataFile) -> bool:
        """Hardlink ``f`` to an already verified file with the same source (device, inode)."""
        if not (f.device or f.inode):
            return False
        source = self.registry.lookup(f.device, f.inode, f.size, self.root)
        if source is None or source == f.parts:
            return False
        created: list[paths.Parts] = []
        try:
            with (
                paths.open_parent(self.root, source, create=False) as sfd,
                paths.open_parent(self.root, f.parts, create=True, created=created) as dfd,
            ):
                if os.fstat(sfd).st_dev != os.fstat(dfd).st_dev:
                    return False
                os.link(
                    source[-1], f.parts[-1], src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False
                )
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

    def _scan_candidates(self, state: TorrentState, files: set[int]) -> list[int]:
        """Unwritten pieces touching one of ``files`` (found on disk, to be verified)."""
        out: set[int] = set()
        for idx in files:
            out.update(i for i in state.geometry.file_pieces(idx) if not state.written[i])
        return sorted(out)

    def _piece_check(self, state: TorrentState, index: int, present: set[int]) -> PieceCheck | None:
        spans: list[ReadSpan] = []
        for span in state.geometry.spans(index):
            f = state.files[span.file_index]
            if f.pad:
                spans.append(ReadSpan(None, span.file_offset, span.length))
            elif f.index in present:
                spans.append(ReadSpan(f.working_parts, span.file_offset, span.length))
            else:
                return None
        return PieceCheck(index, state.metainfo.piece_hashes[index], tuple(spans))

    async def _scan(self, state: TorrentState, files: set[int]) -> None:
        """Verify pieces already on disk, then settle EXISTING files (see module doc)."""
        try:
            present = await trio.to_thread.run_sync(self._present_files, state)
            checks = [
                c
                for i in self._scan_candidates(state, files)
                if (c := self._piece_check(state, i, present)) is not None
            ]
            proven: set[int] = set()
            batch = 64
            for start in range(0, len(checks), batch):
                async with self.read_limiter:
                    proven |= await trio.to_thread.run_sync(
                        verify_pieces, self.root, checks[start : start + batch]
                    )
            for i in proven:
                state.written[i] = True
                state.unverified[i] = False
            if proven:
                metrics.pieces_found_on_disk.inc(len(proven))
                state.version += 1
                state.touched.update(
                    f.index for f in state.files if f.status is not FileStatus.SKIPPED
                )
            failed = {c.index for c in checks} - proven
            await self._settle_existing(state, failed)
            state.recount_remaining()
            log.info(
                "event=scan_done hash=%s checked=%d proven=%d needed=%d",
                state.info_hash,
                len(checks),
                len(proven),
                state.missing_count(),
            )
            await self.flush(state)
        except ConflictError as exc:
            state.conflict = str(exc)
            log.warning(
                "event=ownership_conflict hash=%s path=%s error=%s",
                state.info_hash,
                paths_kv(exc.parts),
                paths_kv(str(exc)),
            )
        except (OSError, paths.UnsafePathError) as exc:
            log.error("event=scan_failed hash=%s error=%s", state.info_hash, paths_kv(str(exc)))
        finally:
            if state.phase is Phase.SCANNING:
                state.phase = Phase.ACTIVE
            if state.scan_done is not None:
                state.scan_done.set()
        if state.phase is Phase.ACTIVE and self.on_file_complete is not None:
            for f in state.files:
                if f.status is FileStatus.STREAMING and f.remaining == 0:
                    self.on_file_complete(state, f)

    def _present_files(self, state: TorrentState) -> set[int]:
        """Files whose working path holds a full-size regular file right now."""
        out: set[int] = set()
        for f in state.files:
            if f.pad or f.size == 0:
                continue
            parts = f.working_parts if f.status is not FileStatus.SKIPPED else f.parts
            try:
                if paths.regular_size(self.root, parts) == f.size:
                    out.add(f.index)
            except (OSError, paths.UnsafePathError):
                continue
        return out

    async def _settle_existing(self, state: TorrentState, failed: set[int]) -> None:
        """EXISTING -> COMPLETE unless one of its pieces was checked and failed. Pieces that
        could not be checked (they share bytes with a file not on disk yet) do not count
        against it: they are streamed for that other file anyway, and the final verification
        (qBittorrent's recheck or our read-back) covers them — a mismatch there demotes the
        file then."""
        for f in state.files:
            if f.status is not FileStatus.EXISTING:
                continue
            if f.foreign:
                # Not ours: adopted only when every piece it covers is proven; never changed.
                pieces = state.geometry.file_pieces(f.index)
                unproven = sum(1 for i in pieces if not state.written[i])
                if unproven:
                    state.conflict = (
                        f"{f.path!r} exists, was not created by qbsync and {unproven} of its "
                        f"{len(pieces)} pieces could not be verified: it is left untouched"
                    )
                    log.warning(
                        "event=ownership_conflict hash=%s path=%s unverified_pieces=%d",
                        state.info_hash,
                        paths_kv(f.parts),
                        unproven,
                    )
                    continue
                f.status = FileStatus.COMPLETE
                state.ledger.adopted.add(f.parts)
                log.info(
                    "event=user_file_adopted hash=%s path=%s note=%s",
                    state.info_hash,
                    paths_kv(f.parts),
                    paths_kv("verified; it stays the user's file and is never deleted"),
                )
                continue
            if not failed.intersection(state.geometry.file_pieces(f.index)):
                f.status = FileStatus.COMPLETE
                continue
            for name in (f.parts, paths.partial_parts(f.parts)):
                owner = self.foreign_owner(name, state.info_hash)
                if owner is not None:  # claims make this unreachable; never risk the data
                    raise paths.UnsafePathError(
                        f"{'/'.join(name)!r} belongs to torrent {owner}, not demoting it"
                    )
            await trio.to_thread.run_sync(self._demote, state, f)

    def _demote(self, state: TorrentState, f: DataFile) -> None:
        """A file of ours at its final name failed verification: stream what is missing
        (blocking). Only files this torrent created are touched (:class:`ConflictError`
        otherwise)."""
        demote_file(self.root, state, f)
        log.info(
            "event=existing_file_demoted hash=%s file=%s shared=%s",
            state.info_hash,
            paths_kv(f.parts),
            str(f.linked).lower(),
        )

    async def recover(self) -> int:
        """Load every unfinished torrent from ``<data>/.qbsync`` (startup). Unloadable
        directories are skipped with a warning (the orphan reaper removes them later).

        The ``.finalized`` markers are read first, so the names they own are known before an
        unfinished torrent claims (and scans) anything."""
        if not self.state_root.is_dir():
            return 0
        loaded = 0
        unfinished: list[str] = []
        for entry in sorted(self.state_root.iterdir()):
            h = entry.name
            if not entry.is_dir() or h.startswith(".") or not _is_hash(h):
                continue
            marker = self.read_marker(h)
            if marker is None:
                unfinished.append(h)
                continue
            self.registry.add_marker(marker)
            self.own_finalized(h, _split_marker_paths(marker))
        for h in unfinished:
            try:
                state = await self._load(h)
            except (OSError, ValueError, WireError) as exc:
                log.warning("event=recover_skipped hash=%s error=%s", h, paths_kv(str(exc)))
                continue
            loaded += 1
            log.info(
                "event=recovered hash=%s pieces=%d written=%d needed=%d",
                h,
                state.num_pieces,
                state.written.count(),
                state.missing_count(),
            )
        return loaded

    async def _load(self, info_hash: str) -> TorrentState:
        mdir = self.meta_dir(info_hash)
        meta_raw = await trio.to_thread.run_sync(read_optional, mdir / META_NAME)
        torrent_raw = await trio.to_thread.run_sync(read_optional, mdir / TORRENT_NAME)
        if meta_raw is None or torrent_raw is None:
            raise ValueError("meta.json or torrent missing")
        meta = load_meta(meta_raw)
        try:
            metainfo = parse_metainfo(torrent_raw)
        except MetainfoError as exc:
            raise ValueError(f"stored torrent: {exc}") from None
        if meta.info_hash != info_hash or not metainfo.matches(info_hash):
            raise ValueError("stored torrent does not match its directory")
        state = await self.create(meta, metainfo, fresh=False)
        state.last_activity = await trio.to_thread.run_sync(newest_mtime, mdir)
        return state

    # -- flushing --------------------------------------------------------------------------------

    async def flush(self, state: TorrentState) -> None:
        """Make the persisted bitmap catch up with memory, keeping the invariant: fdatasync the
        data files written since the last flush, *then* persist the bitmap snapshot taken
        before those syncs. A file whose sync fails loses all its bits (its data may not be
        durable and Linux may not report the failure twice)."""
        if state.dry_run or state.phase is Phase.CLOSED:
            return
        async with state.flush_lock:
            if not state.dirty and not state.touched:
                return
            version = state.version
            written, unverified = state.written.copy(), state.unverified.copy()
            touched, state.touched = state.touched, set()
            pinned: list[DataFile] = []
            for idx in sorted(touched):
                f = state.files[idx]
                async with f.open_lock:
                    if f.fd is not None:
                        f.users += 1
                        pinned.append(f)
            start = time.monotonic()
            try:
                failed = await trio.to_thread.run_sync(_sync_fds, [(f.index, f.fd) for f in pinned])
            finally:
                for f in pinned:
                    f.release()
            for idx in failed:
                f = state.files[idx]
                metrics.file_sync_errors.labels("destination").inc()
                log.error(
                    "event=file_sync_failed hash=%s file=%s", state.info_hash, paths_kv(f.parts)
                )
                state.clear_pieces(state.geometry.file_pieces(idx))
                state.recount_remaining()
            # Bits un-set while the syncs ran (a close whose sync failed, bad data) must not
            # be persisted from the older snapshot.
            written, unverified = (
                _intersect(written, state.written),
                _intersect(unverified, state.written),
            )
            blob = encode_pieces(written, unverified)
            try:
                await trio.to_thread.run_sync(atomic_write, state.meta_dir, PIECES_NAME, blob)
            except OSError as exc:
                state.touched |= touched
                metrics.state_save_errors.labels("destination").inc()
                log.error(
                    "event=state_save_failed hash=%s error=%s", state.info_hash, paths_kv(str(exc))
                )
                raise
            metrics.state_flush_duration.observe(time.monotonic() - start)
            if not failed:
                state.flushed_version = version

    async def flush_all(self) -> None:
        for state in list(self.torrents.values()):
            if state.dirty or state.touched:
                with contextlib.suppress(OSError):
                    await self.flush(state)
        metrics.torrents_with_dirty_state.set(
            sum(1 for s in self.torrents.values() if s.dirty and not s.dry_run)
        )

    # -- files --------------------------------------------------------------------------------

    async def acquire(self, state: TorrentState, f: DataFile) -> int | None:
        """The write descriptor of ``f`` (opened on first use), pinned until
        :meth:`DataFile.release`. ``None`` when the file is being closed or finalized, or the
        torrent is finalizing or gone — a late writer must never re-create a ``.partial`` that
        finalize just renamed or abort just deleted. Raises ``OSError`` / ``UnsafePathError``."""
        if f.unavailable() or not state.is_in(Phase.ACTIVE):
            return None
        if f.fd is None:
            async with f.open_lock:
                if f.fd is None and not f.unavailable() and state.is_in(Phase.ACTIVE):
                    f.fd = await trio.to_thread.run_sync(open_for_write, self.root, state, f)
        fd = f.fd
        if f.unavailable() or fd is None or not state.is_in(Phase.ACTIVE):
            return None
        f.users += 1
        return fd

    async def close_file(self, state: TorrentState, f: DataFile, *, sync: bool = True) -> bool:
        """Wait for writes in flight, fdatasync and close. False when the sync failed (then
        the file's bits are cleared, see :meth:`flush`)."""
        f.closing = True
        try:
            async with f.open_lock:
                await f.wait_idle()
                fd, f.fd = f.fd, None
                if fd is None:
                    return True
                ok = await trio.to_thread.run_sync(_sync_and_close, fd, sync)
        finally:
            f.closing = False
        state.touched.discard(f.index)
        if not ok:
            metrics.file_sync_errors.labels("destination").inc()
            log.error("event=file_sync_failed hash=%s file=%s", state.info_hash, paths_kv(f.parts))
            state.clear_pieces(state.geometry.file_pieces(f.index))
            state.recount_remaining()
        return ok

    async def close_all(self, state: TorrentState, *, sync: bool = True) -> bool:
        ok = True
        for f in state.files:
            if f.fd is not None or f.users:
                ok = await self.close_file(state, f, sync=sync) and ok
        return ok

    # -- removal --------------------------------------------------------------------------------

    def untrack(self, state: TorrentState) -> None:
        """Stop tracking ``state`` without waiting (used by its own tasks)."""
        state.phase = Phase.CLOSED
        if self.torrents.get(state.info_hash) is state:
            del self.torrents[state.info_hash]
            self._release_paths(state.info_hash)

    async def forget(self, state: TorrentState) -> None:
        """Stop tracking ``state``: cancel and await its background work, close its files.
        Never call it from one of ``state``'s own tasks (it would wait for itself)."""
        self.untrack(state)
        await state.cancel_tasks()
        await self.close_all(state, sync=False)

    async def wipe_state_dir(self, info_hash: str, *, keep_ledger: bool = False) -> None:
        """Delete ``<data>/.qbsync/<hash>`` (data files are not touched). A ``.finalized``
        marker goes with it, and so does the claim on that torrent's names. With
        ``keep_ledger`` (a resync: the data files stay) the record of which files qbsync
        created is kept."""
        mdir = self.meta_dir(info_hash)
        if keep_ledger:
            await trio.to_thread.run_sync(lambda: _clear_state_dir(mdir, keep=OWNED_NAME))
        else:
            await trio.to_thread.run_sync(lambda: shutil.rmtree(mdir, ignore_errors=True))
        self.release_finalized(info_hash)

    async def delete_data(
        self, files: Sequence[tuple[paths.Parts, int]], *, info_hash: str, ledger: Ledger
    ) -> int:
        """Delete the final and ``.partial`` names of ``files`` (parts, sub-path depth) under
        the data root, then the emptied directories this torrent created.

        Proof for each deletion: the name holds a file this torrent created (its device and
        inode are in ``ledger``) and no other torrent owns the name (tracked, or finalized and
        seeded by qBittorrent). Anything else — a user's file, an adopted file, a file put
        there after ours was removed — is left alone and logged."""
        targets: list[paths.Parts] = []
        for parts, _ in files:
            for target in (parts, paths.partial_parts(parts)):
                owner = self.foreign_owner(target, info_hash)
                if owner is None:
                    targets.append(target)
                else:
                    log.warning(
                        "event=delete_skipped hash=%s file=%s owner=%s",
                        info_hash,
                        paths_kv(target),
                        owner,
                    )

        def run() -> int:
            removed = 0
            for target in targets:
                try:
                    if ledger.unlink(self.root, target):
                        removed += 1
                    elif paths.lstat(self.root, target) is not None:
                        log.warning(
                            "event=delete_skipped hash=%s file=%s reason=not_created_by_qbsync",
                            info_hash,
                            paths_kv(target),
                        )
                except (OSError, paths.UnsafePathError) as exc:
                    log.warning(
                        "event=delete_failed file=%s error=%s",
                        paths_kv(target),
                        paths_kv(str(exc)),
                    )
            for parts, keep in files:
                ledger.remove_empty_dirs(self.root, parts, keep=keep)
            return removed

        return await trio.to_thread.run_sync(run)

    async def write_marker(self, state: TorrentState) -> None:
        """Replace the state directory's content by the ``.finalized`` marker."""
        # Every selected file, empty ones included: the list is also what the names this
        # torrent owns are rebuilt from at startup.
        marker = FinalizedMarker(
            info_hash=state.info_hash,
            finalized_at=time.time(),
            save_sub_path=state.meta.save_sub_path,
            files=tuple(
                FinalizedFile(f.path, f.size, f.device, f.inode)
                for f in state.files
                if f.selected and f.parts
            ),
        )

        def run() -> None:
            mdir = state.meta_dir
            atomic_write(mdir, FINALIZED_NAME, dump_json(marker))
            state.ledger.save(mdir)
            for entry in mdir.iterdir():
                if entry.name not in (FINALIZED_NAME, OWNED_NAME):
                    with contextlib.suppress(OSError):
                        entry.unlink()

        # Owned before the marker exists and before the caller untracks the state, so there
        # is no moment at which another torrent could claim these names.
        self.own_finalized_state(state)
        try:
            await trio.to_thread.run_sync(run)
        except BaseException:
            if not self.has_marker(state.info_hash):
                self.release_finalized(state.info_hash)
            raise
        self.registry.add_marker(marker)

    async def save_meta(self, state: TorrentState) -> None:
        if not state.dry_run:
            await trio.to_thread.run_sync(
                atomic_write, state.meta_dir, META_NAME, dump_json(state.meta)
            )


# --- small helpers ------------------------------------------------------------------------------


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
    elif not ledger.owns_stat(st) or f.foreign:
        raise ConflictError(f.parts, "was not created by qbsync: it is left untouched")
    elif f.linked or st.st_nlink > 1:
        ledger.unlink(root, f.parts)
        state.clear_pieces(state.geometry.file_pieces(f.index))
        f.linked = True
    else:
        ledger.unlink(root, partial)  # a stale .partial of ours, if any
        ledger.rename(root, f.parts, partial)
    ledger.save(state.meta_dir)
    f.status = FileStatus.STREAMING
    f.linked = False


def _clear_state_dir(mdir: Path, *, keep: str) -> None:
    """Empty a state directory except ``keep`` (the ownership ledger: the data files it
    names stay on disk, so who created them must not be forgotten)."""
    if not mdir.is_dir():
        return
    for entry in mdir.iterdir():
        if entry.name == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def new_meta(info_hash: str, name: str, sub: str, files: Sequence[FileMeta]) -> TorrentMeta:
    return TorrentMeta(
        schema=SCHEMA_VERSION,
        info_hash=info_hash,
        name=name,
        save_sub_path=sub,
        files=tuple(files),
        created=time.time(),
    )


def _names(files: Iterable[paths.Parts]) -> list[paths.Parts]:
    """The names a file set occupies: each final name and its ``.partial`` twin."""
    return [name for parts in files for name in (parts, paths.partial_parts(parts))]


def _marker_parts(state: TorrentState) -> list[paths.Parts]:
    return [f.parts for f in state.files if f.selected and f.parts]


def _split_marker_paths(marker: FinalizedMarker) -> list[paths.Parts]:
    return [parts for f in marker.files if (parts := _split(f.path)) is not None]


def _split(path: str) -> paths.Parts | None:
    try:
        return paths.split_relative(path)
    except paths.UnsafePathError:
        return None


def _is_hash(name: str) -> bool:
    return len(name) in (40, 64) and all(c in "0123456789abcdef" for c in name)


def newest_mtime(directory: Path) -> float:
    newest = 0.0
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat().st_mtime)
        newest = max(newest, directory.stat().st_mtime)
    return newest or time.time()


def _intersect(a: Bitfield, b: Bitfield) -> Bitfield:
    both = int.from_bytes(a.to_bytes(), "big") & int.from_bytes(b.to_bytes(), "big")
    return Bitfield(a.size, both.to_bytes(len(a.to_bytes()), "big"))


def _sync_fds(fds: Sequence[tuple[int, int | None]]) -> list[int]:
    failed = []
    for idx, fd in fds:
        if fd is None:
            continue
        try:
            os.fdatasync(fd)
        except OSError:
            failed.append(idx)
    return failed


def _sync_and_close(fd: int, sync: bool) -> bool:
    try:
        if sync:
            os.fdatasync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
