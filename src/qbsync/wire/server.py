"""The destination side of the wire: :func:`serve` and the per-connection server.

:func:`serve` accepts sources and runs one task per connection: TLS (optional), the qbsync
handshake under a deadline, then requests and pieces handed to the :class:`ServerHandler`.
Request and piece handlers run in a nursery that outlives the connection's I/O by at most
``close_grace``, so a handler in the middle of a write is not torn apart by a disconnect.

Memory is bounded by configuration, not by the peers:

* a piece's size is charged to the shared :class:`~qbsync.wire.budget.ByteBudget` *before* its
  body is read (while waiting, the connection simply stops reading, and TCP pushes back on the
  sender); the charge is released when ``handle_piece`` returns, and the piece's credit is
  granted back after its ack;
* the body is received straight into one buffer of exactly the piece's size (``readv`` on
  plain TCP): no intermediate chunks, no re-slicing;
* control frames are limited per type (``messages.MESSAGE_TABLE``; at most
  ``MAX_CONTROL_FRAME``, the InitTorrent limit), and one larger than 64 KiB is charged to the
  same budget before its body is read, until its request has been answered; the number of
  concurrently handled requests per connection is capped (reading stops at the cap), and
  pieces per connection are bounded by the credit window.

A failing connection is answered with an ``Error`` frame carrying a stable code, logged with
``code=...``, and closed; it never stops :func:`serve`.
"""

from __future__ import annotations

import itertools
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Protocol

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import messages as m
from .address import HostPort
from .budget import ByteBudget
from .errors import ConnectionClosed, ErrorCode, WireError, leaf_exceptions
from .frames import PieceStart
from .hooks import NO_HOOKS, WireHooks
from .keys import ADMIT_ANY, TAG_SIZE, Admission, IncrementalTag
from .logfmt import kv
from .protocol import (
    DEFAULT_MAX_PIECE,
    DEFAULT_WINDOW,
    Endpoint,
    HandshakeComplete,
    ProtocolEvent,
    Request,
    RequestReceived,
    Response,
)
from .shell import DEFAULT_IDLE_TIMEOUT, DEFAULT_PING_INTERVAL, BaseConnection, log
from .transport import TRANSPORT_ERRORS, describe, peer_address, socket_stream, tune_socket

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_CLOSE_GRACE = 10.0
DEFAULT_MAX_CONCURRENT_REQUESTS = 32
DEFAULT_MAX_CONCURRENT_PIECES = 256
# Control frames with a larger body are charged to the byte budget while they are buffered and
# until their request has been answered (the decoded request holds about as much memory).
CONTROL_CHARGE_MIN = 64 * 1024
# Connections still in TLS or the qbsync handshake, in all and per peer address. Authenticated
# sources are not capped (the token holder is trusted and bounded by the byte budget); anonymous
# ones are, so a flood of half-open connections cannot grow without bound while each waits out
# its handshake timeout. Per address the cap is above the source's default --max-connections (8)
# so a source opening all its connections at once never competes with itself.
DEFAULT_MAX_PENDING_HANDSHAKES = 64
DEFAULT_MAX_PENDING_PER_ADDRESS = 16

_conn_ids = itertools.count(1)


@attrs.frozen
class Peer:
    """The source on the other end of a destination connection."""

    address: str  # "ip:port"
    conn_id: int
    instance: str = ""  # the source's announced name (Hello.instance), known once authenticated
    fingerprint: str = ""  # the source's admitted identity key (keys.fingerprint), likewise


# Told when an authenticated connection opens (True) and closes (False): the destination keeps
# per-source counts with it (Peer.instance names the source).
PeerHook = Callable[[Peer, bool], None]


def _ignore_peer(peer: Peer, opened: bool) -> None:
    return None


@attrs.define
class OpenPeer:
    """An authenticated connection open now, as the status page shows it."""

    peer: Peer
    opened: float  # Unix time the handshake completed
    software: str  # what the source announced in its Hello
    tls: bool
    auth: bool  # admitted by the auth token (False: the listener runs without one)


class OpenPeers:
    """The authenticated connections of a :func:`serve`, by connection id. Filled and emptied
    by :func:`serve` only; readers (the status page) take a snapshot with :meth:`all`."""

    def __init__(self) -> None:
        self._open: dict[int, OpenPeer] = {}

    def all(self) -> list[OpenPeer]:
        return sorted(self._open.values(), key=lambda p: p.opened)

    def add(self, entry: OpenPeer) -> None:
        self._open[entry.peer.conn_id] = entry

    def discard(self, peer: Peer) -> None:
        self._open.pop(peer.conn_id, None)


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


def _is_cancellation(exc: BaseException) -> bool:
    return all(isinstance(e, trio.Cancelled) for e in leaf_exceptions(exc))


# --- one connection -------------------------------------------------------------------------


class _ServerConnection(BaseConnection):
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
        hooks: WireHooks,
    ) -> None:
        super().__init__(
            endpoint,
            stream,
            label=f"peer={peer.address} conn={peer.conn_id}",
            ping_interval=ping_interval,
            idle_timeout=idle_timeout,
            hooks=hooks,
        )
        self.peer = peer
        self._handler = handler
        self._budget = budget
        self._request_slots = trio.Semaphore(max_concurrent_requests)
        self._piece_slots = trio.Semaphore(max_concurrent_pieces)
        self._handlers: trio.Nursery | None = None
        self._control_charge = 0  # budget bytes held for the control frame being read

    async def _read_more(self) -> None:
        length = self._ep.decoder.control_body_length
        if length > CONTROL_CHARGE_MIN and not self._control_charge:
            with self._not_reading():
                self._control_charge = await self._budget.acquire(length)
        await super()._read_more()

    def _take_control_charge(self) -> int:
        charge, self._control_charge = self._control_charge, 0
        return charge

    async def run(self, close_grace: float) -> None:
        async with trio.open_nursery() as handlers:
            self._handlers = handlers
            try:
                async with trio.open_nursery() as io:
                    self._io_scope = io.cancel_scope
                    io.start_soon(self._keepalive)
                    await self._receive_loop()
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
                if charge := self._take_control_charge():  # a frame cut off mid-body
                    self._budget.release(charge)
                # Let handlers finish their current piece/request, within the grace period.
                handlers.cancel_scope.deadline = min(
                    handlers.cancel_scope.deadline, trio.current_time() + close_grace
                )

    async def _on_event(self, event: ProtocolEvent) -> None:
        assert self._handlers is not None
        if isinstance(event, PieceStart):
            await self._receive_piece(event, self._handlers)
        elif isinstance(event, RequestReceived):
            charge = self._take_control_charge()
            try:
                with self._not_reading():
                    await self._request_slots.acquire()
            except BaseException:
                if charge:
                    self._budget.release(charge)
                raise
            self._handlers.start_soon(self._run_request, event.request_id, event.message, charge)
        else:  # pragma: no cover - nothing else is emitted on the destination
            await super()._on_event(event)

    def _body_progress(self, n: int) -> None:
        self._ep.decoder.body_received(n)
        self._last_recv = trio.current_time()

    async def _receive_piece(self, start: PieceStart, handlers: trio.Nursery) -> None:
        try:
            self._piece_slots.acquire_nowait()
        except trio.WouldBlock:
            with self._not_reading():
                await self._piece_slots.acquire()
        charge = 0
        try:
            with self._not_reading():
                charge = await self._budget.acquire(start.length)
            # One buffer of exactly the piece's size; the kernel writes into it directly.
            buf = self._budget.take_buffer(start.length)
            view = memoryview(buf)
            # The tag is computed as the bytes arrive (they are still in the CPU cache, and
            # the work overlaps the wait for the next ones); nothing uses a byte of the piece
            # before the 16 bytes after it verify.
            mac = self._ep.piece_mac(start)
            tag = bytearray(TAG_SIZE)
            await self._receive_into(view, memoryview(tag), mac)
            self._ep.check_piece_tag(start, mac, bytes(tag))
        except BaseException:
            if charge:
                self._budget.release(charge)
            self._piece_slots.release()
            raise
        handlers.start_soon(self._run_piece, start, buf, view, charge)

    async def _receive_into(
        self, view: memoryview, trailer: memoryview, mac: IncrementalTag
    ) -> None:
        """Fill ``view`` (the payload) and ``trailer`` (its tag) with the next body bytes:
        buffered ones first, then straight from the socket in one ``readv`` per chunk, feeding
        each payload chunk to ``mac`` as it lands."""
        decoder = self._ep.decoder
        got = decoder.readinto_body(view)
        if got:
            mac.update(view[:got])
        tgot = decoder.readinto_body(trailer) if got == len(view) else 0
        if got == len(view) and tgot == len(trailer):
            return
        pos = got

        def progress(n: int) -> None:
            nonlocal pos
            take = min(n, len(view) - pos)
            if take > 0:
                mac.update(view[pos : pos + take])
                pos += take
            self._body_progress(n)

        try:
            await self._tr.recv_body(view[got:], progress, trailer[tgot:])
        except TRANSPORT_ERRORS as exc:
            if self.closed:
                raise self._closed_error() from None
            raise ConnectionClosed(f"receive failed: {describe(exc)}") from None

    async def _run_piece(
        self, start: PieceStart, buf: bytearray, view: memoryview, charge: int
    ) -> None:
        # The Piece (and so the view) is referenced only by the handler's frame: once the
        # handler returns, the view can be released and the buffer recycled.
        try:
            response = await self._answer(
                lambda: self._handler.handle_piece(
                    self.peer, m.Piece(start.info_hash, start.index, start.offset, view)
                ),
                start.request_id,
                f"hash={start.info_hash} piece={start.index}",
            )
        finally:
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

    async def _run_request(self, request_id: int, request: Request, charge: int) -> None:
        try:
            response = await self._answer(
                lambda: self._handler.handle_request(self.peer, request),
                request_id,
                f"request={type(request).__name__}",
            )
        finally:
            self._request_slots.release()
            if charge:
                self._budget.release(charge)
        with suppress(ConnectionClosed):
            await self._send_control(lambda: self._ep.send_response(request_id, response))

    async def _answer(
        self,
        call: Callable[[], Awaitable[Response]],
        request_id: int,
        what: str,
    ) -> Response:
        """Run a handler and turn its outcome into the one response the source gets: its
        result, ``Error(code)`` for a :class:`WireError`, ``Error(internal)`` (logged with the
        traceback) for a bug or for a result that cannot answer the request (the endpoint's
        rule, :meth:`Endpoint.refuses`)."""
        try:
            result = await call()
        except WireError as exc:
            return m.Error(exc.code, exc.message)
        except Exception:
            log.exception("event=wire_handler_failed %s code=internal %s", self.label, what)
            return m.Error(ErrorCode.INTERNAL, "internal error on the destination")
        if self.closed or self._ep.refuses(request_id, result) is None:
            return result  # (closed: the answer is dropped anyway)
        log.error(
            "event=wire_handler_bad_result %s code=internal %s result=%s",
            self.label,
            what,
            kv(repr(result)),
        )
        return m.Error(ErrorCode.INTERNAL, "handler returned a wrong result")


async def serve(
    listen: HostPort,
    handler: ServerHandler,
    *,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    budget: ByteBudget,
    identity: Ed25519PrivateKey | None = None,
    admission: Admission = ADMIT_ANY,
    task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ping_interval: float = DEFAULT_PING_INTERVAL,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    window: int = DEFAULT_WINDOW,
    max_piece: int = DEFAULT_MAX_PIECE,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    close_grace: float = DEFAULT_CLOSE_GRACE,
    max_pending_handshakes: int = DEFAULT_MAX_PENDING_HANDSHAKES,
    max_pending_per_address: int = DEFAULT_MAX_PENDING_PER_ADDRESS,
    hooks: WireHooks = NO_HOOKS,
    peers: OpenPeers | None = None,
    on_peer: PeerHook = _ignore_peer,
) -> None:
    """Accept sources on ``listen`` until cancelled.

    ``peers``, when given, lists the authenticated connections open at any moment.

    ``task_status.started`` receives the list of bound ports (one per listening socket; with
    port 0 each gets its own). Every connection runs in its own task: TLS (if
    ``ssl_context``) and the qbsync handshake under ``handshake_timeout``, then requests and
    pieces. A failing connection is answered with an ``Error`` frame carrying a stable code,
    logged with ``code=...``, counted in ``wire_handshake_failures_total`` or
    ``wire_protocol_errors_total``, and closed; it never stops :func:`serve`.

    At most ``max_pending_handshakes`` connections may be unauthenticated at once, and at most
    ``max_pending_per_address`` from one address. A new connection over either cap closes the
    *oldest* unauthenticated one (of its own address, or of the address holding the most) with
    ``code=busy`` (logged at most once a second, always counted) instead of being refused: a
    real source finishes its handshake within a round trip, so what piles up is silent sockets,
    and those are what make room. Half-open floods therefore cannot lock a source out.
    """
    host = listen.host or None
    listeners = await trio.open_tcp_listeners(listen.port, host=host)
    ports = [
        lst.socket.getsockname()[1] for lst in listeners if isinstance(lst, trio.SocketListener)
    ]

    gate = _HandshakeGate(max_pending_handshakes, max_pending_per_address, hooks)

    async def handle(stream: trio.SocketStream) -> None:
        await _serve_one(
            stream,
            handler,
            gate=gate,
            token=token,
            identity=identity,
            admission=admission,
            ssl_context=ssl_context,
            budget=budget,
            handshake_timeout=handshake_timeout,
            ping_interval=ping_interval,
            idle_timeout=idle_timeout,
            window=window,
            max_piece=max_piece,
            max_concurrent_requests=max_concurrent_requests,
            close_grace=close_grace,
            hooks=hooks,
            peers=peers,
            on_peer=on_peer,
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


async def serve_dialed(
    stream: trio.abc.Stream,
    handler: ServerHandler,
    *,
    token: str | None,
    budget: ByteBudget,
    identity: Ed25519PrivateKey | None = None,
    admission: Admission = ADMIT_ANY,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ping_interval: float = DEFAULT_PING_INTERVAL,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    window: int = DEFAULT_WINDOW,
    max_piece: int = DEFAULT_MAX_PIECE,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    close_grace: float = DEFAULT_CLOSE_GRACE,
    hooks: WireHooks = NO_HOOKS,
    on_peer: PeerHook = _ignore_peer,
    peers: OpenPeers | None = None,
) -> None:
    """Serve one connection the destination *dialed* (``destination --connect``; TCP and TLS
    done by :func:`.transport.dial`): the same handshake -- the destination stays the protocol
    server whichever side dialed -- and the same service as a connection :func:`serve`
    accepted, except that this side, having dialed, proves itself first in the handshake.
    Returns when it ends (a failed handshake is logged and counted here too)."""
    await _serve_one(
        stream,
        handler,
        gate=_HandshakeGate(1, 1, hooks),  # one outgoing connection: nothing to cap
        token=token,
        ssl_context=None,
        identity=identity,
        admission=admission,
        budget=budget,
        handshake_timeout=handshake_timeout,
        ping_interval=ping_interval,
        idle_timeout=idle_timeout,
        window=window,
        max_piece=max_piece,
        max_concurrent_requests=max_concurrent_requests,
        close_grace=close_grace,
        hooks=hooks,
        on_peer=on_peer,
        peers=peers,
        initiator=True,
    )


def _host(address: str) -> str:
    """The host part of ``ip:port`` (``[v6]:port``): the unit of the per-address cap."""
    return address.rpartition(":")[0] or address


class _HandshakeGate:
    """The connections that have not authenticated yet, per peer host, oldest first.

    :meth:`enter` always admits the newcomer and, when a cap is exceeded, cancels the oldest
    pending connection of the newcomer's host (per-address cap) or of the host holding the most
    (overall cap). See :func:`serve` for why the oldest goes.
    """

    def __init__(self, limit: int, per_address: int, hooks: WireHooks) -> None:
        self.limit = limit
        self.per_address = per_address
        self._hooks = hooks
        self._pending: dict[str, dict[int, trio.CancelScope]] = {}  # insertion = age order
        self.pending = 0
        self._suppressed = 0
        self._last_log = -1e9

    def enter(self, peer: Peer, scope: trio.CancelScope) -> None:
        host = _host(peer.address)
        mine = self._pending.setdefault(host, {})
        if len(mine) >= self.per_address:
            self._evict(host, f"{len(mine)} connections from {host} in their handshake")
        elif self.pending >= self.limit:
            crowded = max(self._pending, key=lambda h: len(self._pending[h]))
            self._evict(crowded, f"{self.pending} connections in their handshake")
        mine[peer.conn_id] = scope
        self.pending += 1

    def leave(self, peer: Peer) -> None:
        host = _host(peer.address)
        mine = self._pending.get(host)
        if mine is not None and mine.pop(peer.conn_id, None) is not None:
            self.pending -= 1
            if not mine:
                del self._pending[host]

    def _evict(self, host: str, why: str) -> None:
        mine = self._pending[host]
        conn_id = next(iter(mine))
        mine.pop(conn_id).cancel()
        self.pending -= 1
        self._hooks.handshake_failed(ErrorCode.BUSY)
        now = trio.current_time()
        if now - self._last_log < 1.0:
            self._suppressed += 1
            return
        log.warning(
            "event=wire_handshake_failed peer=%s conn=%d code=busy reason=%s suppressed=%d",
            host,
            conn_id,
            kv(
                f"{why} (limits {self.per_address} per address, {self.limit} in all): "
                "closed the oldest"
            ),
            self._suppressed,
        )
        self._last_log, self._suppressed = now, 0


async def _serve_one(
    stream: trio.abc.Stream,
    handler: ServerHandler,
    *,
    gate: _HandshakeGate,
    token: str | None,
    identity: Ed25519PrivateKey | None,
    admission: Admission,
    ssl_context: ssl.SSLContext | None,
    budget: ByteBudget,
    handshake_timeout: float,
    ping_interval: float,
    idle_timeout: float,
    window: int,
    max_piece: int,
    max_concurrent_requests: int,
    close_grace: float,
    hooks: WireHooks,
    peers: OpenPeers | None = None,
    on_peer: PeerHook = _ignore_peer,
    initiator: bool = False,
) -> None:
    peer = Peer(peer_address(stream), next(_conn_ids))
    label = f"peer={peer.address} conn={peer.conn_id}"
    conn: _ServerConnection | None = None
    opened = False
    # Holds a place in the handshake gate until authenticated or gone; the gate may cancel
    # ``unauthenticated`` to make room for a newer connection.
    unauthenticated = trio.CancelScope()
    gate.enter(peer, unauthenticated)
    done: tuple[_ServerConnection, HandshakeComplete] | None = None
    try:
        with unauthenticated:
            done = await _handshake(
                stream,
                label,
                token=token,
                identity=identity,
                admission=admission,
                peer_address=peer.address,
                initiator=initiator,
                ssl_context=ssl_context,
                handshake_timeout=handshake_timeout,
                window=window,
                max_piece=max_piece,
                hooks=hooks,
                make_conn=lambda endpoint, app_stream: _ServerConnection(
                    endpoint,
                    app_stream,
                    peer=peer,
                    handler=handler,
                    budget=budget,
                    ping_interval=ping_interval,
                    idle_timeout=idle_timeout,
                    max_concurrent_requests=max_concurrent_requests,
                    max_concurrent_pieces=DEFAULT_MAX_CONCURRENT_PIECES,
                    hooks=hooks,
                ),
            )
        gate.leave(peer)
        if done is None:
            return  # failed (logged and counted) or closed by the gate to make room
        conn, info = done
        conn.peer = peer = attrs.evolve(
            peer, instance=info.peer_instance, fingerprint=info.peer_fingerprint
        )
        opened = True
        hooks.connection_opened("destination")
        log.info(
            "event=wire_connection_open %s version=%d tls=%s auth=%s peer_software=%s "
            "peer_fingerprint=%s peer_instance=%s",
            label,
            info.version,
            ssl_context is not None,
            bool(token),
            kv(info.peer_software),
            info.peer_fingerprint,
            kv(info.peer_instance),
        )
        if peers is not None:
            peers.add(
                OpenPeer(
                    peer, time.time(), info.peer_software, ssl_context is not None, bool(token)
                )
            )
        on_peer(peer, True)
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
        gate.leave(peer)
        if peers is not None:
            peers.discard(peer)
        if opened:
            hooks.connection_closed("destination")
            on_peer(peer, False)
        if conn is not None:
            conn._abort(ConnectionClosed("connection closed", ErrorCode.OK))
        await trio.aclose_forcefully(stream)


async def _handshake(
    stream: trio.abc.Stream,
    label: str,
    *,
    token: str | None,
    identity: Ed25519PrivateKey | None,
    admission: Admission,
    peer_address: str,
    initiator: bool,
    ssl_context: ssl.SSLContext | None,
    handshake_timeout: float,
    window: int,
    max_piece: int,
    hooks: WireHooks,
    make_conn: Callable[[Endpoint, trio.abc.Stream], _ServerConnection],
) -> tuple[_ServerConnection, HandshakeComplete] | None:
    """TLS (optional) and the qbsync handshake under one deadline. ``None`` when it failed
    (logged and counted here); the caller closes the stream."""
    sock = socket_stream(stream)
    if sock is not None:
        tune_socket(sock)
    app_stream: trio.abc.Stream = stream
    endpoint = Endpoint(
        m.Role.DESTINATION,
        token=token,
        identity=identity,
        admission=admission,
        peer_address=peer_address,
        initiator=initiator,
        window=window,
        max_piece=max_piece,
    )
    deadline = trio.current_time() + handshake_timeout
    if ssl_context is not None:
        app_stream = trio.SSLStream(stream, ssl_context, server_side=True)
        with trio.move_on_at(deadline) as tls_scope:
            try:
                await app_stream.do_handshake()
            except TRANSPORT_ERRORS as exc:
                _handshake_failed(hooks, label, ErrorCode.AUTH_FAILED, f"TLS: {describe(exc)}")
                return None
        if tls_scope.cancelled_caught:
            _handshake_failed(hooks, label, ErrorCode.TIMEOUT, "TLS handshake timed out")
            return None
    conn = make_conn(endpoint, app_stream)
    try:
        done = await conn._handshake(max(deadline - trio.current_time(), 0.0))
    except WireError as exc:
        conn._abort(ConnectionClosed("handshake failed", exc.code))
        _handshake_failed(hooks, label, exc.code, exc.message)
        return None
    except BaseException:
        conn._abort(ConnectionClosed("handshake abandoned", ErrorCode.BUSY))
        raise
    return conn, done


def _handshake_failed(hooks: WireHooks, label: str, code: ErrorCode, reason: str) -> None:
    hooks.handshake_failed(code)
    log.warning("event=wire_handshake_failed %s code=%s reason=%s", label, code.value, kv(reason))
