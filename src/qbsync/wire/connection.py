"""The Trio shell around the sans-IO :class:`~qbsync.wire.protocol.Endpoint`.

Destination side: :func:`serve` accepts connections and runs one task per connection; each
authenticated connection calls the :class:`ServerHandler` for requests and pieces. Source side:
:func:`open_connection` is an async context manager yielding a :class:`ClientConnection` that
multiplexes requests and pieces over one TCP (or TLS) stream.

Structure (every task has a parent nursery):

* per connection, a *receive loop* (bytes -> endpoint -> events) and a *keepalive* task (ping
  when we have been quiet, close with ``timeout`` when the peer has been silent for
  ``idle_timeout``) run in the connection's I/O nursery; on the destination, request and piece
  handlers run in a second nursery that outlives the I/O one by at most ``close_grace`` so a
  handler in the middle of a write is not torn apart by a disconnect;
* all writes go through one send lock. Small control frames are written under a shield with
  their own deadline (a cancelled caller must not leave half a frame on the stream); a piece is
  written as its 64-byte header and then the caller's buffer, never concatenated. Cancelling a
  piece send mid-write closes the connection (the stream cannot be resynchronized).

Memory on the destination is bounded by configuration, not by the peers:

* a piece's size is charged to the shared :class:`ByteBudget` *before* its body is read (while
  waiting, the connection simply stops reading, and TCP pushes back on the sender); the charge is
  released when ``handle_piece`` returns, and the piece's credit is granted back after its ack;
* the body is received straight into one buffer of exactly the piece's size with ``recv_into``
  (for plain TCP): no intermediate chunks, no re-slicing;
* control frames are limited to ``MAX_CONTROL_FRAME`` and the number of concurrently handled
  requests per connection is capped (reading stops at the cap), pieces per connection are
  bounded by the credit window.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, Protocol, overload

import attrs
import trio

from .. import metrics
from ..config import HostPort
from ..log import kv
from . import messages as m
from .errors import ConnectionClosed, ErrorCode, LocalProtocolError, WireError
from .frames import END_OF_STREAM, NEED_DATA, PIECE_HEADER_SIZE, PieceStart
from .protocol import (
    DEFAULT_MAX_PIECE,
    DEFAULT_WINDOW,
    CreditReceived,
    Endpoint,
    HandshakeComplete,
    PeerClosed,
    PingReceived,
    PongReceived,
    Request,
    RequestReceived,
    Response,
    ResponseReceived,
)

log = logging.getLogger("qbsync.wire")

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_PING_INTERVAL = 15.0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_CLOSE_GRACE = 10.0
DEFAULT_MAX_CONCURRENT_REQUESTS = 32
DEFAULT_MAX_CONCURRENT_PIECES = 256
CONTROL_SEND_TIMEOUT = 30.0  # a small frame that cannot be written in this long: peer is gone
# Unsent bytes the kernel may queue before the socket stops being writable. Trio sets 16 KiB
# (good for latency); bulk piece streams want much more (field notes B.4: 4 MiB lifted trio
# loopback throughput from ~2.5 to ~3.2 GB/s).
BULK_NOTSENT_LOWAT = 4 * 1024 * 1024
READ_CHUNK = 256 * 1024  # largest read into the scratch buffer
MIN_READ = 16 * 1024  # smallest read (header-sized reads would cost a syscall per frame)
TLS_READ_CHUNK = 64 * 1024  # SSLStream allocates max_bytes per read; records are 16 KiB
BULK_YIELD_BYTES = 8 * 1024 * 1024  # a piece body read yields to other tasks at least this often

_conn_ids = itertools.count(1)


# --- budget ---------------------------------------------------------------------------------


class ByteBudget:
    """The destination's global budget of piece bytes held in memory (``--max-stream-buffer``),
    shared by every connection.

    A FIFO byte semaphore: waiters are served strictly in arrival order, so a large piece is not
    starved by a stream of small ones. A request larger than :attr:`limit` is charged as
    :attr:`limit` (it then waits for the budget to be completely free), so any single piece up
    to the protocol maximum can make progress; memory stays bounded by ``max(limit, largest
    piece)``.

    It also recycles piece buffers (:meth:`take_buffer` / :meth:`recycle`). Allocating a fresh
    multi-MiB ``bytearray`` per piece costs a page fault per 4 KiB and a zero-fill, which
    measured at ~3x the cost of receiving the bytes; reusing buffers of the same size (pieces of
    a torrent all have one size) removes that. Pooled buffers count against the limit too
    (``used + pooled <= limit``, the pool is trimmed as charges grow) and the pool is capped at
    :data:`POOL_MAX` so an idle daemon does not sit on a burst's worth of memory.
    """

    POOL_MAX = 64 * 1024 * 1024

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the byte budget must be positive")
        self.limit = limit
        self.used = 0  # bytes of received-but-not-yet-handled piece payload
        self.peak = 0  # high-water mark of ``used`` (for tests and the benchmark)
        self.pooled = 0  # bytes of idle buffers kept for reuse
        self._pool: dict[int, list[bytearray]] = {}
        self._pool_max = min(self.POOL_MAX, limit // 4)
        self._waiters: collections.deque[list[Any]] = collections.deque()
        metrics.write_buffer_limit_bytes.set(limit)

    def take_buffer(self, nbytes: int) -> bytearray:
        """A buffer of exactly ``nbytes`` (recycled if possible; contents are undefined)."""
        free = self._pool.get(nbytes)
        if free:
            self.pooled -= nbytes
            buf = free.pop()
            if not free:
                del self._pool[nbytes]
            return buf
        return bytearray(nbytes)

    def recycle(self, buf: bytearray) -> None:
        """Offer a buffer nobody references any more back for reuse (call before releasing its
        charge)."""
        n = len(buf)
        if n and self.pooled + n <= self._pool_max and self.pooled + self.used <= self.limit:
            self._pool.setdefault(n, []).append(buf)
            self.pooled += n

    def _trim_pool(self) -> None:
        while self._pool and self.pooled + self.used > self.limit:
            size = next(iter(self._pool))
            free = self._pool[size]
            free.pop()
            self.pooled -= size
            if not free:
                del self._pool[size]

    def charge_for(self, nbytes: int) -> int:
        return min(nbytes, self.limit)

    @property
    def available(self) -> int:
        return self.limit - self.used

    async def acquire(self, nbytes: int) -> int:
        """Wait until ``nbytes`` (capped at :attr:`limit`) fit, take them, and return the
        amount actually charged: pass exactly that to :meth:`release`."""
        charge = self.charge_for(nbytes)
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._waiters and self.used + charge <= self.limit:
            # Fast path without a scheduler round trip: the caller's next step is I/O (a
            # checkpoint), and this runs once per piece.
            self._take(charge)
            return charge
        entry: list[Any] = [charge, trio.Event()]
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():  # granted just as we were cancelled: give it back
                self.release(charge)
            else:
                self._waiters.remove(entry)
                self._wake()
            raise
        return charge

    def release(self, charge: int) -> None:
        if not 0 <= charge <= self.used:
            raise ValueError(f"releasing {charge} bytes with {self.used} in use")
        self.used -= charge
        metrics.write_buffer_bytes.set(self.used)
        self._wake()

    def _take(self, charge: int) -> None:
        self.used += charge
        self.peak = max(self.peak, self.used)
        self._trim_pool()
        metrics.write_buffer_bytes.set(self.used)

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            charge, event = self._waiters.popleft()
            self._take(charge)
            event.set()


# --- server-side API ------------------------------------------------------------------------


@attrs.frozen
class Peer:
    """The source on the other end of a destination connection."""

    address: str  # "ip:port"
    conn_id: int


class ServerHandler(Protocol):
    """What the destination plugs into :func:`serve`.

    Both methods run in tasks of the connection's handler nursery. If the connection closes
    while a handler runs, the handler is allowed ``close_grace`` seconds to finish (its answer
    is then dropped) before it is cancelled; when :func:`serve` itself is cancelled, handlers
    are cancelled at once.
    """

    async def handle_request(self, peer: Peer, request: Request) -> Response:
        """Answer a request with its result type (``InitTorrent`` -> ``InitResult``, ...).

        Raise :class:`WireError` to answer with ``Error(code, message)``; any other exception
        answers ``Error(internal)`` and is logged with its traceback. The connection stays up.
        """
        ...

    async def handle_piece(self, peer: Peer, piece: m.Piece) -> m.PieceAck:
        """Check and store one piece; return its ack (with a code on failure).

        ``piece.data`` is a memoryview of the whole piece, charged to the budget, valid only
        until this returns: the buffer is recycled for a later piece, so keep no reference and
        never hand it to a thread that may outlive this call (``trio.to_thread.run_sync``
        without ``abandon_on_cancel`` is fine: it returns only once the thread is done).
        Called concurrently for several pieces of one connection. Exceptions are answered like
        :meth:`handle_request`'s.
        """
        ...


# --- transport ------------------------------------------------------------------------------

_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _socket_stream(stream: trio.abc.Stream) -> trio.SocketStream | None:
    if isinstance(stream, trio.SocketStream):
        return stream
    if isinstance(stream, trio.SSLStream):
        inner = stream.transport_stream
        return inner if isinstance(inner, trio.SocketStream) else None
    return None


def tune_socket(stream: trio.SocketStream) -> None:
    """Bulk-transfer socket options (see :data:`BULK_NOTSENT_LOWAT`). Socket buffer sizes are
    left to Linux autotuning on purpose: setting ``SO_SNDBUF``/``SO_RCVBUF`` disables it and is
    capped by ``net.core.[rw]mem_max`` (often ~200 KiB), which would *lower* throughput."""
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with suppress(OSError):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, BULK_NOTSENT_LOWAT)


class _Transport:
    """Stream plus a zero-copy ``recv_into`` when the stream is a plain TCP socket."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.sock_stream = _socket_stream(stream)
        self._raw = stream.socket if isinstance(stream, trio.SocketStream) else None
        # The readv/writev fast paths need a POSIX socket fd (Linux, BSD, macOS).
        self._vectored = self._raw is not None and hasattr(os, "readv")

    async def recv_into(self, view: memoryview) -> int:
        if self._raw is not None:
            return await self._raw.recv_into(view)
        data = await self.stream.receive_some(min(len(view), TLS_READ_CHUNK))
        n = len(data)
        view[:n] = data
        return n

    async def recv_body(self, view: memoryview, progress: Callable[[int], None]) -> None:
        """Fill ``view`` completely from the stream (a piece body), reporting each chunk.

        On plain TCP this reads with ``readv`` on the non-blocking socket and only goes through
        the scheduler when the socket is empty (or every :data:`BULK_YIELD_BYTES`, so a huge
        piece cannot starve other tasks): Trio's ``recv_into`` yields after *every* successful
        call, which on a multi-MiB piece costs more than the copies themselves.
        """
        got = 0
        if self._raw is None or not self._vectored:
            while got < len(view):
                n = await self.recv_into(view[got:])
                if n == 0:
                    raise ConnectionClosed("peer closed the connection in the middle of a piece")
                got += n
                progress(n)
            return
        unyielded = 0
        while got < len(view):
            fd = self._raw.fileno()  # re-read after every await: -1 once closed
            if fd < 0:
                raise trio.ClosedResourceError("socket was closed")
            try:
                n = os.readv(fd, [view[got:]])
            except BlockingIOError:
                unyielded = 0
                await trio.lowlevel.wait_readable(self._raw)
                continue
            if n == 0:
                raise ConnectionClosed("peer closed the connection in the middle of a piece")
            got += n
            progress(n)
            unyielded += n
            if unyielded >= BULK_YIELD_BYTES and got < len(view):
                unyielded = 0
                await trio.lowlevel.checkpoint()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def send_header_and_payload(self, header: bytes, payload: memoryview) -> None:
        """Write ``header`` then ``payload`` without concatenating them.

        On plain TCP: ``writev`` (scatter/gather) on the non-blocking socket, so the 64-byte
        header costs neither a syscall nor a TCP segment of its own, and the scheduler is only
        entered when the socket buffer is full (or every :data:`BULK_YIELD_BYTES`); see
        :meth:`recv_body`. Over TLS, two ``send_all`` calls (TLS copies anyway).
        """
        if self._raw is None or not self._vectored:
            await self.stream.send_all(header)
            await self.stream.send_all(payload)
            return
        head = memoryview(header)
        body = payload
        unyielded = 0
        while len(head) or len(body):
            fd = self._raw.fileno()  # re-read after every await: -1 once closed
            if fd < 0:
                raise trio.ClosedResourceError("socket was closed")
            try:
                sent = os.writev(fd, [head, body] if len(head) else [body])
            except BlockingIOError:
                unyielded = 0
                await trio.lowlevel.wait_writable(self._raw)
                continue
            taken = min(sent, len(head))
            head = head[taken:]
            body = body[sent - taken :]
            unyielded += sent
            if unyielded >= BULK_YIELD_BYTES and (len(head) or len(body)):
                unyielded = 0
                await trio.lowlevel.checkpoint()
        # A schedule point, but not a cancellation point: the frame is complete, and a cancel
        # arriving now must not be mistaken for one that interrupted the write.
        await trio.lowlevel.cancel_shielded_checkpoint()

    def close_now(self) -> None:
        """Synchronously close the socket: wakes every task blocked on it."""
        if self.sock_stream is not None:
            self.sock_stream.socket.close()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def _peer_address(stream: trio.abc.Stream) -> str:
    sock = _socket_stream(stream)
    if sock is None:
        return "unknown"
    try:
        addr = sock.socket.getpeername()
    except OSError:
        return "unknown"
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = f"[{addr[0]}]" if ":" in str(addr[0]) else str(addr[0])
        return f"{host}:{addr[1]}"
    return str(addr)


# --- shared connection machinery ------------------------------------------------------------


class _Waiter:
    __slots__ = ("error", "event", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: Response | None = None
        self.error: WireError | None = None


class _Connection:
    def __init__(
        self,
        endpoint: Endpoint,
        stream: trio.abc.Stream,
        *,
        label: str,
        ping_interval: float,
        idle_timeout: float,
    ) -> None:
        self._ep = endpoint
        self._tr = _Transport(stream)
        self.label = label  # for logs: "peer=... conn=..."
        self._ping_interval = ping_interval
        self._idle_timeout = idle_timeout
        self._send_lock = trio.Lock()  # FIFO-fair
        self._scratch = bytearray(READ_CHUNK)
        self._scratch_view = memoryview(self._scratch)
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
        await _acquire(self._send_lock)
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
                except _TRANSPORT_ERRORS as exc:
                    self._abort(ConnectionClosed(f"send failed: {_describe(exc)}"))
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
            except _TRANSPORT_ERRORS:
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
                except _TRANSPORT_ERRORS:
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
        except _TRANSPORT_ERRORS as exc:
            if self.closed:
                raise self._closed_error() from None
            raise ConnectionClosed(f"receive failed: {_describe(exc)}") from None
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


async def _acquire(lock: trio.Lock) -> None:
    """Take ``lock`` without a trip through the scheduler when it is free (the common case on
    the per-piece path, where every avoided task switch is measurable); wait fairly otherwise.
    Callers reach a real checkpoint right after (the write itself)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause):
        text = f"{text} ({cause})"
    return text


def _unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Trio wraps even a single exception from a nursery body in a group; give callers of our
    context managers the plain exception when there is only one that matters."""
    leaves = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    if len(leaves) == 1:
        leaf = leaves[0]
        if isinstance(leaf, BaseExceptionGroup):
            return _unwrap_group(leaf)
        return leaf
    if not leaves:
        return group.exceptions[0]
    return group


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_cancellation(e) for e in exc.exceptions)
    return False


# --- destination side -----------------------------------------------------------------------


class _ServerConnection(_Connection):
    def __init__(
        self,
        endpoint: Endpoint,
        stream: trio.abc.Stream,
        *,
        peer: Peer,
        handler: ServerHandler,
        budget: ByteBudget,
        ping_interval: float,
        idle_timeout: float,
        max_concurrent_requests: int,
        max_concurrent_pieces: int,
    ) -> None:
        super().__init__(
            endpoint,
            stream,
            label=f"peer={peer.address} conn={peer.conn_id}",
            ping_interval=ping_interval,
            idle_timeout=idle_timeout,
        )
        self.peer = peer
        self._handler = handler
        self._budget = budget
        self._request_slots = trio.Semaphore(max_concurrent_requests)
        self._piece_slots = trio.Semaphore(max_concurrent_pieces)

    async def run(self, close_grace: float) -> None:
        async with trio.open_nursery() as handlers:
            try:
                async with trio.open_nursery() as io:
                    self._io_scope = io.cancel_scope
                    io.start_soon(self._keepalive)
                    await self._receive_loop(handlers)
                    io.cancel_scope.cancel()
            except BaseException as exc:
                if _is_cancellation(exc):  # serve() is being cancelled: say so, briefly
                    await self._send_best_effort(
                        self._ep.send_error(
                            ErrorCode.SHUTTING_DOWN, "destination is shutting down"
                        ),
                        limit=0.5,
                    )
                raise
            finally:
                self._abort(ConnectionClosed("connection closed", ErrorCode.OK))
                # Let handlers finish their current piece/request, within the grace period.
                handlers.cancel_scope.deadline = min(
                    handlers.cancel_scope.deadline, trio.current_time() + close_grace
                )

    async def _receive_loop(self, handlers: trio.Nursery) -> None:
        ep = self._ep
        try:
            while True:
                event = ep.next_event()
                if event is NEED_DATA:
                    await self._read_more()
                elif isinstance(event, PieceStart):
                    await self._receive_piece(event, handlers)
                elif isinstance(event, RequestReceived):
                    await self._request_slots.acquire()
                    handlers.start_soon(self._run_request, event.request_id, event.message)
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
                    self._abort(ConnectionClosed(event.message, event.code))
                    return
                elif event is END_OF_STREAM:
                    self._abort(ConnectionClosed("source closed the connection", ErrorCode.OK))
                    return
                else:  # pragma: no cover - nothing else is emitted on the destination
                    raise WireError(ErrorCode.INTERNAL, f"unexpected event {event!r}")
        except ConnectionClosed as exc:
            self._abort(exc)
        except LocalProtocolError:
            raise
        except WireError as exc:
            metrics.wire_protocol_errors.labels(exc.code.value).inc()
            log.warning(
                "event=wire_protocol_error %s code=%s reason=%s",
                self.label,
                exc.code.value,
                kv(exc.message),
            )
            await self._send_best_effort(ep.data_to_send())
            self._abort(ConnectionClosed(f"protocol error: {exc.message}", exc.code))

    def _body_progress(self, n: int) -> None:
        self._ep.decoder.body_received(n)
        self._last_recv = trio.current_time()

    async def _receive_piece(self, start: PieceStart, handlers: trio.Nursery) -> None:
        try:
            self._piece_slots.acquire_nowait()
        except trio.WouldBlock:
            await self._piece_slots.acquire()
        charge = 0
        try:
            self._recv_paused = True
            try:
                charge = await self._budget.acquire(start.length)
            finally:
                self._recv_paused = False
            # One buffer of exactly the piece's size; the kernel writes into it directly.
            buf = self._budget.take_buffer(start.length)
            view = memoryview(buf)
            decoder = self._ep.decoder
            got = decoder.readinto_body(view)
            if got < start.length:
                try:
                    await self._tr.recv_body(view[got:], self._body_progress)
                except _TRANSPORT_ERRORS as exc:
                    if self.closed:
                        raise self._closed_error() from None
                    raise ConnectionClosed(f"receive failed: {_describe(exc)}") from None
        except BaseException:
            if charge:
                self._budget.release(charge)
            self._piece_slots.release()
            raise
        handlers.start_soon(self._run_piece, start, buf, view, charge)

    async def _run_piece(
        self, start: PieceStart, buf: bytearray, view: memoryview, charge: int
    ) -> None:
        piece = m.Piece(start.info_hash, start.index, start.offset, view)
        response: Response
        try:
            try:
                ack = await self._handler.handle_piece(self.peer, piece)
                if (
                    isinstance(ack, m.PieceAck)
                    and ack.info_hash == start.info_hash
                    and ack.index == start.index
                ):
                    response = ack
                else:
                    log.error(
                        "event=wire_handler_bad_result %s code=internal result=%s",
                        self.label,
                        kv(repr(ack)),
                    )
                    response = m.Error(ErrorCode.INTERNAL, "handler returned a wrong ack")
            except WireError as exc:
                response = m.Error(exc.code, exc.message)
            except Exception:
                log.exception(
                    "event=wire_handler_failed %s code=internal hash=%s piece=%d",
                    self.label,
                    start.info_hash,
                    start.index,
                )
                response = m.Error(ErrorCode.INTERNAL, "internal error on the destination")
        finally:
            del piece
            try:
                view.release()  # the handler must not keep it
            except BufferError:  # something still exports it: never reuse this buffer
                pass
            else:
                self._budget.recycle(buf)
            del buf
            self._budget.release(charge)
            self._piece_slots.release()
        with suppress(ConnectionClosed):
            await self._send_control(
                lambda: (
                    self._ep.send_response(start.request_id, response)
                    + self._ep.grant_credit(start.length)
                )
            )

    async def _run_request(self, request_id: int, request: Request) -> None:
        response: Response
        try:
            try:
                result = await self._handler.handle_request(self.peer, request)
                expected = m.RESPONSE_TYPE[type(request)]
                if isinstance(result, expected):
                    response = result
                else:
                    log.error(
                        "event=wire_handler_bad_result %s code=internal request=%s result=%s",
                        self.label,
                        type(request).__name__,
                        kv(repr(result)),
                    )
                    response = m.Error(ErrorCode.INTERNAL, "handler returned a wrong result")
            except WireError as exc:
                response = m.Error(exc.code, exc.message)
            except Exception:
                log.exception(
                    "event=wire_handler_failed %s code=internal request=%s",
                    self.label,
                    type(request).__name__,
                )
                response = m.Error(ErrorCode.INTERNAL, "internal error on the destination")
        finally:
            self._request_slots.release()
        with suppress(ConnectionClosed):
            await self._send_control(lambda: self._ep.send_response(request_id, response))


async def serve(
    listen: HostPort,
    handler: ServerHandler,
    *,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    budget: ByteBudget,
    task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ping_interval: float = DEFAULT_PING_INTERVAL,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    window: int = DEFAULT_WINDOW,
    max_piece: int = DEFAULT_MAX_PIECE,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    close_grace: float = DEFAULT_CLOSE_GRACE,
) -> None:
    """Accept sources on ``listen`` until cancelled.

    ``task_status.started`` receives the list of bound ports (one per listening socket; with
    port 0 each gets its own). Every connection runs in its own task: TLS (if
    ``ssl_context``) and the qbsync handshake under ``handshake_timeout``, then requests and
    pieces. A failing connection is answered with an ``Error`` frame carrying a stable code,
    logged with ``code=...``, counted in ``wire_handshake_failures_total`` or
    ``wire_protocol_errors_total``, and closed; it never stops :func:`serve`.
    """
    host = listen.host or None
    listeners = await trio.open_tcp_listeners(listen.port, host=host)
    ports = [
        lst.socket.getsockname()[1] for lst in listeners if isinstance(lst, trio.SocketListener)
    ]

    async def handle(stream: trio.SocketStream) -> None:
        await _serve_one(
            stream,
            handler,
            token=token,
            ssl_context=ssl_context,
            budget=budget,
            handshake_timeout=handshake_timeout,
            ping_interval=ping_interval,
            idle_timeout=idle_timeout,
            window=window,
            max_piece=max_piece,
            max_concurrent_requests=max_concurrent_requests,
            close_grace=close_grace,
        )

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        log.info(
            "event=wire_listening addr=%s ports=%s tls=%s auth=%s",
            listen,
            ",".join(map(str, ports)),
            ssl_context is not None,
            bool(token),
        )
        task_status.started(ports)


async def _serve_one(
    stream: trio.SocketStream,
    handler: ServerHandler,
    *,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    budget: ByteBudget,
    handshake_timeout: float,
    ping_interval: float,
    idle_timeout: float,
    window: int,
    max_piece: int,
    max_concurrent_requests: int,
    close_grace: float,
) -> None:
    peer = Peer(_peer_address(stream), next(_conn_ids))
    label = f"peer={peer.address} conn={peer.conn_id}"
    conn: _ServerConnection | None = None
    opened = False
    try:
        tune_socket(stream)
        app_stream: trio.abc.Stream = stream
        endpoint = Endpoint(m.Role.DESTINATION, token=token, window=window, max_piece=max_piece)
        deadline = trio.current_time() + handshake_timeout
        if ssl_context is not None:
            app_stream = trio.SSLStream(stream, ssl_context, server_side=True)
            with trio.move_on_at(deadline) as tls_scope:
                try:
                    await app_stream.do_handshake()
                except _TRANSPORT_ERRORS as exc:
                    _handshake_failed(label, ErrorCode.AUTH_FAILED, f"TLS: {_describe(exc)}")
                    return
            if tls_scope.cancelled_caught:
                _handshake_failed(label, ErrorCode.TIMEOUT, "TLS handshake timed out")
                return
        conn = _ServerConnection(
            endpoint,
            app_stream,
            peer=peer,
            handler=handler,
            budget=budget,
            ping_interval=ping_interval,
            idle_timeout=idle_timeout,
            max_concurrent_requests=max_concurrent_requests,
            max_concurrent_pieces=DEFAULT_MAX_CONCURRENT_PIECES,
        )
        try:
            done = await conn._handshake(max(deadline - trio.current_time(), 0.0))
        except WireError as exc:
            _handshake_failed(label, exc.code, exc.message)
            return
        opened = True
        metrics.wire_connections.labels("destination").inc()
        log.info(
            "event=wire_connection_open %s version=%d tls=%s auth=%s peer_software=%s",
            label,
            done.version,
            ssl_context is not None,
            bool(token),
            kv(done.peer_software),
        )
        await conn.run(close_grace)
        reason = conn.close_reason
        log.info(
            "event=wire_connection_closed %s code=%s reason=%s",
            label,
            reason.code.value if reason else "ok",
            kv(reason.message if reason else ""),
        )
    except Exception:
        # A bug in this module: never let one connection take the server down.
        log.exception("event=wire_connection_failed %s code=internal", label)
    finally:
        if opened:
            metrics.wire_connections.labels("destination").dec()
        if conn is not None:
            conn._abort(ConnectionClosed("connection closed", ErrorCode.OK))
        await trio.aclose_forcefully(stream)


def _handshake_failed(label: str, code: ErrorCode, reason: str) -> None:
    metrics.wire_handshake_failures.labels(code.value).inc()
    log.warning("event=wire_handshake_failed %s code=%s reason=%s", label, code.value, kv(reason))


# --- source side ----------------------------------------------------------------------------


class ClientConnection(_Connection):
    """An authenticated connection to a destination (see :func:`open_connection`).

    Any number of tasks may call :meth:`request` and :meth:`send_piece` concurrently; they are
    multiplexed over the one stream and matched to their answers by request id.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        stream: trio.abc.Stream,
        *,
        label: str,
        ping_interval: float,
        idle_timeout: float,
    ) -> None:
        super().__init__(
            endpoint, stream, label=label, ping_interval=ping_interval, idle_timeout=idle_timeout
        )
        self._waiters: dict[int, _Waiter] = {}
        self._credit_lock = trio.Lock()  # FIFO among piece senders
        self._credit_event = trio.Event()
        self.version = 0

    # -- public state ----------------------------------------------------------------------

    @property
    def credit(self) -> int:
        """Piece bytes the destination currently allows (may be negative right after a piece
        larger than the window)."""
        return self._ep.available

    @property
    def window(self) -> int:
        """The destination's credit window."""
        return self._ep.window

    @property
    def inflight_bytes(self) -> int:
        """Piece bytes sent and not yet acknowledged."""
        return self._ep.inflight_bytes

    @property
    def max_piece_size(self) -> int:
        """The largest piece the destination accepts."""
        return self._ep.max_frame - PIECE_HEADER_SIZE

    async def aclose(self) -> None:
        """Close now (pending calls raise :class:`ConnectionClosed`)."""
        self._abort(ConnectionClosed("connection closed by this side", ErrorCode.OK))
        await trio.lowlevel.checkpoint()

    # -- requests --------------------------------------------------------------------------

    @overload
    async def request(self, msg: m.InitTorrent, *, timeout: float) -> m.InitResult: ...  # noqa: ASYNC109
    @overload
    async def request(self, msg: m.Finalize, *, timeout: float) -> m.FinalizeResult: ...  # noqa: ASYNC109
    @overload
    async def request(self, msg: m.Abort, *, timeout: float) -> m.AbortResult: ...  # noqa: ASYNC109
    @overload
    async def request(self, msg: m.StartTorrent, *, timeout: float) -> m.StartResult: ...  # noqa: ASYNC109

    async def request(self, msg: Request, *, timeout: float) -> Response:  # noqa: ASYNC109
        """Send a request and wait for its result.

        Raises :class:`WireError` with the destination's code if it answered with an
        ``Error``, ``WireError(timeout)`` if no answer came within ``timeout`` seconds, and
        :class:`ConnectionClosed` if the connection is or becomes closed. Safe to cancel: a
        late answer is discarded.
        """
        waiter = _Waiter()
        rid = 0

        def build() -> bytes:
            nonlocal rid
            rid, frame = self._ep.send_request(msg)
            self._waiters[rid] = waiter
            return frame

        try:
            with trio.move_on_after(timeout) as cs:
                await self._send_control(build)
                await waiter.event.wait()
            if cs.cancelled_caught:
                raise WireError(
                    ErrorCode.TIMEOUT,
                    f"no answer to {type(msg).__name__} within {timeout:g}s",
                )
        finally:
            if rid:
                self._waiters.pop(rid, None)
        return self._result(waiter)

    def _result(self, waiter: _Waiter) -> Response:
        if waiter.error is not None:
            raise waiter.error
        result = waiter.result
        assert result is not None
        if isinstance(result, m.Error):
            raise WireError(result.code, result.message)
        return result

    # -- pieces ----------------------------------------------------------------------------

    async def send_piece(
        self, info_hash: str, index: int, offset: int, data: bytes | bytearray | memoryview
    ) -> m.PieceAck:
        """Send one piece and wait for its ack.

        Waits for credit first (backpressure), then writes the 64-byte header and ``data``
        itself (no copy, no concatenation). Returns the :class:`PieceAck` (check ``.ok`` and
        ``.code``); raises :class:`WireError` if the destination answered with an ``Error``,
        :class:`ConnectionClosed` if the connection closes. Safe to cancel while waiting for
        credit or for the ack; cancelled in the middle of writing, the connection is closed.
        """
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        length = view.nbytes
        if self.closed:
            raise self._closed_error()
        if not 0 < length <= self.max_piece_size:
            raise WireError(
                ErrorCode.FRAME_TOO_LARGE,
                f"piece of {length} bytes: the destination accepts 1..{self.max_piece_size}",
            )
        if not m.valid_info_hash(info_hash):
            raise WireError(ErrorCode.BAD_REQUEST, f"invalid info-hash {info_hash!r}")
        waiter = _Waiter()
        rid = 0
        await _acquire(self._credit_lock)
        try:
            while not self._ep.piece_fits(length):
                if self.closed:
                    raise self._closed_error()
                await self._credit_event.wait()
            await _acquire(self._send_lock)
            try:
                if self.closed:
                    raise self._closed_error()
                rid, header = self._ep.send_piece(info_hash, index, offset, length)
                self._waiters[rid] = waiter
                try:
                    await self._tr.send_header_and_payload(header, view)
                except BaseException as exc:
                    self._waiters.pop(rid, None)
                    if isinstance(exc, _TRANSPORT_ERRORS):
                        self._abort(ConnectionClosed(f"send failed: {_describe(exc)}"))
                        raise self._closed_error() from None
                    self._abort(ConnectionClosed("piece send interrupted"))
                    raise
                self._last_send = trio.current_time()
            finally:
                self._send_lock.release()
        finally:
            self._credit_lock.release()
        try:
            await waiter.event.wait()
        finally:
            self._waiters.pop(rid, None)
        result = self._result(waiter)
        assert isinstance(result, m.PieceAck)
        return result

    # -- background tasks ------------------------------------------------------------------

    async def _background(self) -> None:
        """Receive loop and keepalive, in their own cancel scope (so closing the connection
        stops them without cancelling the caller's ``async with`` block)."""
        assert self._io_scope is not None
        with self._io_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._keepalive)

    def _notify_credit(self) -> None:
        self._credit_event.set()
        self._credit_event = trio.Event()

    def _on_closed(self, reason: ConnectionClosed) -> None:
        for waiter in self._waiters.values():
            waiter.error = ConnectionClosed(reason.message, reason.code)
            waiter.event.set()
        self._waiters.clear()
        self._notify_credit()

    async def _receive_loop(self) -> None:
        ep = self._ep
        try:
            while True:
                event = ep.next_event()
                if event is NEED_DATA:
                    await self._read_more()
                elif isinstance(event, ResponseReceived):
                    waiter = self._waiters.pop(event.request_id, None)
                    if waiter is not None:  # else: the caller gave up (cancel/timeout)
                        waiter.result = event.message
                        waiter.event.set()
                elif isinstance(event, CreditReceived):
                    self._notify_credit()
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
                    self._abort(
                        ConnectionClosed(
                            f"destination closed the connection: {event.message}", event.code
                        )
                    )
                    return
                elif event is END_OF_STREAM:
                    self._abort(ConnectionClosed("destination closed the connection", ErrorCode.OK))
                    return
                else:  # pragma: no cover - nothing else is emitted on the source
                    raise WireError(ErrorCode.INTERNAL, f"unexpected event {event!r}")
        except ConnectionClosed as exc:
            self._abort(exc)
        except LocalProtocolError:
            raise
        except WireError as exc:
            metrics.wire_protocol_errors.labels(exc.code.value).inc()
            log.warning(
                "event=wire_protocol_error %s code=%s reason=%s",
                self.label,
                exc.code.value,
                kv(exc.message),
            )
            await self._send_best_effort(ep.data_to_send())
            self._abort(
                ConnectionClosed(f"protocol error by the destination: {exc.message}", exc.code)
            )


@asynccontextmanager
async def open_connection(
    addr: HostPort,
    *,
    token: str | None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float = 10.0,
    ping_interval: float = DEFAULT_PING_INTERVAL,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
) -> AsyncIterator[ClientConnection]:
    """Connect to a destination, run TLS (if ``ssl_context``) and the handshake, and yield the
    connection; it is closed when the block exits.

    ``connect_timeout`` bounds TCP connect + TLS + handshake together. Raises ``OSError`` if
    the TCP connection fails, and :class:`WireError` for everything else (``auth-failed`` for
    a token mismatch or a failed TLS verification, ``unsupported-version``, ``timeout``, ...).

    The receive loop and keepalive run in a nursery owned by this context manager. They never
    raise into the block: when the connection dies, pending and later calls raise
    :class:`ConnectionClosed` (see :attr:`ClientConnection.closed` and
    :meth:`ClientConnection.wait_closed`).
    """
    if not addr.host:
        raise ValueError("open_connection needs a host")
    label = f"peer={addr}"
    stream: trio.abc.Stream | None = None
    conn: ClientConnection | None = None
    try:
        with trio.move_on_after(connect_timeout) as cs:
            tcp = await trio.open_tcp_stream(addr.host, addr.port)
            stream = tcp
            tune_socket(tcp)
            if ssl_context is not None:
                tls = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname or addr.host)
                stream = tls
                try:
                    await tls.do_handshake()
                except _TRANSPORT_ERRORS as exc:
                    raise WireError(
                        ErrorCode.AUTH_FAILED, f"TLS handshake with {addr} failed: {_describe(exc)}"
                    ) from None
            endpoint = Endpoint(m.Role.SOURCE, token=token)
            conn = ClientConnection(
                endpoint,
                stream,
                label=label,
                ping_interval=ping_interval,
                idle_timeout=idle_timeout,
            )
            remaining = max(cs.deadline - trio.current_time(), 0.0)
            done = await conn._handshake(remaining + 1.0)  # the outer deadline governs
            conn.version = done.version
        if cs.cancelled_caught:
            raise WireError(
                ErrorCode.TIMEOUT,
                f"connecting to {addr} timed out after {connect_timeout:g}s",
            )
    except BaseException as exc:
        if isinstance(exc, WireError):
            metrics.wire_handshake_failures.labels(exc.code.value).inc()
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise
    assert conn is not None and stream is not None
    metrics.wire_connections.labels("source").inc()
    log.debug("event=wire_connection_open %s version=%d", label, conn.version)
    try:
        async with trio.open_nursery() as nursery:
            conn._io_scope = trio.CancelScope()
            nursery.start_soon(conn._background)
            try:
                yield conn
            finally:
                conn._abort(ConnectionClosed("connection closed by this side", ErrorCode.OK))
    except BaseExceptionGroup as group:
        raise _unwrap_group(group) from None
    finally:
        metrics.wire_connections.labels("source").dec()
        await trio.aclose_forcefully(stream)


__all__ = [
    "ByteBudget",
    "ClientConnection",
    "Peer",
    "ServerHandler",
    "open_connection",
    "serve",
    "tune_socket",
]
