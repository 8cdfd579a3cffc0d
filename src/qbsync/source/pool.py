"""The connections to the destination: open, authenticate, reconnect, scale.

Each connection lives in its own task (a *slot*) under the pool's nursery. A slot connects
with :func:`qbsync.wire.open_connection`, serves senders until the connection ends, then
waits a jittered exponential backoff (up to ``--reconnect-max-delay``) and connects again.
The backoff resets once a connection has stayed up for :data:`HEALTHY_AFTER` seconds, so an
error days later starts again at half a second (docs/design-decisions.md#reconnect-backoff-resets).

A failed handshake is logged with its stable code: a wrong token logs ``code=auth-failed``
at error level on every attempt (rate-limited to the backoff), transfers nothing, and keeps
retrying, so fixing the token on the destination heals the source without a restart.

Senders get a connection with :meth:`ConnectionPool.pick` just before a piece can go: the one
that can take the most now (credit minus pieces already queued on it), and only once some
connection has fewer than :data:`QUEUE_AHEAD` pieces waiting, so pieces spread by what each
connection can carry rather than by what was assigned long ago.

Scaling (``--min-connections`` .. ``--max-connections``): every :data:`SCALE_INTERVAL` the
pool looks at whether every connection had a piece waiting on it most of the time (for the
destination's credit, or for the socket: the connections were the bottleneck). After two
such intervals in a row it opens one more connection and keeps it only if the mean throughput
over :data:`JUDGE_INTERVALS` intervals after it connected is at least :data:`MIN_GAIN` above
the mean before; otherwise it closes it and waits :data:`COOLDOWN` before trying again (if the
work ran out meanwhile there is nothing to judge and it stays).
Connections above the minimum are closed after :data:`IDLE_AFTER` seconds without traffic.
On loopback and LAN one connection already saturates, so the pool stays at the minimum
there; the extra connections pay off on long fat links, where one TCP window is the limit.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .. import metrics
from ..log import kv
from ..ratelimit import Backoff
from ..wire.address import HostPort
from ..wire.errors import ConnectionClosed, ErrorCode, WireError, leaf_exceptions
from ..wire.keys import Admission
from ..wire.messages import PieceAck, RequestMessage
from .codes import Code, SourceCode

log = logging.getLogger("qbsync.source.pool")

HEALTHY_AFTER = 10.0  # a connection up this long resets the reconnect backoff
RECONNECT_BASE = 0.5
SCALE_INTERVAL = 1.0
SAMPLE_INTERVAL = 0.1
MIN_GAIN = 0.10
COOLDOWN = 60.0
JUDGE_INTERVALS = 3  # a trial compares mean throughput over this many intervals before/after
TRIAL_MAX = 12  # intervals a trial connection gets to connect before it is judged anyway
IDLE_AFTER = 60.0
QUEUE_AHEAD = 1  # pieces that may wait on one connection before pick() waits for room
ROOM_POLL = 0.005  # seconds; re-look for room this often while every connection is full
RETIRE_GRACE = 30.0  # how long a retiring connection may finish its in-flight pieces


R = TypeVar("R")  # the result type of a request (InitTorrent -> InitResult, ...)


class Connection(Protocol):
    """What the pool and senders use of :class:`qbsync.wire.ClientConnection`."""

    @property
    def closed(self) -> bool: ...

    @property
    def inflight_bytes(self) -> int: ...

    @property
    def credit(self) -> int: ...

    async def request(self, msg: RequestMessage[R], *, timeout: float) -> R: ...  # noqa: ASYNC109

    async def wait_closed(self) -> ConnectionClosed: ...

    async def send_piece(
        self, info_hash: str, index: int, offset: int, data: bytes | bytearray | memoryview
    ) -> PieceAck: ...


Connector = Callable[[], contextlib.AbstractAsyncContextManager[Connection]]


class DestinationUnavailable(WireError):
    """No authenticated connection to the destination within the caller's deadline."""

    def __init__(self, message: str = "no connection to the destination") -> None:
        super().__init__(ErrorCode.TIMEOUT, message)


@attrs.define(eq=False)
class _Slot:
    id: int
    conn: Connection | None = None
    retiring: bool = False
    scope: trio.CancelScope | None = None


def describe_error(exc: BaseException) -> tuple[Code, str] | None:
    """(code, message) for an exception that ended a connection attempt.

    None means "not a connection error": cancellation or a base exception that must
    propagate. Exception groups (from the connection's internal nursery) are unwrapped.
    """
    if isinstance(exc, BaseExceptionGroup):
        leaves = leaf_exceptions(exc)
        if any(not isinstance(e, Exception) for e in leaves):
            return None
        wire = [e for e in leaves if isinstance(e, WireError)]
        exc = wire[0] if wire else leaves[0]
    if isinstance(exc, WireError):
        return exc.code, exc.message or str(exc)
    if isinstance(exc, OSError):
        return SourceCode.CONNECT_FAILED, exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
        return SourceCode.CONNECTION_LOST, str(exc) or type(exc).__name__
    if isinstance(exc, trio.TooSlowError):
        return ErrorCode.TIMEOUT, "connect timed out"
    if isinstance(exc, Exception):
        return ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
    return None


def _retiring(slot: _Slot) -> bool:
    return slot.retiring


def _busy(slot: _Slot) -> bool:
    return slot.conn is not None and not slot.conn.closed and slot.conn.inflight_bytes > 0


async def wait_closed(conn: Connection) -> tuple[Code, str]:
    """Return (code, message) once ``conn`` has closed."""
    reason = await conn.wait_closed()
    if reason.code != ErrorCode.OK:
        return reason.code, reason.message or str(reason)
    return SourceCode.CONNECTION_LOST, reason.message or "connection closed"


class ConnectionPool:
    def __init__(
        self,
        connect: Connector,
        *,
        address: str,
        min_connections: int = 1,
        max_connections: int = 1,
        reconnect_max_delay: float = 30.0,
        queue_depth: Callable[[], int] = lambda: 0,
    ) -> None:
        self._connect = connect
        self.address = address
        self.min_connections = max(1, min_connections)
        self.max_connections = max(self.min_connections, max_connections)
        self.reconnect_max_delay = reconnect_max_delay
        self._queue_depth = queue_depth
        self._slots: list[_Slot] = []
        self._next_id = 0
        self._available = trio.Event()
        self._room = trio.Event()  # set when an assigned piece finishes
        self._assigned: dict[int, int] = {}  # id(connection) -> bytes assigned, not yet done
        self.generation = 0  # +1 each time the pool goes from no connection to some
        self.last_error: tuple[Code, str] | None = None
        self.bytes_acked = 0
        self._piece_hint = 1  # size of a recent piece: "out of credit" means less than this
        self._nursery: trio.Nursery | None = None
        metrics.connections_configured.set(self.max_connections)
        metrics.connections_active.set(0)

    # -- public -----------------------------------------------------------------------------

    @property
    def connected(self) -> int:
        return sum(1 for s in self._slots if s.conn is not None and not s.conn.closed)

    def connections(self) -> list[Connection]:
        return [s.conn for s in self._slots if s.conn is not None and not s.conn.closed]

    def queued_bytes(self, conn: Connection) -> int:
        """Bytes of pieces assigned to ``conn`` that it has not started writing yet (waiting
        for credit, or for the socket)."""
        return max(0, self._assigned.get(id(conn), 0) - conn.inflight_bytes)

    def _headroom(self, conn: Connection) -> int:
        """What ``conn`` can take now: its credit minus what already waits for it."""
        return conn.credit - self.queued_bytes(conn)

    async def pick(self, within: float = float("inf"), *, nbytes: int = 0) -> Connection:
        """The open connection that can take the most now (credit minus pieces already
        queued on it; then fewest bytes queued + in flight); waits up to ``within`` seconds
        for one to exist, then raises :class:`DestinationUnavailable`.

        ``nbytes`` > 0 assigns a piece of that size to the connection until
        :meth:`unassign`, and first waits until some connection has fewer than
        :data:`QUEUE_AHEAD` pieces queued: a piece is bound to a connection only shortly
        before it can go, so a fast connection is not left idle while a slow one holds a
        long queue (and the scaler sees that every connection has work waiting)."""
        with trio.move_on_after(within):
            while True:
                best: Connection | None = None
                best_key = (0, 0)
                for s in self._slots:
                    c = s.conn
                    if c is None or c.closed or s.retiring:
                        continue
                    key = (-self._headroom(c), self.queued_bytes(c) + c.inflight_bytes)
                    if best is None or key < best_key:
                        best, best_key = c, key
                if best is not None and (
                    not nbytes or self.queued_bytes(best) < QUEUE_AHEAD * max(nbytes, 1)
                ):
                    if nbytes:
                        self._assigned[id(best)] = self._assigned.get(id(best), 0) + nbytes
                    return best
                if best is None:
                    if self._available.is_set():
                        self._available = trio.Event()
                    await self._available.wait()
                else:
                    if self._room.is_set():
                        self._room = trio.Event()
                    # Acks set ``_room``; a write starting does not, hence the short timeout.
                    with trio.move_on_after(ROOM_POLL):
                        await self._room.wait()
        raise DestinationUnavailable()

    def unassign(self, conn: Connection, nbytes: int) -> None:
        """A piece given out by ``pick(nbytes=...)`` was acknowledged or failed."""
        left = self._assigned.get(id(conn), 0) - nbytes
        if left > 0:
            self._assigned[id(conn)] = left
        else:
            self._assigned.pop(id(conn), None)
        self._room.set()

    async def request(self, msg: RequestMessage[R], *, within: float = 30.0) -> R:
        """Send one control request; retried once on another connection if the first one
        closes under it (every request of the protocol is idempotent).

        Raises :class:`DestinationUnavailable` when no connection comes up in time, the
        peer's :class:`WireError`, or :class:`ConnectionClosed`.
        """
        deadline = trio.current_time() + within
        for attempt in (1, 2):
            conn = await self.pick(max(0.0, deadline - trio.current_time()))
            try:
                return await conn.request(msg, timeout=max(0.1, deadline - trio.current_time()))
            except ConnectionClosed:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def record_acked(self, nbytes: int) -> None:
        self.bytes_acked += nbytes
        self._piece_hint = nbytes

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self.min_connections):
                self._add_slot()
            nursery.start_soon(self._scaler)  # also keeps the throughput gauge current
            task_status.started()

    # -- slots ------------------------------------------------------------------------------

    def _add_slot(self) -> _Slot:
        assert self._nursery is not None
        slot = _Slot(self._next_id)
        self._next_id += 1
        self._slots.append(slot)
        self._nursery.start_soon(self._slot_loop, slot)
        return slot

    async def _retire(self, slot: _Slot) -> None:
        """Stop sending new pieces on ``slot``, let its in-flight ones finish, close it."""
        slot.retiring = True
        with trio.move_on_after(RETIRE_GRACE):
            # Pieces already given to it (in flight or queued for its credit) go out first.
            while _busy(slot) or (  # noqa: ASYNC110  (polled: the wire has no "drained" event)
                slot.conn is not None and self._assigned.get(id(slot.conn), 0) > 0
            ):
                await trio.sleep(0.1)
        if slot.scope is not None:
            slot.scope.cancel()

    async def _slot_loop(self, slot: _Slot) -> None:
        backoff = Backoff(RECONNECT_BASE, self.reconnect_max_delay)
        with trio.CancelScope() as scope:
            slot.scope = scope
            try:
                while not slot.retiring:
                    up_for = await self._connect_once(slot)
                    if up_for >= HEALTHY_AFTER:
                        backoff.reset()
                    if _retiring(slot):  # (re-read: it changes while we await)
                        break
                    delay = backoff.next_delay()
                    code, message = self.last_error or (SourceCode.CONNECTION_LOST, "")
                    event = (
                        "destination_connection_lost" if up_for else "destination_connect_failed"
                    )
                    # Configuration problems only an operator fixes: an error, not a warning.
                    level = logging.ERROR if code in _OPERATOR_CODES else logging.WARNING
                    log.log(
                        level,
                        "event=%s conn=%d addr=%s code=%s retry_in_s=%.1f attempt=%d error=%s",
                        event,
                        slot.id,
                        self.address,
                        code,
                        delay,
                        backoff.failures,
                        kv(message),
                    )
                    metrics.stream_reconnects.inc()
                    await trio.sleep(delay)
            finally:
                self._slots.remove(slot)

    async def _connect_once(self, slot: _Slot) -> float:
        """One connection's life. Returns how long it was up (0 if it never came up)."""
        started = 0.0
        try:
            async with self._connect() as conn:
                started = trio.current_time()
                self._attach(slot, conn)
                self.last_error = await wait_closed(conn)
        except BaseException as exc:
            described = describe_error(exc)
            if described is None:
                raise
            self.last_error = described
            if described[0] == ErrorCode.INTERNAL:
                log.error(
                    "event=destination_connection_error conn=%d code=internal",
                    slot.id,
                    exc_info=exc,
                )
        finally:
            self._detach(slot)
        return trio.current_time() - started if started else 0.0

    def _attach(self, slot: _Slot, conn: Connection) -> None:
        was_connected = self.connected > 0
        slot.conn = conn
        if not was_connected:
            self.generation += 1
        self.last_error = None
        metrics.connections_active.set(self.connected)
        log.info(
            "event=destination_connected conn=%d addr=%s connections=%d generation=%d",
            slot.id,
            self.address,
            self.connected,
            self.generation,
        )
        self._available.set()

    def _detach(self, slot: _Slot) -> None:
        if slot.conn is None:
            return
        slot.conn = None
        metrics.connections_active.set(self.connected)
        log.info("event=destination_disconnected conn=%d connections=%d", slot.id, self.connected)

    # -- scaling ----------------------------------------------------------------------------

    async def _scaler(self) -> None:
        cooldown_until = 0.0
        trial: tuple[_Slot, float] | None = None  # (added slot, throughput before)
        trial_age = trial_connected = 0  # intervals since it was added / until it connected
        history: list[float] = []  # throughput of the last JUDGE_INTERVALS intervals
        starved_run = 0  # consecutive intervals in which the connections were the bottleneck
        last_bytes = self.bytes_acked
        last_time = trio.current_time()
        last_traffic = last_time
        while True:
            starved = samples = 0
            end = trio.current_time() + SCALE_INTERVAL
            while trio.current_time() < end:
                await trio.sleep(SAMPLE_INTERVAL)
                conns = [s.conn for s in self._slots if s.conn is not None and not s.retiring]
                samples += 1
                if conns and all(self._saturated(c) for c in conns):
                    starved += 1
            now = trio.current_time()
            throughput = (self.bytes_acked - last_bytes) / max(1e-6, now - last_time)
            last_bytes, last_time = self.bytes_acked, now
            metrics.transfer_throughput.set(throughput)
            history = [*history[-(JUDGE_INTERVALS - 1) :], throughput]
            starved_run = starved_run + 1 if starved > samples // 2 else 0
            if throughput > 0:
                last_traffic = now
            active = [s for s in self._slots if not s.retiring]
            if trial is not None:
                trial_age += 1
                # Judge the new connection on a whole interval after the one it connected in
                # (that one is not a fair sample); give up waiting for it to connect after a
                # few intervals.
                connected = trial[0].conn is not None
                if trial_age < TRIAL_MAX and (
                    not connected or trial_age - trial_connected < 1 + JUDGE_INTERVALS
                ):
                    if connected and not trial_connected:
                        trial_connected = trial_age
                    continue
            if trial is not None:
                slot, before = trial
                trial = None
                after = sum(history[-JUDGE_INTERVALS:]) / JUDGE_INTERVALS
                gain = (after - before) / before if before > 0 else 0.0
                if starved == 0 and self._queue_depth() == 0:
                    # The work ran out meanwhile: nothing to judge it by. It stays until it
                    # has been idle for IDLE_AFTER, like any connection above the minimum.
                    log.info(
                        "event=connection_scale_kept reason=no_demand connections=%d", len(active)
                    )
                elif gain < MIN_GAIN and slot in self._slots:
                    log.info(
                        "event=connection_scale direction=down reason=no_gain gain=%.2f "
                        "connections=%d",
                        gain,
                        len(active) - 1,
                    )
                    metrics.connection_scale_events.labels("down").inc()
                    self._nursery_start(self._retire, slot)
                    cooldown_until = now + COOLDOWN
                    continue
                else:
                    log.info(
                        "event=connection_scale_kept gain=%.2f connections=%d", gain, len(active)
                    )
            if self.max_connections <= self.min_connections:
                continue
            if starved_run >= 2 and len(active) < self.max_connections and now >= cooldown_until:
                new = self._add_slot()
                recent = history[-min(starved_run, JUDGE_INTERVALS) :]
                before = sum(recent) / len(recent)
                trial, trial_age, trial_connected = (new, before), 0, 0
                metrics.connection_scale_events.labels("up").inc()
                log.info(
                    "event=connection_scale direction=up reason=credit_starved "
                    "throughput_Bps=%.0f connections=%d",
                    throughput,
                    len(active) + 1,
                )
            elif now - last_traffic > IDLE_AFTER and len(active) > self.min_connections:
                slot = active[-1]
                metrics.connection_scale_events.labels("down").inc()
                log.info(
                    "event=connection_scale direction=down reason=idle connections=%d",
                    len(active) - 1,
                )
                self._nursery_start(self._retire, slot)

    def _saturated(self, c: Connection) -> bool:
        """``c`` is the bottleneck right now: a piece is waiting on it (for credit or for the
        socket), or it is out of credit while pieces wait in the queue."""
        if c.closed:
            return True
        hint = self._piece_hint
        return self.queued_bytes(c) >= hint or (c.credit < hint and self._queue_depth() > 0)

    def _nursery_start(self, fn: Callable[[_Slot], Any], slot: _Slot) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, slot)


_OPERATOR_CODES = frozenset(
    c.value for c in (ErrorCode.AUTH_FAILED, ErrorCode.UNKNOWN_PEER, ErrorCode.UPGRADE_REQUIRED)
)


def make_connector(
    addr: HostPort,
    *,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None = None,
    connect_timeout: float = 10.0,
    identity: Ed25519PrivateKey | None = None,
    admission: Admission | None = None,
) -> Connector:
    """A :data:`Connector` opening real wire connections."""
    from ..wire import ADMIT_ANY, open_connection

    def connect() -> contextlib.AbstractAsyncContextManager[Connection]:
        return open_connection(
            addr,
            token=token,
            identity=identity,
            admission=admission if admission is not None else ADMIT_ANY,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            connect_timeout=connect_timeout,
            hooks=metrics.WIRE_METRICS,
        )

    return connect
