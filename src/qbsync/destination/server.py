"""The destination's wire handler: validates every request, then dispatches to the store,
writer and finalizer.

Nothing from the network is trusted: the info-hash must be 40 or 64 hex digits; a piece's
index must be in range and its offset and length must equal the torrent's geometry; an
InitTorrent's ``.torrent`` must parse, hash to the announced info-hash and carry SHA-1 piece
hashes, and the file table the source sends must agree with it (count, every size, total,
piece length); every name must be a plain relative path that stays under ``--data`` and that
no other torrent owns — tracked, or finalized and seeded from it (see :mod:`.store`). A
refusal is a :class:`WireError` with a stable code (``bad-request``, ``unsafe-path``...) — the
connection and every other torrent keep working — and is counted in
``qbsync_rejected_requests_total{code}``.

Validate, then act: a request is checked completely before anything it would change is
touched, so a refused request leaves everything as it was. Resync, Abort and StartTorrent act
only on hashes qbsync has state or a ``.finalized`` marker for; StartTorrent answers
``started=True`` only for a verified, complete copy that qBittorrent is seen seeding (the
source deletes its own copy on that answer, see docs/data-safety.md). Files are only ever
deleted or changed when qbsync created them (:mod:`.ownership`).

Lifecycle operations on one torrent (init, finalize, abort, start) are serialized by the
store's per-torrent lock; piece writes never wait for it.

Dry run (``--dry-run``), the contract:

* **InitTorrent** validates everything and answers READY with *all* pieces of the selected
  files needed (nothing on disk is looked at or created; a ``.finalized`` marker or a complete
  torrent in qBittorrent still answers COMPLETE, since reading changes nothing);
* **pieces** are SHA-1-checked and acked (``hash-mismatch`` when wrong) but never written;
* **Finalize** answers COMPLETE once every needed piece arrived intact during this run and
  logs what it would have done (rename, add stopped to qBittorrent, recheck, tag); otherwise
  ``incomplete``;
* **Abort** forgets the in-memory state and logs what it would delete; **StartTorrent** runs
  its checks, logs and answers ``started=False`` (a source deletes nothing on that answer).

Nothing is ever written under ``--data`` and no qBittorrent call that changes anything is
made.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .. import metrics, paths
from ..http.activity import ActivityLog, Event, since_complete
from ..log import paths_kv
from ..qbittorrent.api import ERROR_STATES, QB, QBError
from ..torrent import Metainfo, MetainfoError, parse_metainfo
from ..wire.errors import ErrorCode, WireError
from ..wire.messages import (
    Abort,
    AbortResult,
    Finalize,
    FinalizeResult,
    InitResult,
    InitTorrent,
    OpenConnection,
    OpenConnectionResult,
    Piece,
    PieceAck,
    StartResult,
    StartTorrent,
    SyncStatus,
    valid_info_hash,
)
from ..wire.server import Peer
from . import statetree
from .finalizer import Finalizer
from .layout import build_files
from .ownership import OWNED_NAME, Ledger
from .sources import Sources
from .state import (
    META_NAME,
    FileMeta,
    FinalizeJob,
    Phase,
    TorrentMeta,
    TorrentState,
    load_meta,
    read_optional,
)
from .store import Store, new_meta, newest_mtime
from .writer import Writer

log = logging.getLogger("qbsync.destination.server")

MIN_PIECE_LENGTH = 1024
MAX_PIECE_LENGTH = 64 * 1024 * 1024
MAX_FILES = 1_000_000
INIT_INLINE_WAIT = 5.0  # Init waits this long for a scan before answering VERIFYING
FINALIZE_INLINE_WAIT = 5.0  # Finalize waits this long for the job before answering VERIFYING
ORPHAN_AGE = 24 * 3600.0
DECODE_SLOTS = 2  # .torrent decodes running at once (each holds its decoded tree in memory)
# Torrents tracked at once (each holds its .torrent and bitmaps in memory): a peer cannot grow
# the destination's memory without bound; a source retries ``busy`` later.
MAX_TRACKED = 4096
# Tracked torrents are also charged by the bytes of metadata they hold (their .torrent, piece
# hashes, bitmaps and file lists; see metadata_bytes): 4,096 torrents of 26 MiB .torrent files
# would be 200 GiB. The budget is --max-metadata; a torrent is always admitted when nothing
# else is tracked, so a budget below one torrent's size serializes syncs instead of blocking.
DEFAULT_MAX_METADATA = 256 * 1024 * 1024
FILE_METADATA_COST = 512  # per file: FileMeta, DataFile, the geometry entry, their path strs
START_CONFIRM_TIMEOUT = 20.0  # a started torrent must seed by then (the source waits 30 s)
START_POLL = 0.25
# Seeding for real: a started torrent whose data qBittorrent serves (``stoppedUP`` does not
# count: it is what a stopped torrent shows even after its files were deleted).
ACTIVE_SEEDING_STATES = frozenset({"uploading", "stalledUP", "forcedUP", "queuedUP"})

# OpenConnection is answered only on connections the destination dialed (.dialer wraps this
# handler); on an accepted one it is a bad request.
Request = InitTorrent | Finalize | Abort | StartTorrent | OpenConnection
Response = InitResult | FinalizeResult | AbortResult | StartResult | OpenConnectionResult

_COUNTED = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.UNSAFE_PATH})


def _reject(code: ErrorCode, message: str) -> WireError:
    metrics.rejected_requests.labels(code.value).inc()
    return WireError(code, message)


def metadata_bytes(metainfo: Metainfo) -> int:
    """What a tracked torrent's metadata costs in memory, for the ``--max-metadata`` budget:
    its raw ``.torrent``, its piece hashes (one buffer), its two piece bitmaps and a fixed
    cost per file."""
    pieces = metainfo.geometry.num_pieces
    return (
        len(metainfo.raw)
        + metainfo.piece_hashes.nbytes
        + 2 * ((pieces + 7) // 8)
        + FILE_METADATA_COST * len(metainfo.geometry.files)
    )


def normalize_hash(value: str) -> str:
    h = value.lower() if isinstance(value, str) else ""
    if not valid_info_hash(h):
        raise _reject(ErrorCode.BAD_REQUEST, "info_hash must be 40 or 64 hex digits")
    return h


def validate_init(req: InitTorrent, info_hash: str, *, max_piece: int) -> Metainfo:
    """Check an InitTorrent that carries files against its ``.torrent`` (authoritative)."""
    if not req.torrent_file:
        raise _reject(ErrorCode.BAD_REQUEST, "torrent_file is required to initialize")
    try:
        metainfo = parse_metainfo(bytes(req.torrent_file))
    except (MetainfoError, RecursionError, TypeError, ValueError) as exc:
        raise _reject(ErrorCode.BAD_REQUEST, f"torrent_file: {exc}") from None
    if not metainfo.matches(info_hash):
        raise _reject(
            ErrorCode.BAD_REQUEST,
            f"torrent_file has info-hash {metainfo.info_hash}, not {info_hash}",
        )
    if not metainfo.has_v1:
        raise _reject(
            ErrorCode.BAD_REQUEST, "v2-only torrents (no SHA-1 piece hashes) are unsupported"
        )
    g = metainfo.geometry
    upper = min(MAX_PIECE_LENGTH, max_piece)
    if not MIN_PIECE_LENGTH <= g.piece_length <= upper:
        raise _reject(
            ErrorCode.BAD_REQUEST,
            f"piece length {g.piece_length} outside {MIN_PIECE_LENGTH}..{upper}",
        )
    if len(req.files) > MAX_FILES or len(g.files) > MAX_FILES:
        raise _reject(ErrorCode.BAD_REQUEST, "too many files")
    if g.total_size <= 0:
        raise _reject(ErrorCode.BAD_REQUEST, "torrent is empty")
    for name, given, actual in (
        ("piece_length", req.piece_length, g.piece_length),
        ("total_size", req.total_size, g.total_size),
        ("num_pieces", req.num_pieces, g.num_pieces),
    ):
        if given and given != actual:
            raise _reject(
                ErrorCode.BAD_REQUEST, f"{name} {given} differs from the torrent's {actual}"
            )
    if any(f.size < 0 for f in req.files):
        raise _reject(ErrorCode.BAD_REQUEST, "negative file size")
    total = sum(f.size for f in req.files)
    if req.total_size and total != req.total_size and len(req.files) == len(g.files):
        raise _reject(ErrorCode.BAD_REQUEST, f"file sizes sum to {total}, not {req.total_size}")
    return metainfo


class DestinationServer:
    """Implements the wire :class:`~qbsync.wire.ServerHandler` protocol."""

    def __init__(
        self,
        store: Store,
        writer: Writer,
        finalizer: Finalizer,
        *,
        qb: QB | None,
        max_piece: int = MAX_PIECE_LENGTH,
        max_metadata: int = DEFAULT_MAX_METADATA,
    ) -> None:
        self.store = store
        self.writer = writer
        self.finalizer = finalizer
        self.qb = qb
        self.dry_run = store.dry_run
        self.max_piece = max_piece
        self.dry_finalized: set[str] = set()
        self.activity: ActivityLog | None = None  # the status page's history; the runner sets it
        self._decode_limiter = trio.CapacityLimiter(DECODE_SLOTS)
        self.max_metadata = max_metadata
        metrics.metadata_limit_bytes.set(max_metadata)
        metrics.metadata_bytes.set_function(self.metadata_in_use)  # read at scrape time
        self.sources = Sources()  # per-source counts, and which source syncs which torrent
        # One handler per request row of wire.MESSAGE_TABLE (a test checks they match).
        self.handlers: dict[type[Request], Callable[[Any], Awaitable[Response]]] = {
            InitTorrent: self.init,
            Finalize: self.finalize,
            Abort: self.abort,
            StartTorrent: self.start,
            OpenConnection: self.open_connection,
        }

    def metadata_in_use(self) -> int:
        """Bytes of metadata the tracked torrents hold (see :func:`metadata_bytes`)."""
        return sum(metadata_bytes(s.metainfo) for s in self.store.torrents.values())

    def _check_metadata_budget(self, info_hash: str, cost: int) -> None:
        """Refuse with ``busy`` when ``cost`` more bytes would overflow ``--max-metadata``
        (unless nothing else is tracked: see :data:`DEFAULT_MAX_METADATA`)."""
        others = [s for h, s in self.store.torrents.items() if h != info_hash]
        if not others:
            return
        in_use = sum(metadata_bytes(s.metainfo) for s in others)
        if in_use + cost > self.max_metadata:
            raise _reject(
                ErrorCode.BUSY,
                f"the metadata of {len(others)} torrents being synced here holds {in_use} "
                f"bytes, this one needs about {cost} more and --max-metadata is "
                f"{self.max_metadata}: retry once some have finished",
            )

    # -- ServerHandler ---------------------------------------------------------------------

    async def handle_request(self, peer: Peer, request: Request) -> Response:
        handler = self.handlers.get(type(request))
        if handler is None:
            raise _reject(ErrorCode.BAD_REQUEST, f"unexpected request {type(request).__name__}")
        try:
            if isinstance(request, (InitTorrent, Finalize, Abort)):
                return await self._owned(peer, request, handler)
            return await handler(request)
        except WireError as exc:
            log.info(
                "event=request_refused type=%s peer=%s code=%s error=%s",
                type(request).__name__,
                peer.address,
                exc.code.value,
                paths_kv(exc.message),
            )
            raise

    async def _owned(
        self,
        peer: Peer,
        request: InitTorrent | Finalize | Abort,
        handler: Callable[[Any], Awaitable[Response]],
    ) -> Response:
        """InitTorrent, Finalize and Abort under the one-source-per-torrent rule (see
        :mod:`.sources`): a full InitTorrent claims the torrent for the asking source, the
        others only check that no other source owns its in-progress state."""
        name = self.sources.identify(peer)
        h = normalize_hash(request.info_hash)
        in_progress = h in self.store.torrents
        claims = isinstance(request, InitTorrent) and bool(request.files) and not request.probe
        if claims:
            self.sources.claim(h, name)
        else:
            self.sources.check(h, name, in_progress)
        try:
            return await handler(request)
        finally:
            if claims:
                self.sources.init_done(h)
            self.sources.refresh(self.store.torrents)

    async def open_connection(self, request: OpenConnection) -> OpenConnectionResult:
        """``OpenConnection`` on a connection the source dialed: there is no dialer to open
        more, so none are (``accepted=0``; the pool then dials itself). On a connection this
        destination dialed (``--connect``), :class:`.dialer._DialedHandler` answers first."""
        return OpenConnectionResult(0)

    async def handle_piece(self, peer: Peer, piece: Piece) -> PieceAck:
        raw_hash = piece.info_hash
        try:
            h = normalize_hash(raw_hash)
        except WireError as exc:
            return PieceAck(raw_hash, piece.index, exc.code, exc.message)
        state = self.store.torrents.get(h)
        if state is None or state.phase is Phase.CLOSED:
            return PieceAck(raw_hash, piece.index, ErrorCode.NOT_INITIALIZED, "send InitTorrent")
        name = self.sources.identify(peer)
        try:
            self.sources.check(h, name, in_progress=True)
        except WireError as exc:
            return PieceAck(raw_hash, piece.index, exc.code, exc.message)
        self.sources.piece_started(name)
        try:
            return await self._piece(raw_hash, h, state, piece)
        finally:
            self.sources.piece_done(name)

    async def _piece(self, raw_hash: str, h: str, state: TorrentState, piece: Piece) -> PieceAck:
        g = state.geometry
        reason = ""
        if not 0 <= piece.index < g.num_pieces:
            reason = f"piece index {piece.index} outside 0..{g.num_pieces - 1}"
        elif piece.offset != g.piece_offset(piece.index):
            reason = f"offset {piece.offset} is not {g.piece_offset(piece.index)}"
        elif len(piece.data) != g.piece_size(piece.index):
            reason = (
                f"piece {piece.index} has {len(piece.data)} bytes, not {g.piece_size(piece.index)}"
            )
        if reason:
            metrics.rejected_requests.labels(ErrorCode.BAD_REQUEST.value).inc()
            log.info("event=piece_refused hash=%s code=bad-request error=%s", h, paths_kv(reason))
            return PieceAck(raw_hash, piece.index, ErrorCode.BAD_REQUEST, reason)
        outcome = await self.writer.write(state, piece.index, memoryview(piece.data))
        return PieceAck(raw_hash, piece.index, outcome.code, outcome.message)

    # -- InitTorrent -------------------------------------------------------------------------

    async def init(self, req: InitTorrent) -> InitResult:
        h = normalize_hash(req.info_hash)
        # Validate, then act: everything a request carries is checked before any state of this
        # torrent (its marker, its qBittorrent entry, its state directory) is changed, so a
        # refused request leaves the destination exactly as it was.
        checked: tuple[Metainfo, list[FileMeta], TorrentMeta] | None = None
        if req.files and not req.probe:
            if h not in self.store.torrents:
                # Before decoding: the decoded torrent holds about twice its raw size.
                self._check_metadata_budget(h, 2 * len(req.torrent_file))
            metainfo = await self._validate_init(req, h)
            files = [FileMeta(f.path, f.size, f.selected, f.device, f.inode) for f in req.files]
            meta = new_meta(h, req.name or metainfo.name, req.save_sub_path, files)
            try:
                layout = build_files(metainfo, files, req.save_sub_path)
                if not self.dry_run:
                    # Names of finalized torrents whose files are gone are free again (see
                    # :mod:`.store`): that is about those torrents, true whatever this is.
                    await self.store.release_vanished(h, layout)
                self.store.check_claims(h, layout)
            except WireError as exc:
                if exc.code in _COUNTED:
                    metrics.rejected_requests.labels(exc.code.value).inc()
                raise
            checked = (metainfo, files, meta)
        async with self.store.lock(h):
            state = self.store.torrents.get(h)
            marker = None
            if h not in self.dry_finalized:
                marker = await trio.to_thread.run_sync(self.store.read_marker, h)
            broken: str | None = None
            if state is None and marker is not None:
                broken = await trio.to_thread.run_sync(self.store.copy_problem, marker)
            if req.resync and marker is not None and not self.dry_run:
                handed = await trio.to_thread.run_sync(self.store.handed_off, h)
                if handed:
                    # After a hand-off the torrent and its files belong to the destination
                    # qBittorrent alone (the source may have deleted its copy): a resync would
                    # remove qbsync's entry and stop the last copy seeding.
                    raise _reject(
                        ErrorCode.CONFLICT,
                        "this torrent was handed off here (StartTorrent answered started): it "
                        "belongs to the destination qBittorrent now and is not synced again",
                    )
            if req.resync and checked is not None and (state is not None or marker is not None):
                # Only a torrent qbsync has state or a marker for is wiped: a resync of any
                # other hash is a plain init and never touches qBittorrent.
                await self._wipe(h, state, reason="resync")
                state, marker, broken = None, None, None
            if state is None and (h in self.dry_finalized or (marker is not None and not broken)):
                return InitResult(SyncStatus.COMPLETE)
            if broken:
                log.warning("event=finalized_copy_broken hash=%s reason=%s", h, paths_kv(broken))
                if checked is None:
                    return InitResult(SyncStatus.READY, b"", -1, 0)
                # The files qBittorrent was told about are gone: sync them again.
                await self._wipe(h, None, reason="copy-broken")
            qb_status = await self.finalizer.qb_status(h)
            if (
                qb_status is not None
                and not broken
                and (state is None or state.phase is not Phase.FINALIZING)
            ):
                if (
                    qb_status is SyncStatus.COMPLETE
                    and state is not None
                    and not self.dry_run
                    and await trio.to_thread.run_sync(self.store.qb_added, h)
                ):
                    # Verified in qBittorrent but the marker was never written (a crash in
                    # between): record it now instead of keeping a dead state around. Its
                    # names pass to the finalized owner before the tracked claim is dropped.
                    self.store.own_finalized_state(state)
                    await self.store.forget(state)
                    await self.store.write_marker(state)
                    log.info("event=marker_recovered hash=%s", h)
                return InitResult(qb_status)
            if state is not None and checked is not None:
                wanted = tuple((f.path, f.size, f.selected) for f in req.files)
                if wanted != state.selection_key():
                    log.info("event=selection_changed hash=%s action=resync", h)
                    await self._wipe(h, state, reason="selection-changed")
                    state = None
            if state is None:
                if checked is None:
                    return InitResult(SyncStatus.READY, b"", -1, 0)
                if len(self.store.torrents) >= MAX_TRACKED:
                    raise _reject(
                        ErrorCode.BUSY,
                        f"{len(self.store.torrents)} torrents are being synced here, the limit "
                        f"is {MAX_TRACKED}: retry once some have finished",
                    )
                metainfo, files, meta = checked
                self._check_metadata_budget(h, metadata_bytes(metainfo))
                try:
                    state = await self.store.create(meta, metainfo, fresh=True)
                except WireError as exc:
                    if exc.code in _COUNTED:
                        metrics.rejected_requests.labels(exc.code.value).inc()
                    raise
                log.info(
                    "event=torrent_initialized hash=%s name=%s pieces=%d files=%d selected=%d "
                    "dry_run=%s",
                    h,
                    paths_kv(meta.name),
                    state.num_pieces,
                    len(meta.files),
                    sum(1 for f in meta.files if f.selected),
                    str(self.dry_run).lower(),
                )
            return await self._ready(state)

    async def _validate_init(self, req: InitTorrent, info_hash: str) -> Metainfo:
        """Decode and check the ``.torrent`` in a worker thread (a crafted multi-MiB bencode
        costs seconds of CPU: never on the event loop, whose stall would fail /livez), at most
        :data:`DECODE_SLOTS` at a time."""
        return await trio.to_thread.run_sync(
            functools.partial(validate_init, req, info_hash, max_piece=self.max_piece),
            limiter=self._decode_limiter,
        )

    async def _ready(self, state: TorrentState) -> InitResult:
        if state.conflict and not state.is_in(Phase.SCANNING):
            # A file at one of its names is someone else's and does not verify: refuse, and
            # remove only what this torrent created (never the foreign file).
            conflict = state.conflict
            await self._abort_locked(state.info_hash, delete_files=True, reason="conflict")
            raise _reject(ErrorCode.CONFLICT, conflict)
        state.touch()
        job: FinalizeJob | None = state.finalize
        if job is not None:
            if not job.done.is_set():
                return InitResult(SyncStatus.VERIFYING)
            self._reset_after_failure(state, job)
        self.store.ensure_scanned(state)
        if state.phase is Phase.SCANNING and state.scan_done is not None:
            with trio.move_on_after(INIT_INLINE_WAIT):
                await state.scan_done.wait()
            if state.is_in(Phase.SCANNING):
                return InitResult(SyncStatus.VERIFYING)
            if state.conflict:
                return await self._ready(state)
        needed = state.needed()
        count = needed.count()
        return InitResult(SyncStatus.READY, needed.to_bytes(), count, state.num_pieces - count)

    def _reset_after_failure(self, state: TorrentState, job: FinalizeJob) -> None:
        state.finalize_failed(job)

    async def _wipe(self, h: str, state: TorrentState | None, *, reason: str) -> None:
        """Forget everything about ``h`` except its data files (resync). Callers only call it
        for a torrent qbsync tracks or holds a ``.finalized`` marker for.

        The last copy is inviolable: a finalized torrent's files are first dropped from the
        ledger (they become foreign: the new sync only reads them, adopts them when every
        piece verifies, or refuses with ``conflict``). The qBittorrent entry is removed only
        when qbsync added it (:meth:`.Store.qb_added`): a user's own torrent of the same hash
        is never touched."""
        if state is not None:
            await self.store.forget(state)
        self.dry_finalized.discard(h)
        if self.dry_run:
            log.info("event=dry_run_would_wipe hash=%s reason=%s", h, reason)
            return
        await trio.to_thread.run_sync(self.store.disown_finalized, h)
        ours = await trio.to_thread.run_sync(self.store.qb_added, h)
        if self.qb is not None and not ours:
            log.info("event=qb_entry_kept hash=%s reason=not_added_by_qbsync", h)
        elif self.qb is not None:
            try:
                if await self.qb.torrent(h) is not None:
                    await self.qb.delete(h, delete_files=False)
                    log.info("event=qb_deleted_for_resync hash=%s files_kept=true", h)
            except QBError as exc:
                raise WireError(
                    ErrorCode.QB_ERROR, f"resync: removing the stale qBittorrent entry: {exc}"
                ) from None
        await self.store.wipe_state_dir(h, keep_ledger=True)
        log.info("event=state_wiped hash=%s reason=%s", h, reason)

    # -- Finalize ------------------------------------------------------------------------------

    async def finalize(self, req: Finalize) -> FinalizeResult:
        h = normalize_hash(req.info_hash)
        # Not acted on (the layout was fixed by InitTorrent), but a request carrying a path
        # that could not be used is refused like InitTorrent would refuse it, not ignored.
        try:
            paths.split_relative(req.save_sub_path, allow_empty=True)
        except paths.UnsafePathError as exc:
            raise _reject(ErrorCode.UNSAFE_PATH, f"save_sub_path: {exc}") from None
        async with self.store.lock(h):
            state = self.store.torrents.get(h)
            if state is None:
                if h in self.dry_finalized or self.store.has_marker(h):
                    return FinalizeResult(SyncStatus.COMPLETE, "already finalized")
                raise WireError(ErrorCode.NOT_FOUND, "torrent not initialized on the destination")
            state.touch()
            job: FinalizeJob | None = state.finalize
            if job is None:
                if state.phase is Phase.SCANNING:
                    return FinalizeResult(SyncStatus.VERIFYING, "verifying files already on disk")
                self.finalizer.check_complete(state)
                job = self.finalizer.start(state, req)
        with trio.move_on_after(FINALIZE_INLINE_WAIT):
            await job.done.wait()
        if not job.done.is_set():
            return FinalizeResult(SyncStatus.VERIFYING, "finalization running")
        async with self.store.lock(h):
            if job.error is not None:
                self._reset_after_failure(state, job)
                raise job.error
            assert job.result is not None
            if state.dry_run:
                self.dry_finalized.add(h)
            return job.result

    # -- Abort ---------------------------------------------------------------------------------

    async def abort(self, req: Abort) -> AbortResult:
        h = normalize_hash(req.info_hash)
        async with self.store.lock(h):
            deleted = await self._abort_locked(h, delete_files=req.delete_files, reason="abort")
            return AbortResult(existed=deleted is not None)

    async def _abort_locked(self, h: str, *, delete_files: bool, reason: str) -> int | None:
        """Forget ``h``; delete its state directory and (optionally) its data files. Returns
        the number of files removed, or None when nothing was known about ``h``."""
        self.dry_finalized.discard(h)
        state = self.store.torrents.get(h)
        files: list[tuple[paths.Parts, int]] = []
        ledger: Ledger
        if state is not None:
            ledger = state.ledger
            await self.store.forget(state)
            depth = len(paths.split_relative(state.meta.save_sub_path, allow_empty=True))
            files = [(f.parts, depth) for f in state.files if f.selected and f.parts]
        else:
            if self.store.has_marker(h):
                # Finalized torrents belong to the destination qBittorrent now.
                log.info("event=abort_ignored hash=%s reason=finalized", h)
                return None
            raw = await trio.to_thread.run_sync(read_optional, self.store.meta_dir(h) / META_NAME)
            if raw is None and not statetree.is_dir(self.store.meta_dir(h)):
                return None
            if raw is not None:
                files = _files_from_meta(raw)
            ledger = await trio.to_thread.run_sync(Ledger.load, self.store.meta_dir(h))
        if self.dry_run:
            log.info(
                "event=dry_run_would_delete hash=%s files=%d delete_files=%s",
                h,
                len(files),
                str(delete_files).lower(),
            )
            return 0
        removed = (
            await self.store.delete_data(files, info_hash=h, ledger=ledger) if delete_files else 0
        )
        # Files kept on disk keep their record of who created them (a later init reuses them),
        # and so do files this torrent once finalized (they stay, see Ledger.handed).
        keep = not delete_files
        if delete_files and ledger.handed:
            handed = Ledger(handed=set(ledger.handed))
            await trio.to_thread.run_sync(handed.save, self.store.meta_dir(h))
            keep = True
        await self.store.wipe_state_dir(h, keep_ledger=keep)
        log.info("event=torrent_aborted hash=%s reason=%s files_deleted=%d", h, reason, removed)
        return removed

    # -- StartTorrent --------------------------------------------------------------------------

    async def start(self, req: StartTorrent) -> StartResult:
        """Hand seeding over: answer ``started=True`` only for a verified, complete copy that
        qBittorrent is seen seeding — the source deletes its own copy on that answer.

        Checked in order, each refusal a :class:`WireError` and nothing started: qbsync holds
        the torrent's ``.finalized`` marker (it verified it here; any other torrent the
        destination qBittorrent lists is not ours to start) and is not re-syncing it (else
        ``busy``); every file the marker lists is on disk at its size (else ``not-found``: the
        copy is gone, the source syncs again); qBittorrent lists it at progress 1.0 in a
        non-error state (else ``not-found``/``verify-failed``). Then it is started and
        qBittorrent polled until it reports a seeding state; an error state or no seeding
        within :data:`START_CONFIRM_TIMEOUT` stops it again and refuses."""
        h = normalize_hash(req.info_hash)
        if self.qb is None:
            raise WireError(ErrorCode.QB_ERROR, "destination qBittorrent not configured")
        qb = self.qb
        started = time.monotonic()
        async with self.store.lock(h):
            if h in self.store.torrents:
                raise WireError(ErrorCode.BUSY, "the torrent is being synced here: not handing off")
            marker = await trio.to_thread.run_sync(self.store.read_marker, h)
            if marker is None:
                raise WireError(
                    ErrorCode.NOT_FOUND,
                    "qbsync holds no verified copy of this torrent here (no .finalized marker)",
                )
            problem = await trio.to_thread.run_sync(self.store.copy_problem, marker)
            if problem is not None:
                raise WireError(ErrorCode.NOT_FOUND, f"destination copy incomplete: {problem}")
            info = await _listed(qb, h, "torrent not in the destination qBittorrent")
            _check_complete(info, "before start")
            # A repeated StartTorrent (the source's cache pruning after its own hand-off)
            # finds it seeding already: answered the same, but no second hand-off is logged.
            already_seeding = str(info.get("state", "")) in ACTIVE_SEEDING_STATES
            if self.dry_run:
                log.info("event=dry_run_would_start hash=%s tag=%s", h, paths_kv(req.tag))
                return StartResult(started=False)
            try:
                await qb.start(h)
            except QBError as exc:
                raise WireError(ErrorCode.QB_ERROR, f"start failed: {exc}") from None
            try:
                seeding = await self._confirm_seeding(h)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._stop_quietly(h)
                raise
            if req.tag:
                try:
                    await qb.add_tags(h, [req.tag])
                except QBError as exc:
                    metrics.tag_application_errors.labels("destination").inc()
                    log.warning("event=tag_failed hash=%s error=%s", h, paths_kv(str(exc)))
            if not self.dry_run:
                await trio.to_thread.run_sync(self.store.record_handed_off, h)
            log.info("event=torrent_started hash=%s tag=%s state=%s", h, paths_kv(req.tag), seeding)
            if self.activity is not None and not already_seeding:
                await self.activity.record(
                    Event(
                        time=time.time(),
                        kind="handed off",
                        hash=h,
                        name=str(info.get("name") or h),
                        size=int(info.get("size") or 0),
                        duration_seconds=time.monotonic() - started,
                        since_complete_seconds=since_complete(
                            req.completed_ms_ago, time.monotonic() - started
                        ),
                    )
                )
            return StartResult(started=True)

    async def _confirm_seeding(self, h: str) -> str:
        """Poll qBittorrent until it seeds ``h``; its state. Raises on an error state, on
        progress below 1.0 once checked, or when it does not seed in time."""
        qb = self.qb
        assert qb is not None
        last = ""
        with trio.move_on_after(START_CONFIRM_TIMEOUT):
            while True:
                info = await _listed(qb, h, "torrent left qBittorrent while starting")
                last = str(info.get("state", ""))
                if last in ACTIVE_SEEDING_STATES:
                    _check_complete(info, "after start")
                    return last
                if last in ERROR_STATES:
                    _check_complete(info, "after start")
                await trio.sleep(START_POLL)
        raise WireError(
            ErrorCode.VERIFY_FAILED,
            f"qBittorrent did not seed within {START_CONFIRM_TIMEOUT:.0f}s (state {last!r})",
        )

    async def _stop_quietly(self, h: str) -> None:
        assert self.qb is not None
        try:
            await self.qb.stop(h)
            log.warning("event=start_rolled_back hash=%s", h)
        except QBError as exc:
            log.error("event=start_rollback_failed hash=%s error=%s", h, paths_kv(str(exc)))

    # -- orphans --------------------------------------------------------------------------------

    async def reap_orphans(self, max_age: float = ORPHAN_AGE) -> int:
        """Reclaim unfinished torrents with no activity for ``max_age`` seconds — tracked ones
        too (a tracked torrent whose source vanished is just as dead) — unless the destination
        qBittorrent has them or cannot be asked (fail closed). Their state directory and the
        data files qbsync created for them (see :mod:`.ownership`) are deleted."""
        root = self.store.state_root
        if self.dry_run:
            return 0
        try:
            names = await trio.to_thread.run_sync(statetree.root_names, root)
        except OSError as exc:
            log.error("event=orphan_scan_failed error=%s", paths_kv(str(exc)))
            return 0
        now = time.time()
        reclaimed = 0
        for h in names:
            if not (len(h) in (40, 64) and valid_info_hash(h)) or self.store.has_marker(h):
                continue
            if not await trio.to_thread.run_sync(_has_torrent_state, root / h):
                continue  # only the ownership ledger of kept files: nothing to reclaim
            async with self.store.lock(h):
                state = self.store.torrents.get(h)
                if state is not None:
                    job: FinalizeJob | None = state.finalize
                    if state.phase is Phase.SCANNING or (job is not None and not job.done.is_set()):
                        continue
                    last = state.last_activity
                else:
                    last = await trio.to_thread.run_sync(newest_mtime, root / h)
                if now - last < max_age:
                    continue
                if self.qb is not None:
                    try:
                        if await self.qb.torrent(h) is not None:
                            continue
                    except QBError:
                        continue
                await self._abort_locked(h, delete_files=True, reason="orphan")
                metrics.orphan_cleanups.inc()
                reclaimed += 1
        return reclaimed

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        torrents = []
        for state in list(self.store.torrents.values()):
            needed = state.needed().count()
            torrents.append(
                {
                    "hash": state.info_hash,
                    "name": state.meta.name,
                    "phase": state.phase.value,
                    "pieces": state.num_pieces,
                    "needed": needed,
                    "written": state.written.count(),
                    "unverified_boundary": state.unverified.count(),
                    "dirty": state.dirty,
                    "idle_seconds": round(time.time() - state.last_activity, 1),
                }
            )
        return {
            "role": "destination",
            "dry_run": self.dry_run,
            "torrents": torrents,
            "sources": self.sources.status(),
        }


def _has_torrent_state(mdir: Path) -> bool:
    return any(name != OWNED_NAME for name in statetree.names(mdir))


async def _listed(qb: QB, info_hash: str, missing: str) -> dict[str, Any]:
    """The destination qBittorrent's entry for ``info_hash``; ``not-found`` (with ``missing``)
    when it lists none, ``qb-error`` when it cannot be asked."""
    try:
        info = await qb.torrent(info_hash)
    except QBError as exc:
        raise WireError(ErrorCode.QB_ERROR, str(exc)) from None
    if info is None:
        raise WireError(ErrorCode.NOT_FOUND, missing)
    return info


def _check_complete(info: dict[str, Any], when: str) -> None:
    """Refuse a hand-off unless qBittorrent reports the torrent whole and healthy."""
    state = str(info.get("state", ""))
    progress = float(info.get("progress", 0.0))
    if state == "missingFiles":
        raise WireError(ErrorCode.NOT_FOUND, f"qBittorrent reports missingFiles {when}")
    if state in ERROR_STATES:
        raise WireError(ErrorCode.VERIFY_FAILED, f"qBittorrent reports {state} {when}")
    if progress < 1.0:
        raise WireError(
            ErrorCode.VERIFY_FAILED, f"qBittorrent reports progress {progress:.4f} {when}"
        )


def _files_from_meta(raw: bytes) -> list[tuple[paths.Parts, int]]:
    """Data files listed in a ``meta.json`` (only well-formed, selected entries)."""
    try:
        meta = load_meta(raw)
        sub = paths.split_relative(meta.save_sub_path, allow_empty=True)
    except (ValueError, paths.UnsafePathError):
        return []
    out = []
    for f in meta.files:
        if not f.selected:
            continue
        try:
            out.append((sub + paths.split_relative(f.path), len(sub)))
        except paths.UnsafePathError:
            continue
    return out
