"""Sender workers: take queued pieces, read them, send them, act on the acknowledgement.

``--num-senders`` workers pull from the shared piece queue. A worker waits for a connection,
makes sure the torrent is initialized on the destination, reserves the piece's bytes in the
in-flight budget, reads the piece from disk (in a thread), waits for the rate limiter, then
hands the piece to a *delivery* task and goes for the next piece. The delivery sends it
(``ClientConnection.send_piece`` waits for the destination's credit, so the destination's
flow control paces us) under a ``--piece-timeout`` cancel scope and applies the ack:

==================  ===========================================================================
ack                 action
==================  ===========================================================================
ok                  piece done (finalize soon if it was the torrent's last)
hash-mismatch       re-read and resend after a growing pause (the file can lag qBittorrent's
                    report); after :data:`MAX_PIECE_FAILURES` give up on the piece so
                    finalize surfaces ``incomplete`` (then sync-failed) instead of looping
not-initialized     InitTorrent again (the destination lost its state), then resend
io, finalizing,     retry later (growing delay)
busy, qb-error ...
anything else       retry later, counted; give up after :data:`MAX_PIECE_FAILURES`
timeout             resend (counted as stale); the connection is closed by the wire layer if
                    the timeout hit mid-payload
connection closed   resend at once on another connection, not counted
==================  ===========================================================================

Memory is bounded by the in-flight budget (pieces read but not yet acknowledged), whatever
the queue length: the queue only holds (hash, index) pairs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from .. import metrics
from ..bitfield import Bitfield
from ..log import kv
from ..ratelimit import MiB, RateSchedule, make_limiter
from ..wire.errors import RETRYABLE, ConnectionClosed, ErrorCode, WireError
from ..wire.messages import InitResult, InitTorrent, PieceAck, SyncStatus
from .pool import Connection, ConnectionPool
from .reader import FileMissing, PieceReader, ReadError
from .state import Registry, Tracked

log = logging.getLogger("qbsync.source.sender")

MAX_PIECE_FAILURES = 5


def hash_mismatch_delay(retry_base: float, failures: int) -> float:
    """How long to wait before re-reading a piece the destination found corrupt for the
    ``failures``-th time (see :meth:`Senders._on_failure`)."""
    return min(30.0, retry_base * 0.5 * float(2 ** min(failures - 1, 5)))


INIT_TIMEOUT = 60.0
DEFAULT_INFLIGHT_BYTES = 64 * MiB  # read-ahead: enough to fill 8 connections' windows


@attrs.frozen
class _Stamps:
    """When a piece passed each stage on its way out (Trio clock), for the lag breakdown."""

    taken: float  # a sender took it from the queue
    budgeted: float  # its memory was reserved
    read: float  # it was read from disk
    picked: float  # a connection had room for it


class NotReady(Exception):
    """The destination cannot take this torrent's pieces now (verifying, unreachable...)."""


class InflightBytes:
    """Caps the piece bytes held in memory between the disk read and the ack."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, n: int) -> int:
        n = min(n, self.limit)  # a piece larger than the whole budget still goes, alone
        while self.used + n > self.limit:
            await self._lot.park()
        self.used += n
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._lot.unpark_all()

    def starved(self) -> bool:
        """A sender is waiting for memory: every byte allowed is between disk and ack."""
        return len(self._lot) > 0


def parse_needed(result: InitResult, num_pieces: int) -> Bitfield | None:
    """The pieces the destination still needs; None means "it has everything"."""
    if result.status == SyncStatus.COMPLETE:
        return None
    if result.pieces_needed_count == 0:
        return None
    if not result.pieces_needed:
        # READY without a bitfield: a fresh torrent, everything is needed.
        return Bitfield.full(num_pieces)
    return Bitfield(num_pieces, result.pieces_needed)


async def initialize(
    pool: ConnectionPool,
    registry: Registry,
    t: Tracked,
    *,
    resync: bool = False,
    force: bool = False,
) -> InitResult | None:
    """Send a full InitTorrent for ``t`` and adopt the destination's answer.

    Single-flight per torrent (``t.init_lock``): without ``force``, a caller that waited for
    another task's init of the same connection generation returns None without a request, and
    so does any caller once ``t`` is no longer tracked.
    Raises :class:`NotReady` when the destination's qBittorrent is verifying the torrent,
    and the pool's errors otherwise.
    """
    async with t.init_lock:
        generation = pool.generation
        resync = resync or t.resync_pending  # a selection change not yet told survives retries
        if not force and not resync and t.init_generation == generation:
            return None
        request: InitTorrent = await trio.to_thread.run_sync(
            lambda: t.meta.init_request(resync=resync)
        )
        if not t.active:
            # Untracked while this task waited (exclusion, removal): its AbortTorrent may be
            # on the wire already, and an InitTorrent after it would recreate the state the
            # abort just deleted.
            return None
        t.tracker.begin_resync()
        try:
            result: InitResult = await pool.request(request, within=INIT_TIMEOUT)
        except WireError as exc:
            if exc.code == ErrorCode.OWNED_BY_OTHER_SOURCE:
                # Another source syncs it into this destination: the orchestrator stops
                # tracking it and probes again later (then it is complete there).
                t.owned_by_other_source()
                registry.notify_changed()
            raise
        if result.status == SyncStatus.VERIFYING:
            raise NotReady("destination qBittorrent is verifying this torrent")
        t.tracker.apply_needed(parse_needed(result, t.tracker.num_pieces))
        t.initialized(generation)
        registry.enqueue(t, t.tracker.requeue_ready())
        log.info(
            "event=torrent_initialized hash=%s status=%s needed=%d have=%d pieces=%d "
            "resync=%s generation=%d",
            t.info_hash,
            result.status.value,
            result.pieces_needed_count,
            result.pieces_have_count,
            t.tracker.num_pieces,
            str(resync).lower(),
            generation,
        )
        if t.tracker.complete:
            registry.notify_changed()
        return result


class Senders:
    def __init__(
        self,
        registry: Registry,
        pool: ConnectionPool,
        reader: PieceReader,
        *,
        num_senders: int = 4,
        piece_timeout: float = 60.0,
        rate_limit: int | RateSchedule = 0,
        inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
        relocate: Callable[[Tracked], Awaitable[bool]] | None = None,
        retry_base: float = 1.0,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.reader = reader
        self.num_senders = max(1, num_senders)
        self.piece_timeout = piece_timeout
        self.bucket = make_limiter(rate_limit)
        self.budget = InflightBytes(inflight_bytes)
        # With the memory budget full, pieces cannot queue on the connections, which hides
        # from the pool that they are its bottleneck (each one window-limited): tell it.
        pool.memory_starved = self.budget.starved
        self._relocate = relocate
        self.retry_base = retry_base  # first retry delay after a retryable failure
        self._nursery: trio.Nursery | None = None
        self.inflight = 0
        metrics.sender_workers_configured.set(self.num_senders)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for wid in range(self.num_senders):
                nursery.start_soon(self._worker, wid)
            task_status.started()

    # -- the worker ---------------------------------------------------------------------------

    async def _worker(self, wid: int) -> None:
        queue = self.registry.queue
        while True:
            metrics.piece_queue_depth.set(len(queue))
            item = await queue.get()
            t = self.registry.get(item.info_hash)
            if t is None or item.index not in t.tracker.pending:
                continue
            # Make sure the destination knows the torrent (after a reconnect it may not)
            # *before* taking the piece: the answer may say it already has it.
            if t.init_generation != self.pool.generation:
                try:
                    await initialize(self.pool, self.registry, t)
                except (WireError, NotReady) as exc:
                    code = exc.code.value if isinstance(exc, WireError) else "verifying"
                    log.warning(
                        "event=init_failed hash=%s code=%s error=%s",
                        t.info_hash,
                        code,
                        kv(str(exc)),
                    )
                    self._requeue_later(t, item.index, 5 * self.retry_base)
                    continue
            if not t.active or not t.tracker.take(item.index):
                continue  # done after all, or untracked meanwhile
            if t.tracker.sends.get(item.index, 0) > 1:
                metrics.pieces_resent.inc()
            try:
                await self._prepare_and_send(t, item.index, trio.current_time())
            except BaseException:
                t.tracker.requeue(item.index)
                raise

    async def _prepare_and_send(self, t: Tracked, index: int, taken: float) -> None:
        """Everything up to handing the piece to a delivery task. On return, the piece has
        either been handed over or put back (released/failed) -- never lost."""
        # Reserve memory, read from disk.
        size = t.meta.geometry.piece_size(index)
        reserved = await self.budget.acquire(size)
        handed_over = False
        try:
            try:
                budgeted = trio.current_time()
                buf, view = await self._read(t, index)
                read = trio.current_time()
            except ReadError as exc:
                t.read_failed(str(exc))
                log.warning(
                    "event=piece_read_failed hash=%s piece=%d code=io error=%s",
                    t.info_hash,
                    index,
                    kv(str(exc)),
                )
                delay = min(30.0, 2 * self.retry_base * t.read_failures)
                self._fail_later(t, index, delay, count=False)
                return
            try:
                # Rate limit (global, payload bytes), then a connection.
                if self.bucket is not None:
                    wait = self.bucket.reserve(size, trio.current_time())
                    if wait > 0:
                        await trio.sleep(wait)
                conn = await self.pool.pick(nbytes=size)
                assert self._nursery is not None
                stamps = _Stamps(taken, budgeted, read, trio.current_time())
                self._nursery.start_soon(self._deliver, t, index, conn, buf, view, reserved, stamps)
                handed_over = True
            finally:
                if not handed_over:
                    self.reader.recycle(buf, view)
        finally:
            if not handed_over:
                self.budget.release(reserved)

    async def _read(self, t: Tracked, index: int) -> tuple[bytearray, memoryview]:
        try:
            return await self.reader.read(t.meta, index)
        except FileMissing:
            # Moved (temp -> save path, category change, .!qB rename): look again, retry once.
            if self._relocate is None or not await self._relocate(t):
                raise
            return await self.reader.read(t.meta, index)

    # -- delivery -----------------------------------------------------------------------------

    async def _deliver(
        self,
        t: Tracked,
        index: int,
        conn: Connection,
        buf: bytearray,
        view: memoryview,
        reserved: int,
        stamps: _Stamps,
    ) -> None:
        start = trio.current_time()
        self.inflight += 1
        metrics.inflight_pieces.set(self.inflight)
        try:
            with trio.move_on_after(self.piece_timeout) as scope:
                ack = await conn.send_piece(
                    t.info_hash, index, t.meta.geometry.piece_offset(index), view
                )
            if scope.cancelled_caught:
                metrics.stale_pieces.inc()
                log.warning(
                    "event=piece_timeout hash=%s piece=%d timeout_s=%g code=timeout",
                    t.info_hash,
                    index,
                    self.piece_timeout,
                )
                t.tracker.fail(index)
                self.registry.requeue(t, index)
                return
            self._on_ack(t, index, ack, start, len(view), stamps)
        except ConnectionClosed:
            t.tracker.requeue(index)
            self.registry.requeue(t, index)
        except WireError as exc:
            self._on_failure(t, index, exc.code, exc.message or str(exc))
        finally:
            self.inflight -= 1
            metrics.inflight_pieces.set(self.inflight)
            self.pool.unassign(conn, len(view))
            self.reader.recycle(buf, view)
            self.budget.release(reserved)

    def _on_ack(
        self, t: Tracked, index: int, ack: PieceAck, start: float, size: int, stamps: _Stamps
    ) -> None:
        now = trio.current_time()
        metrics.pieces_sent.inc()
        metrics.bytes_sent.inc(size)
        metrics.piece_send_duration.observe(now - start)
        metrics.piece_rtt.observe(now - start)
        if ack.code != ErrorCode.OK:
            self._on_failure(t, index, ack.code, ack.message)
            return
        self.pool.record_acked(size)
        if not t.tracker.ack(index):
            return  # untracked or resynced meanwhile
        metrics.pieces_acked.inc()
        first = t.tracker.first_seen.pop(index, None)
        if first is not None:
            metrics.piece_lag.observe(now - first)
        if log.isEnabledFor(logging.DEBUG):
            # Where the lag goes, per stage (bench/lag.py): seen = since the monitor saw
            # the piece ready; queue = waiting for a sender; budget = for --max-inflight
            # memory; read = disk; pick = for a connection with room; send = credit, the
            # socket, the destination's hash and write, the ack.
            log.debug(
                "event=piece_acked hash=%s piece=%d seen_ms=%.0f queue_ms=%.0f budget_ms=%.0f "
                "read_ms=%.0f pick_ms=%.0f send_ms=%.0f",
                t.info_hash,
                index,
                (now - first) * 1000 if first is not None else -1,
                (stamps.taken - first) * 1000 if first is not None else -1,
                (stamps.budgeted - stamps.taken) * 1000,
                (stamps.read - stamps.budgeted) * 1000,
                (stamps.picked - stamps.read) * 1000,
                (now - stamps.picked) * 1000,
            )
        if t.tracker.complete:
            log.info("event=torrent_streamed hash=%s pieces=%d", t.info_hash, t.tracker.num_pieces)
            self.registry.notify_changed()

    def _on_failure(self, t: Tracked, index: int, code: ErrorCode, message: str) -> None:
        metrics.pieces_failed.labels(code.value).inc()
        if code == ErrorCode.HASH_MISMATCH:
            metrics.piece_hash_mismatch.inc()
        if code == ErrorCode.NOT_INITIALIZED:
            t.uninitialized()
            t.tracker.fail(index, count=False)
            self.registry.requeue(t, index)
            log.info("event=piece_reinit hash=%s piece=%d code=%s", t.info_hash, index, code)
            return
        if code == ErrorCode.OWNED_BY_OTHER_SOURCE:
            # Another source took this torrent over on the destination: stop sending it; the
            # orchestrator untracks it and probes again later (see initialize()).
            t.tracker.fail(index, count=False)
            if not t.owned_elsewhere:
                t.owned_by_other_source()
                log.info("event=piece_refused hash=%s code=%s", t.info_hash, code.value)
                self.registry.notify_changed()
            return
        n = t.tracker.fail(index, requeue=False)
        level = logging.INFO if code in RETRYABLE else logging.WARNING
        log.log(
            level,
            "event=piece_failed hash=%s piece=%d code=%s failures=%d error=%s",
            t.info_hash,
            index,
            code.value,
            n,
            kv(message),
        )
        if code not in RETRYABLE and n >= MAX_PIECE_FAILURES:
            log.error(
                "event=piece_given_up hash=%s piece=%d code=%s failures=%d",
                t.info_hash,
                index,
                code.value,
                n,
            )
            t.tracker.give_up(index)
            if t.tracker.complete:
                self.registry.notify_changed()
            return
        t.tracker.pending.add(index)
        if code == ErrorCode.HASH_MISMATCH:
            # Re-read after a growing pause (half a retry_base, doubling: 7.5 s in all before
            # giving up at the default): the bytes on disk can lag what qBittorrent reports,
            # e.g. right after a selection change, while it moves a boundary piece out of its
            # .parts file. Re-reading at once would only read the same bytes again.
            self._requeue_later(t, index, hash_mismatch_delay(self.retry_base, n))
        else:
            self._requeue_later(t, index, min(30.0, self.retry_base * 2 ** min(n - 1, 5)))

    # -- retry helpers ------------------------------------------------------------------------

    def _fail_later(self, t: Tracked, index: int, delay: float, *, count: bool) -> None:
        t.tracker.fail(index, count=count, requeue=True)
        self._requeue_later(t, index, delay)

    def _requeue_later(self, t: Tracked, index: int, delay: float) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._requeue_after, t, index, delay)

    async def _requeue_after(self, t: Tracked, index: int, delay: float) -> None:
        await trio.sleep(delay)
        self.registry.requeue(t, index)

    def status(self) -> dict[str, Any]:
        return {
            "senders": self.num_senders,
            "inflight_pieces": self.inflight,
            "inflight_bytes": self.budget.used,
            "queued": len(self.registry.queue),
        }
