"""The torrent store: creating, resuming, scanning, flushing and deleting per-torrent state.

One :class:`Store` owns every tracked :class:`~.state.TorrentState`. All bookkeeping happens on
the Trio event loop, so the maps need no locks; disk work (directory walks, reads, ``fsync``,
atomic writes) runs in worker threads and its results are applied back on the loop. Operations
that change a torrent's lifecycle (init, resync, finalize, abort) take the torrent's
:meth:`Store.lock` so two of them never interleave on the same hash; piece writes never take it.

What happens to files found on disk is :mod:`.files`. Who may write which name is decided
elsewhere: between torrents by :mod:`.names`, and whether qbsync may touch a file at all by
:mod:`.ownership` (only files it created). The layout of a torrent's files is :mod:`.layout`;
reading pieces back, and the scan of files found on disk, is :mod:`.verify`. What is left
here: the map of tracked torrents, their lifecycle (create, recover, start a scan and apply
its result, flush, close, forget) and their state directories.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import attrs
import trio

from .. import metrics, paths
from ..bitfield import Bitfield
from ..log import paths_kv
from ..torrent import Metainfo, MetainfoError, parse_metainfo
from ..wire.errors import ErrorCode, WireError
from . import statetree
from .durable import atomic_write
from .files import clear_state_dir, demote_file, prepare
from .hardlinks import HardlinkRegistry
from .layout import build_files
from .names import NameClaims, names_of
from .ownership import OWNED_NAME, ConflictError, Ledger
from .state import (
    FINALIZED_NAME,
    HANDED_OFF_NAME,
    META_NAME,
    PIECES_NAME,
    QB_ADDED_NAME,
    SCHEMA_VERSION,
    TORRENT_NAME,
    DataFile,
    FileMeta,
    FileStatus,
    FinalizedFile,
    FinalizedMarker,
    Phase,
    TorrentMeta,
    TorrentState,
    dump_json,
    encode_pieces,
    load_marker,
    load_meta,
    read_optional,
)
from .verify import scan
from .writer import close_all

log = logging.getLogger("qbsync.destination.store")

SCAN_READ_LIMIT = 2  # concurrent verification reads (scans, read-back), apart from writers
# How long a torrent being created waits for the lock of a finalized torrent whose vanished
# names it wants; then ``busy`` (retryable). Bounded, so two inits waiting on each other's
# locks cannot deadlock.
OWNER_LOCK_WAIT = 5.0


# --- the store ---------------------------------------------------------------------------------


Spawner = Callable[[TorrentState, Callable[[], Awaitable[None]]], None]


class Store:
    """All tracked torrents of one destination, and their state directories."""

    def __init__(
        self,
        data: Path,
        *,
        dry_run: bool = False,
        registry: HardlinkRegistry | None = None,
        state_root: Path | None = None,
    ) -> None:
        self.root = data
        # ``--state-dir`` (default ``<data>/.qbsync``), opened only through :mod:`.statetree`.
        self.state_root = state_root if state_root is not None else data / paths.STATE_DIR_NAME
        self.dry_run = dry_run
        self.registry = registry if registry is not None else HardlinkRegistry()
        self.torrents: dict[str, TorrentState] = {}
        self.names = NameClaims()  # which torrent may write which name (see .names)
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
        return statetree.exists(self.meta_dir(info_hash), FINALIZED_NAME)

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
            if f.disk_inode:
                st = paths.lstat(self.root, parts)
                if st is None or (st.st_dev, st.st_ino) != (f.disk_device, f.disk_inode):
                    return f"file {f.path!r} was replaced: it is not the copy qbsync verified"
        return None

    # -- who added the qBittorrent entry ----------------------------------------------------------

    def qb_added(self, info_hash: str) -> bool:
        """qbsync added ``info_hash`` to the destination qBittorrent (its record, or the
        ``.finalized`` marker, exists). Otherwise an entry of that hash is the user's own."""
        mdir = self.meta_dir(info_hash)
        return statetree.exists(mdir, QB_ADDED_NAME) or statetree.exists(mdir, FINALIZED_NAME)

    def record_qb_added(self, state: TorrentState) -> None:
        """Blocking: record, durably, that qbsync is about to add this torrent to
        qBittorrent (written before the add: a crash in between leaves a record of an entry
        that may not exist, never an entry of ours without its record)."""
        atomic_write(state.meta_dir, QB_ADDED_NAME, b"1\n")

    def handed_off(self, info_hash: str) -> bool:
        """StartTorrent answered ``started=True`` for ``info_hash`` (its record exists): the
        source may have deleted its copy, so nothing a request does may touch it again."""
        return statetree.exists(self.meta_dir(info_hash), HANDED_OFF_NAME)

    def record_handed_off(self, info_hash: str) -> None:
        """Blocking: record, durably, that seeding was handed over (written before
        ``started=True`` is answered: the source deletes its copy on that answer)."""
        atomic_write(self.meta_dir(info_hash), HANDED_OFF_NAME, b"1\n")

    def disown_finalized(self, info_hash: str) -> None:
        """Blocking: drop the files a ``.finalized`` marker lists from the torrent's ledger
        (state written by an older version still records them). Called before a resync of a
        finalized torrent: its verified files become foreign, so the new sync may only read
        them (adopt them when every piece verifies) and never delete, rename or write them."""
        marker = self.read_marker(info_hash)
        if marker is None:
            return
        mdir = self.meta_dir(info_hash)
        ledger = Ledger.load(mdir)
        ids: set[tuple[int, int]] = set()
        for f in marker.files:
            parts = _split(f.path)
            if parts is None:
                continue
            for name in (parts, paths.partial_parts(parts)):
                try:
                    st = paths.lstat(self.root, name)
                except (OSError, paths.UnsafePathError):
                    continue
                if st is not None:
                    ids.add((st.st_dev, st.st_ino))
        if ids & ledger.files:
            ledger.disown(ids)
            ledger.save(mdir)

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
            self.names.release(meta.info_hash)
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
            raise exc.logged(state.info_hash) from None
        except paths.UnsafePathError as exc:
            raise WireError(ErrorCode.UNSAFE_PATH, str(exc)) from None
        except OSError as exc:
            raise WireError(ErrorCode.IO, f"preparing files: {exc}") from None
        state.recount_remaining()
        state.mark_flushed(state.version)
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
        names ``files`` write (see :mod:`.names`). Run before a request acts."""
        self.names.check(info_hash, _selected_parts(files), self.has_marker)

    def _claim_paths(self, info_hash: str, files: Sequence[DataFile]) -> None:
        """Reserve the names ``files`` write (before anything is created), or raise
        ``unsafe-path`` naming the tracked or finalized torrent that owns one of them."""
        self.check_claims(info_hash, files)
        self.names.claim(info_hash, _selected_parts(files))

    async def release_vanished(self, info_hash: str, files: Sequence[DataFile]) -> None:
        """Release the names ``files`` would take from finalized torrents whose files at
        those names are gone from disk (see the module docstring). Names whose file is still
        there are left owned; :meth:`_claim_paths` refuses them."""
        names = set(names_of(_selected_parts(files)))
        for owner in self.names.finalized_owners(_selected_parts(files), info_hash):
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
            finals = self.names.finalized_files(owner)
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
        if not statetree.exists(mdir, FINALIZED_NAME):
            return None  # the marker is gone: :meth:`_claim_paths` releases the whole owner
        gone = [p for p in finals if not self._present(p)]
        released = [p for p in gone if p in wanted or paths.partial_parts(p) in wanted]
        if not released:
            return None
        if len(gone) == len(finals):
            statetree.remove(mdir)
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

    def own_finalized(self, info_hash: str, files: Sequence[paths.Parts]) -> None:
        self.names.own_finalized(info_hash, files)

    def own_finalized_state(self, state: TorrentState) -> None:
        self.names.own_finalized(state.info_hash, _marker_parts(state))

    def release_finalized(self, info_hash: str) -> None:
        self.names.release_finalized(info_hash)

    def foreign_owner(self, name: paths.Parts, info_hash: str) -> str | None:
        return self.names.foreign_owner(name, info_hash)

    def start_scan(self, state: TorrentState, files: set[int]) -> None:
        """Verify the given files' unwritten pieces in the background (phase SCANNING)."""
        state.begin_scan()
        self.spawn(state, lambda: self._scan(state, files), "scan")

    def ensure_scanned(self, state: TorrentState) -> None:
        """Restart the scan if EXISTING files are left over (an earlier scan failed)."""
        if state.phase is Phase.ACTIVE:
            existing = {f.index for f in state.files if f.status is FileStatus.EXISTING}
            if existing:
                self.start_scan(state, existing)

    def _prepare(self, state: TorrentState, fresh: bool) -> set[int]:
        return prepare(self.root, self.registry, state, fresh)

    async def _scan(self, state: TorrentState, files: set[int]) -> None:
        """Verify pieces already on disk, then settle EXISTING files (see module doc)."""
        try:
            checked, proven = await scan(self.root, state, files, self.read_limiter)
            state.mark_proven(proven)
            if proven:
                metrics.pieces_found_on_disk.inc(len(proven))
            await self._settle_existing(state, checked - proven)
            state.recount_remaining()
            log.info(
                "event=scan_done hash=%s checked=%d proven=%d needed=%d",
                state.info_hash,
                len(checked),
                len(proven),
                state.missing_count(),
            )
            await self.flush(state)
        except ConflictError as exc:
            state.conflict = str(exc)
            exc.logged(state.info_hash)
        except (OSError, paths.UnsafePathError) as exc:
            log.error("event=scan_failed hash=%s error=%s", state.info_hash, paths_kv(str(exc)))
        finally:
            state.end_scan()
        if state.phase is Phase.ACTIVE and self.on_file_complete is not None:
            for f in state.files:
                if f.status is FileStatus.STREAMING and f.remaining == 0:
                    self.on_file_complete(state, f)

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
                # A file this torrent finalized before (a resync) is kept when no piece that
                # could be checked failed: the unchecked ones share bytes with a file not on
                # disk yet, and qBittorrent's recheck judges them; it is never changed either.
                if unproven and f.handed and not failed.intersection(pieces):
                    unproven = 0
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
                f.become(FileStatus.COMPLETE)
                state.ledger.adopted.add(f.parts)
                log.info(
                    "event=user_file_adopted hash=%s path=%s note=%s",
                    state.info_hash,
                    paths_kv(f.parts),
                    paths_kv("verified; it stays the user's file and is never deleted"),
                )
                continue
            if not failed.intersection(state.geometry.file_pieces(f.index)):
                f.become(FileStatus.COMPLETE)
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
        loaded = 0
        unfinished: list[str] = []
        for h in await trio.to_thread.run_sync(statetree.root_names, self.state_root):
            if not _is_hash(h) or not statetree.is_dir(self.meta_dir(h)):
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
                state.mark_flushed(version)

    async def flush_all(self) -> None:
        for state in list(self.torrents.values()):
            if state.dirty or state.touched:
                with contextlib.suppress(OSError):
                    await self.flush(state)
        metrics.torrents_with_dirty_state.set(
            sum(1 for s in self.torrents.values() if s.dirty and not s.dry_run)
        )

    # -- removal --------------------------------------------------------------------------------

    def untrack(self, state: TorrentState) -> None:
        """Stop tracking ``state`` without waiting (used by its own tasks)."""
        state.close()
        if self.torrents.get(state.info_hash) is state:
            del self.torrents[state.info_hash]
            self.names.release(state.info_hash)

    async def forget(self, state: TorrentState) -> None:
        """Stop tracking ``state``: cancel and await its background work, close its files.
        Never call it from one of ``state``'s own tasks (it would wait for itself)."""
        self.untrack(state)
        await state.cancel_tasks()
        await close_all(state, sync=False)

    async def wipe_state_dir(self, info_hash: str, *, keep_ledger: bool = False) -> None:
        """Delete ``<data>/.qbsync/<hash>`` (data files are not touched). A ``.finalized``
        marker goes with it, and so does the claim on that torrent's names. With
        ``keep_ledger`` (a resync: the data files stay) the record of which files qbsync
        created is kept."""
        mdir = self.meta_dir(info_hash)
        if keep_ledger:
            await trio.to_thread.run_sync(lambda: clear_state_dir(mdir, keep=OWNED_NAME))
        else:
            await trio.to_thread.run_sync(statetree.remove, mdir)
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
        selected = [f for f in state.files if f.selected and f.parts]

        def run() -> FinalizedMarker:
            files = []
            ids: set[tuple[int, int]] = set()
            for f in selected:
                st = paths.lstat(self.root, f.parts)
                disk = (st.st_dev, st.st_ino) if st is not None else (0, 0)
                ids.add(disk)
                files.append(FinalizedFile(f.path, f.size, f.device, f.inode, *disk))
            marker = FinalizedMarker(
                info_hash=state.info_hash,
                finalized_at=time.time(),
                save_sub_path=state.meta.save_sub_path,
                files=tuple(files),
            )
            mdir = state.meta_dir
            atomic_write(mdir, FINALIZED_NAME, dump_json(marker))
            # The last copy is inviolable: from here on its files are the destination
            # qBittorrent's, not qbsync's to delete, rename or write (see Ledger.disown).
            state.ledger.disown(ids)
            state.ledger.save(mdir)
            statetree.clear(mdir, keep=(FINALIZED_NAME, OWNED_NAME))
            return marker

        # Owned before the marker exists and before the caller untracks the state, so there
        # is no moment at which another torrent could claim these names.
        self.own_finalized_state(state)
        try:
            marker = await trio.to_thread.run_sync(run)
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


def new_meta(info_hash: str, name: str, sub: str, files: Sequence[FileMeta]) -> TorrentMeta:
    return TorrentMeta(
        schema=SCHEMA_VERSION,
        info_hash=info_hash,
        name=name,
        save_sub_path=sub,
        files=tuple(files),
        created=time.time(),
    )


def _selected_parts(files: Iterable[DataFile]) -> list[paths.Parts]:
    return [f.parts for f in files if f.selected and f.parts]


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
    return statetree.newest_mtime(directory) or time.time()


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
