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

Waiting for room is event-driven: an acknowledged piece (:meth:`ConnectionPool.unassign`) and
a change on a connection (credit granted, a piece started, closed: the connection calls the
``on_change`` callback the pool gives it) wake :meth:`ConnectionPool.pick`; nothing polls.

Scaling (``--min-connections`` .. ``--max-connections``): every :data:`SCALE_INTERVAL` the
pool samples whether every connection had a piece waiting on it most of the time (for the
destination's credit, or for the socket: the connections were the bottleneck) and the
throughput, and lets :class:`~qbsync.source.growth.GrowthPolicy` decide: double while each
step adds throughput, then one at a time, undo a step that adds nothing, shrink after a
minute idle. Each decision is logged (``event=connection_scale direction=.. reason=..``)
and counted in ``qbsync_connection_scale_events_total{direction,reason}``.
On loopback and LAN one connection already saturates, so a step there is undone after a
couple of seconds and retried ever more rarely; the extra connections pay off on long fat
links, where one TCP window is the limit.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
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
from .growth import Action, Decision, GrowthPolicy, Sample

log = logging.getLogger("qbsync.source.pool")

HEALTHY_AFTER = 10.0  # a connection up this long resets the reconnect backoff
RECONNECT_BASE = 0.5
SCALE_INTERVAL = 0.5  # one growth decision per interval (short: a step is judged in ~1.5 s)
SAMPLE_INTERVAL = 0.05  # "is every connection the bottleneck" is sampled this often
QUEUE_AHEAD = 1  # pieces that may wait on one connection before pick() waits for room
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

    #: Called (synchronously) when credit or in-flight bytes change or the connection closes.
    on_change: Callable[[], None]

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
        self.connected_since: float | None = None  # Unix time; None while disconnected
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
        # Set by the senders: True while one waits for --max-inflight memory (see _saturated).
        self.memory_starved: Callable[[], bool] = lambda: False
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
                    # Set by acks (unassign) and by every connection's on_change.
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

    def _changed(self) -> None:
        """A connection's credit or in-flight bytes changed: re-look for room."""
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
        conn.on_change = self._changed
        if not was_connected:
            self.generation += 1
            self.connected_since = time.time()  # for the status page's peer list
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
        if not self.connected:
            self.connected_since = None
        metrics.connections_active.set(self.connected)
        log.info("event=destination_disconnected conn=%d connections=%d", slot.id, self.connected)

    # -- scaling ----------------------------------------------------------------------------

    async def _scaler(self) -> None:
        """Feed :class:`~qbsync.source.growth.GrowthPolicy` one sample per
        :data:`SCALE_INTERVAL` and carry out its decisions; also keeps the throughput gauge
        current."""
        policy = GrowthPolicy(self.min_connections, self.max_connections)
        last_bytes = self.bytes_acked
        last_time = trio.current_time()
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
            active = [s for s in self._slots if not s.retiring]
            sample = Sample(
                throughput=throughput,
                slots=len(active),
                connected=sum(1 for s in active if s.conn is not None and not s.conn.closed),
                saturated=starved > samples // 2,
                demand=self._queue_depth() > 0 or any(_busy(s) for s in active) or starved > 0,
            )
            decision = policy.step(now, sample)
            self._apply(decision, sample, active)

    def _apply(self, decision: Decision, sample: Sample, active: list[_Slot]) -> None:
        gain = "" if decision.gain is None else f" gain={decision.gain:.2f}"
        if decision.action is Action.ADD:
            for _ in range(decision.count):
                self._add_slot()
            after = len(active) + decision.count
        elif decision.action is Action.RETIRE:
            # The newest first: a failed step's own connections, or the last ones grown.
            for slot in active[len(active) - decision.count :]:
                self._nursery_start(self._retire, slot)
            after = len(active) - decision.count
        else:
            if decision.reason:  # a step judged and kept
                log.info(
                    "event=connection_scale_kept reason=%s%s throughput_Bps=%.0f connections=%d",
                    decision.reason,
                    gain,
                    sample.throughput,
                    len(active),
                )
            return
        metrics.connection_scale_events.labels(decision.action.value, decision.reason).inc(
            decision.count
        )
        log.info(
            "event=connection_scale direction=%s reason=%s count=%d%s throughput_Bps=%.0f "
            "connections=%d",
            decision.action.value,
            decision.reason,
            decision.count,
            gain,
            sample.throughput,
            after,
        )

    def _saturated(self, c: Connection) -> bool:
        """``c`` is the bottleneck right now: a piece is waiting on it (for credit or for the
        socket), or it is out of credit while pieces wait in the queue, or it is carrying
        pieces while every byte of the in-flight memory budget is taken and pieces wait (then
        nothing can queue on a connection, though the connections are what holds the bytes:
        window-limited, each one drains slower than the path could)."""
        if c.closed:
            return True
        hint = self._piece_hint
        if self.queued_bytes(c) >= hint:
            return True
        if self._queue_depth() == 0:
            return False
        return c.credit < hint or (c.inflight_bytes > 0 and self.memory_starved())

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
    instance: str = "",
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
            instance=instance,
        )

    return connect
