"""The Trio machinery both ends of a wire connection share.

:class:`BaseConnection` wraps a sans-IO :class:`~qbsync.wire.protocol.Endpoint` and a
:class:`~qbsync.wire.transport.Transport`: the handshake flights, one send lock for every
write, the receive loop (bytes -> endpoint -> events), keepalive pings with an idle timeout,
and closing with a stable code. The destination (:mod:`.server`) and the source
(:mod:`.client`) subclass it and add only what differs: which events they handle
(:meth:`BaseConnection._on_event`) and what they do with them.

* All writes go through one send lock. Small control frames are written under a shield with
  their own deadline (a cancelled caller must not leave half a frame on the stream); pieces
  are written by the client under the same lock, header then payload, never concatenated.
* The receive loop never waits for the send lock (a piece write blocked on a full TCP window
  would otherwise stop us from reading the acks that unblock it): pongs are skipped while
  another write is in progress, since any bytes prove liveness.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from .errors import ConnectionClosed, ErrorCode, LocalProtocolError, WireError
from .frames import END_OF_STREAM, NEED_DATA, ControlFrame, UndecodedControl
from .hooks import WireHooks
from .logfmt import kv
from .protocol import (
    Endpoint,
    HandshakeComplete,
    PeerClosed,
    PingReceived,
    PongReceived,
    ProtocolEvent,
)
from .transport import MIN_READ, READ_CHUNK, TRANSPORT_ERRORS, Transport, describe

log = logging.getLogger("qbsync.wire")

DEFAULT_PING_INTERVAL = 15.0
DEFAULT_IDLE_TIMEOUT = 60.0
CONTROL_SEND_TIMEOUT = 30.0  # a small frame that cannot be written in this long: peer is gone
# Control bodies above this are decoded on a worker thread: decoding is pure Python at roughly
# 2-5 s per 32 MiB of hostile input, and on the event loop that would silence /healthz, pings
# and every other connection for as long. Below it, a thread hop costs more than the decode.
DECODE_INLINE_MAX = 256 * 1024
DECODE_THREADS = 2  # large decodes at once, process-wide (each holds its body and its tree)
# Test-only fault injection: when set, a worker-thread decode waits, after decoding, until
# this file exists, so a test can observe what the daemon answers *while* a decode runs
# without relying on the decode being slow. Never set in production.
DECODE_HOLD_ENV = "QBSYNC_TEST_HOLD_DECODE"
_DECODE_HOLD_LIMIT = 300.0

_DECODE_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(
    "qbsync_decode_limiter"
)


def _decode_limiter_now() -> trio.CapacityLimiter:
    """The process's limiter for large decodes (one per Trio run, like Trio's own)."""
    try:
        return _DECODE_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(DECODE_THREADS)
        _DECODE_LIMITER.set(limiter)
        return limiter


def _decode_in_thread(event: UndecodedControl) -> ControlFrame | WireError:
    """Runs on a worker thread: the decoded frame, or the error (returned, not raised, so the
    endpoint sees it in its own error path)."""
    try:
        result: ControlFrame | WireError = event.decode()
    except WireError as exc:
        result = exc
    hold = os.environ.get(DECODE_HOLD_ENV)
    if hold:
        deadline = time.monotonic() + _DECODE_HOLD_LIMIT
        while not Path(hold).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return result


class BaseConnection:
    """One authenticated (or authenticating) connection; see the module docstring."""

    @property
    def peer_software(self) -> str:
        """What the peer announced in its Hello ("" before the handshake)."""
        return self._ep.peer_software

    def __init__(
        self,
        endpoint: Endpoint,
        stream: trio.abc.Stream,
        *,
        label: str,
        ping_interval: float,
        idle_timeout: float,
        hooks: WireHooks,
    ) -> None:
        self._ep = endpoint
        endpoint.decoder.decode_inline_max = DECODE_INLINE_MAX
        self._hooks = hooks
        self._tr = Transport(stream)
        self.label = label  # for logs: "peer=... conn=..."
        self._ping_interval = ping_interval
        self._idle_timeout = idle_timeout
        self._send_lock = trio.Lock()  # FIFO-fair
        # Read buffer. Handshake-sized until the peer has authenticated: an unauthenticated
        # connection must not pin a bulk buffer (many half-open handshakes would add up).
        self._scratch_view = memoryview(bytearray(MIN_READ))
        self._last_recv = trio.current_time()
        self._last_send = trio.current_time()
        self._recv_paused = False
        self._close_reason: ConnectionClosed | None = None
        self._closed_event = trio.Event()
        self._io_scope: trio.CancelScope | None = None

    # -- state -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._close_reason is not None

    @property
    def close_reason(self) -> ConnectionClosed | None:
        """Why the connection closed (``None`` while open)."""
        return self._close_reason

    async def wait_closed(self) -> ConnectionClosed:
        """Return once the connection has closed, with the reason."""
        await self._closed_event.wait()
        assert self._close_reason is not None
        return self._close_reason

    def _abort(self, reason: ConnectionClosed) -> None:
        """Mark closed, close the socket (waking blocked senders/receivers), stop the I/O
        tasks. Idempotent; the first reason wins."""
        if self._close_reason is not None:
            return
        self._close_reason = reason
        self._ep.close()
        self._on_closed(reason)
        self._closed_event.set()
        self._tr.close_now()
        if self._io_scope is not None:
            self._io_scope.cancel()

    def _on_closed(self, reason: ConnectionClosed) -> None:
        """Subclass hook: fail waiters."""

    def _closed_error(self) -> ConnectionClosed:
        reason = self._close_reason
        if reason is None:
            return ConnectionClosed("connection closed")
        return ConnectionClosed(reason.message, reason.code)

    # -- sending ---------------------------------------------------------------------------

    async def _send_control(self, build: Callable[[], bytes]) -> None:
        """Write small frames built by ``build()`` (called under the send lock, so request ids
        reach the wire in allocation order). The write itself is shielded from cancellation,
        with its own deadline: it is never left half-done."""
        await acquire(self._send_lock)
        try:
            if self.closed:
                raise self._closed_error()
            data = build()
            if not data:
                return
            # One scope: shielded from the caller's cancellation, with its own deadline.
            deadline = trio.current_time() + CONTROL_SEND_TIMEOUT
            with trio.CancelScope(shield=True, deadline=deadline) as cs:
                try:
                    await self._tr.send_all(data)
                except TRANSPORT_ERRORS as exc:
                    self._abort(ConnectionClosed(f"send failed: {describe(exc)}"))
                    raise self._closed_error() from None
            if cs.cancelled_caught:
                self._abort(
                    ConnectionClosed(
                        f"could not send for {CONTROL_SEND_TIMEOUT:.0f}s", ErrorCode.TIMEOUT
                    )
                )
                raise self._closed_error()
            self._last_send = trio.current_time()
        finally:
            self._send_lock.release()

    async def _send_best_effort(self, data: bytes, limit: float = 1.0) -> None:
        """Try to deliver a final frame (an Error) before closing; never raises."""
        if not data or self.closed:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(limit):
            try:
                async with self._send_lock:
                    await self._tr.send_all(data)
            except TRANSPORT_ERRORS:
                pass

    async def _flush(self) -> None:
        data = self._ep.data_to_send()
        if data:
            await self._send_control(lambda: data)

    async def _pong(self, payload: int) -> None:
        """Answer a ping, unless a write is in progress (its bytes prove liveness just as
        well). The receive loops must never wait for the send lock: a piece write blocked on
        a full TCP window would then stop us from reading the acks that unblock it."""
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            return
        try:
            if self.closed:
                return
            data = self._ep.send_pong(payload)
            with trio.CancelScope(shield=True), trio.move_on_after(CONTROL_SEND_TIMEOUT):
                try:
                    await self._tr.send_all(data)
                    self._last_send = trio.current_time()
                except TRANSPORT_ERRORS:
                    pass  # the receive side will see the broken stream
        finally:
            self._send_lock.release()

    async def _fail(self, code: ErrorCode, message: str) -> None:
        """Tell the peer why (best effort), then close."""
        await self._send_best_effort(self._ep.send_error(code, message))
        self._abort(ConnectionClosed(message, code))

    # -- receiving -------------------------------------------------------------------------

    async def _recv_into(self, view: memoryview) -> int:
        try:
            n = await self._tr.recv_into(view)
        except TRANSPORT_ERRORS as exc:
            if self.closed:
                raise self._closed_error() from None
            raise ConnectionClosed(f"receive failed: {describe(exc)}") from None
        self._last_recv = trio.current_time()
        return n

    async def _read_more(self) -> None:
        want = min(max(self._ep.decoder.bytes_wanted, MIN_READ), READ_CHUNK)
        n = await self._recv_into(self._scratch_view[:want])
        self._ep.receive_data(self._scratch_view[:n])

    async def _handshake(self, limit: float) -> HandshakeComplete:
        """Run the handshake flights; raises :class:`WireError` (after telling the peer)."""
        with trio.move_on_after(limit) as cs:
            try:
                return await self._handshake_steps()
            except WireError as exc:
                if not isinstance(exc, ConnectionClosed | LocalProtocolError):
                    await self._send_best_effort(self._ep.data_to_send())
                raise
        assert cs.cancelled_caught
        message = f"handshake not completed within {limit:g}s"
        await self._send_best_effort(self._ep.send_error(ErrorCode.TIMEOUT, message))
        raise WireError(ErrorCode.TIMEOUT, message)

    async def _handshake_steps(self) -> HandshakeComplete:
        peer = self._ep.peer_name
        while True:
            event = self._ep.next_event()
            await self._flush()
            if event is NEED_DATA:
                await self._read_more()
            elif isinstance(event, HandshakeComplete):
                self._scratch_view = memoryview(bytearray(READ_CHUNK))
                return event
            elif isinstance(event, PeerClosed):
                raise WireError(event.code, f"{peer} refused the connection: {event.message}")
            elif event is END_OF_STREAM:
                raise ConnectionClosed(f"{peer} closed the connection during the handshake")
            else:  # pragma: no cover - the endpoint emits nothing else before OPEN
                raise WireError(ErrorCode.PROTOCOL, f"unexpected {event!r} in the handshake")

    async def _keepalive(self) -> None:
        """Ping when quiet; close when the peer has been silent for ``idle_timeout``.

        Time spent deliberately not reading (waiting for the byte budget) does not count as
        the peer's silence. A ping is skipped while another write holds the send lock: that
        write proves we are alive, and waiting behind it would stall the idle check."""
        tick = max(min(self._ping_interval, self._idle_timeout) / 4, 0.01)
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            if self._recv_paused:
                self._last_recv = now
            elif now - self._last_recv > self._idle_timeout:
                await self._fail(
                    ErrorCode.TIMEOUT,
                    f"nothing received from the {self._ep.peer_name} for {self._idle_timeout:g}s",
                )
                return
            if now - self._last_send >= self._ping_interval and not self._send_lock.locked():
                try:
                    await self._send_control(self._ep.send_ping)
                except (ConnectionClosed, LocalProtocolError):
                    return

    @contextmanager
    def _not_reading(self) -> Iterator[None]:
        """Mark a wait during which we deliberately stop reading (the byte budget, a free
        request or piece slot): the peer's bytes then pile up unread, which is our slowness,
        not the peer's silence, so the idle timeout must not count it."""
        self._recv_paused = True
        try:
            yield
        finally:
            self._recv_paused = False

    # -- the receive loop ------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        """Read and dispatch events until the connection closes.

        Events both roles treat alike are handled here, the rest by :meth:`_on_event`. A
        protocol violation by the peer is logged and counted with its code, reported to the
        peer in an ``Error`` frame, and closes this connection only; our own misuse
        (:class:`LocalProtocolError`) propagates, since it is a bug on this side.
        """
        ep = self._ep
        peer = ep.peer_name
        try:
            while True:
                event = ep.next_event()
                if isinstance(event, UndecodedControl):
                    delivered = ep.deliver(await self._decode_off_loop(event))
                    if delivered is None:
                        continue
                    # ``event`` is then the one local holding the decoded message, and the
                    # next iteration replaces it: a multi-MiB InitTorrent is not kept idle.
                    event = delivered
                    del delivered
                if event is NEED_DATA:
                    await self._read_more()
                elif isinstance(event, PingReceived):
                    await self._pong(event.payload)
                elif isinstance(event, PongReceived):
                    pass
                elif isinstance(event, PeerClosed):
                    log.info(
                        "event=wire_peer_closed %s code=%s reason=%s",
                        self.label,
                        event.code.value,
                        kv(event.message),
                    )
                    reason = f"{peer} closed the connection: {event.message}"
                    self._abort(ConnectionClosed(reason, event.code))
                    return
                elif event is END_OF_STREAM:
                    self._abort(ConnectionClosed(f"{peer} closed the connection", ErrorCode.OK))
                    return
                else:
                    await self._on_event(event)
        except ConnectionClosed as exc:
            self._abort(exc)
        except LocalProtocolError:
            raise
        except WireError as exc:
            self._hooks.protocol_error(exc.code)
            log.warning(
                "event=wire_protocol_error %s code=%s reason=%s",
                self.label,
                exc.code.value,
                kv(exc.message),
            )
            await self._send_best_effort(ep.data_to_send())
            self._abort(ConnectionClosed(f"protocol error by the {peer}: {exc.message}", exc.code))

    async def _decode_off_loop(self, event: UndecodedControl) -> ControlFrame | WireError:
        """Decode a large control body on a worker thread. This connection reads nothing more
        meanwhile (its frames stay in order); every other task keeps running."""
        log.info(
            "event=wire_decode_started %s type=%d bytes=%d",
            self.label,
            event.type_code,
            len(event.body),
        )
        started = trio.current_time()
        result = await trio.to_thread.run_sync(
            _decode_in_thread, event, limiter=_decode_limiter_now()
        )
        log.info(
            "event=wire_decode_finished %s type=%d bytes=%d seconds=%.3f ok=%s",
            self.label,
            event.type_code,
            len(event.body),
            trio.current_time() - started,
            str(not isinstance(result, WireError)).lower(),
        )
        return result

    async def _on_event(self, event: ProtocolEvent) -> None:
        """Subclass hook: a role-specific event (requests and pieces on the destination,
        responses and credit on the source)."""
        raise WireError(ErrorCode.INTERNAL, f"unexpected event {event!r}")


async def acquire(lock: trio.Lock) -> None:
    """Take ``lock`` without a trip through the scheduler when it is free (the common case on
    the per-piece path, where every avoided task switch is measurable); wait fairly otherwise.
    Callers reach a real checkpoint right after (the write itself)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
