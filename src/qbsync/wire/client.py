"""The source side of the wire: :func:`open_connection` and :class:`ClientConnection`.

One connection multiplexes any number of concurrent requests and pieces, matched to their
answers by request id. Pieces wait for credit (the destination's backpressure) and are
written as a 64-byte header plus the caller's buffer, never concatenated; cancelling a piece
in the middle of its write closes the connection (the stream cannot be resynchronized).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar, cast

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import messages as m
from .address import HostPort
from .errors import ConnectionClosed, ErrorCode, WireError, leaf_exceptions
from .frames import PIECE_HEADER_SIZE
from .hooks import NO_HOOKS, WireHooks
from .keys import ADMIT_ANY, Admission
from .protocol import CreditReceived, Endpoint, ProtocolEvent, Response, ResponseReceived
from .shell import DEFAULT_IDLE_TIMEOUT, DEFAULT_PING_INTERVAL, BaseConnection, acquire, log
from .transport import TRANSPORT_ERRORS, accept_tls, describe, dial, peer_address


def _nothing() -> None:
    """The default :attr:`ClientConnection.on_change`: nobody listens."""


# Piece payload bytes tagged and written per step (see ClientConnection.send_piece).
TAG_CHUNK = 1024 * 1024


class _Waiter:
    """Where the receive loop leaves the answer (or the failure) for one request or piece."""

    __slots__ = ("error", "event", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: Response | None = None
        self.error: WireError | None = None


def _unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Trio wraps even a single exception from a nursery body in a group; give callers of our
    context managers the plain exception when there is only one that matters."""
    leaves = leaf_exceptions(group)
    relevant = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if len(relevant) == 1:
        return relevant[0]
    if not relevant:
        return leaves[0]
    return group


R = TypeVar("R")


class ClientConnection(BaseConnection):
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
        hooks: WireHooks = NO_HOOKS,
    ) -> None:
        super().__init__(
            endpoint,
            stream,
            label=label,
            ping_interval=ping_interval,
            idle_timeout=idle_timeout,
            hooks=hooks,
        )
        self._waiters: dict[int, _Waiter] = {}
        self._credit_lock = trio.Lock()  # FIFO among piece senders
        self._credit_event = trio.Event()
        self.version = 0
        # Called when credit or in-flight bytes change or the connection closes, so a
        # scheduler (the source's pool) can wait for room on an event instead of polling.
        self.on_change: Callable[[], None] = _nothing
        self.peer_fingerprint = ""  # the destination's identity key, once admitted

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

    async def request(self, msg: m.RequestMessage[R], *, timeout: float) -> R:  # noqa: ASYNC109
        """Send a request and wait for its result (typed: ``InitTorrent`` -> ``InitResult``).

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
        # The endpoint accepted this answer only if it is msg's result type (Endpoint.refuses).
        return cast(R, self._result(waiter))

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
        await acquire(self._credit_lock)
        try:
            while not self._ep.piece_fits(length):
                if self.closed:
                    raise self._closed_error()
                await self._credit_event.wait()
            await acquire(self._send_lock)
            try:
                if self.closed:
                    raise self._closed_error()
                rid, header, tag = self._ep.send_piece(info_hash, index, offset, length)
                self._waiters[rid] = waiter
                self.on_change()
                try:
                    # The tag is computed chunk by chunk just before each chunk is written:
                    # the bytes are cache-hot for the write, and the kernel keeps sending the
                    # previous chunk meanwhile (the link never idles for a whole-piece pass).
                    for start in range(0, length, TAG_CHUNK):
                        chunk = view[start : start + TAG_CHUNK]
                        tag.update(chunk)
                        last = start + TAG_CHUNK >= length
                        trailer = tag.finalize() if last else b""
                        await self._tr.send_header_and_payload(header, chunk, trailer)
                        header = b""
                except BaseException as exc:
                    self._waiters.pop(rid, None)
                    if isinstance(exc, TRANSPORT_ERRORS):
                        self._abort(ConnectionClosed(f"send failed: {describe(exc)}"))
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
        self.on_change()

    def _on_closed(self, reason: ConnectionClosed) -> None:
        for waiter in self._waiters.values():
            waiter.error = ConnectionClosed(reason.message, reason.code)
            waiter.event.set()
        self._waiters.clear()
        self._notify_credit()

    async def _on_event(self, event: ProtocolEvent) -> None:
        if isinstance(event, ResponseReceived):
            waiter = self._waiters.pop(event.request_id, None)
            if waiter is not None:  # else: the caller gave up (cancel/timeout)
                waiter.result = event.message
                waiter.event.set()
        elif isinstance(event, CreditReceived):
            self._notify_credit()
        else:  # pragma: no cover - nothing else is emitted on the source
            await super()._on_event(event)


@asynccontextmanager
async def open_connection(
    addr: HostPort,
    *,
    token: str | None,
    identity: Ed25519PrivateKey | None = None,
    admission: Admission = ADMIT_ANY,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float = 10.0,
    ping_interval: float = DEFAULT_PING_INTERVAL,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    hooks: WireHooks = NO_HOOKS,
    instance: str = "",
) -> AsyncIterator[ClientConnection]:
    """Connect to a destination, run TLS (if ``ssl_context``) and the handshake, and yield the
    connection; it is closed when the block exits.

    ``identity`` is this source's Ed25519 key and ``admission`` decides whether the
    destination's proven key is accepted (see :mod:`.keys`); having dialed, this side proves
    itself first. ``connect_timeout`` bounds TCP connect + TLS + handshake together. Raises
    ``OSError`` if the TCP connection fails, and :class:`WireError` for everything else
    (``auth-failed`` for a token mismatch or a failed TLS verification,
    ``unsupported-version``, ``timeout``, ...).

    The receive loop and keepalive run in a nursery owned by this context manager. They never
    raise into the block: when the connection dies, pending and later calls raise
    :class:`ConnectionClosed` (see :attr:`ClientConnection.closed` and
    :meth:`ClientConnection.wait_closed`).
    """
    if not addr.host:
        raise ValueError("open_connection needs a host")

    async def establish() -> trio.abc.Stream:
        return await dial(addr, ssl_context=ssl_context, server_hostname=server_hostname)

    async with _client_session(
        establish,
        label=f"peer={addr}",
        timeout=connect_timeout,
        timeout_message=f"connecting to {addr} timed out after {connect_timeout:g}s",
        token=token,
        instance=instance,
        identity=identity,
        admission=admission,
        initiator=True,
        peer=str(addr),
        ping_interval=ping_interval,
        idle_timeout=idle_timeout,
        hooks=hooks,
    ) as conn:
        yield conn


@asynccontextmanager
async def accept_connection(
    stream: trio.SocketStream,
    *,
    token: str | None,
    identity: Ed25519PrivateKey | None = None,
    admission: Admission = ADMIT_ANY,
    ssl_context: ssl.SSLContext | None = None,
    handshake_timeout: float = 10.0,
    ping_interval: float = DEFAULT_PING_INTERVAL,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    hooks: WireHooks = NO_HOOKS,
    instance: str = "",
) -> AsyncIterator[ClientConnection]:
    """The source's end of a connection the *destination* dialed (``source --listen``): TLS as
    the server (if ``ssl_context``), then the same handshake and connection as
    :func:`open_connection` -- the source stays the protocol client whichever side dialed, and
    the destination, having dialed, proves itself first. ``admission`` must not trust on first
    use here (a listening port is reachable by anyone: see ``identity.daemon.setup``).
    Errors as :func:`open_connection`'s; ``stream`` is closed when this ends."""

    async def establish() -> trio.abc.Stream:
        return await accept_tls(stream, ssl_context)

    try:
        async with _client_session(
            establish,
            label=f"peer={peer_address(stream)}",
            timeout=handshake_timeout,
            timeout_message=f"handshake timed out after {handshake_timeout:g}s",
            token=token,
            instance=instance,
            identity=identity,
            admission=admission,
            initiator=False,
            peer=peer_address(stream),
            ping_interval=ping_interval,
            idle_timeout=idle_timeout,
            hooks=hooks,
        ) as conn:
            yield conn
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def _client_session(
    establish: Callable[[], Awaitable[trio.abc.Stream]],
    *,
    label: str,
    timeout: float,  # noqa: ASYNC109  (the deadline covers establish + handshake together)
    timeout_message: str,
    token: str | None,
    instance: str,
    identity: Ed25519PrivateKey | None,
    admission: Admission,
    initiator: bool,
    peer: str,
    ping_interval: float,
    idle_timeout: float,
    hooks: WireHooks,
) -> AsyncIterator[ClientConnection]:
    """The protocol client over whatever ``establish`` returns (a dialed or an accepted
    stream, TLS done; see :mod:`.transport`): the handshake under the same deadline, then the
    connection's life."""
    stream: trio.abc.Stream | None = None
    conn: ClientConnection | None = None
    try:
        with trio.move_on_after(timeout) as cs:
            stream = await establish()
            endpoint = Endpoint(
                m.Role.SOURCE,
                token=token,
                instance=instance,
                identity=identity,
                admission=admission,
                initiator=initiator,
                peer_address=peer,
            )
            conn = ClientConnection(
                endpoint,
                stream,
                label=label,
                ping_interval=ping_interval,
                idle_timeout=idle_timeout,
                hooks=hooks,
            )
            remaining = max(cs.deadline - trio.current_time(), 0.0)
            done = await conn._handshake(remaining + 1.0)  # the outer deadline governs
            conn.version = done.version
            conn.peer_fingerprint = done.peer_fingerprint
        if cs.cancelled_caught:
            raise WireError(ErrorCode.TIMEOUT, timeout_message)
    except BaseException as exc:
        if isinstance(exc, WireError):
            hooks.handshake_failed(exc.code)
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise
    assert conn is not None and stream is not None
    hooks.connection_opened("source")
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
        hooks.connection_closed("source")
        await trio.aclose_forcefully(stream)
