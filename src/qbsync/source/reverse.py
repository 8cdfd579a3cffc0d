"""Reverse dialing: ``qbsync source --listen`` -- the destination (``--connect``) dials in.

For a home behind NAT: the seedbox listens, home opens the connections. Only the TCP direction
changes; the source is still the protocol client that sends requests and pieces, and the pool
(:mod:`.pool`) still decides how many connections it wants. It gets them through
:meth:`ReverseHub.connector`, the pool's injected connection factory for this mode:

- the destination keeps at least one connection dialed in (it redials with a capped, jittered
  backoff, ``--reconnect-max-delay`` on its side);
- every authenticated connection that arrives waits in the *lobby* until a pool slot borrows it;
- a slot that finds the lobby empty asks the destination for one more (``OpenConnection`` on a
  connection it already has) and waits for it to arrive (:data:`ARRIVAL_TIMEOUT`; then it fails
  like a failed dial and the slot backs off);
- a slot that is done with a connection (the pool retires it, or the connection died) closes
  it; the destination does not redial it while another connection is up.

So the pool's growth logic is the same in both modes: opening a connection is "dial" forward
and "ask and await" here.

The listener admits only a peer that proves the token (``resolve()`` refuses ``--listen``
without one): the handshake runs before a connection reaches the lobby, under a deadline, and
a peer that fails it is logged with its code and closed. TLS: the listening side is the TLS
server (``--tls-cert``/``--tls-key``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .. import metrics
from ..log import kv
from ..wire.address import HostPort
from ..wire.client import ClientConnection, accept_connection
from ..wire.errors import ErrorCode, WireError, leaf_exceptions
from ..wire.keys import ADMIT_ANY, Admission
from ..wire.messages import OpenConnection
from ..wire.transport import peer_address
from .pool import Connection, Connector

log = logging.getLogger("qbsync.source.reverse")

ARRIVAL_TIMEOUT = 15.0  # how long a slot waits for a connection it asked for
FIRST_ARRIVAL_TIMEOUT = 30.0  # ... and for the destination's first one (nothing to ask on)
HANDSHAKE_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0
MAX_PENDING_HANDSHAKES = 16  # unauthenticated connections at once; more are closed at once


@attrs.define(eq=False)
class _Arrival:
    conn: ClientConnection
    peer: str
    released: trio.Event = attrs.field(factory=trio.Event)


class ReverseHub:
    def __init__(
        self,
        listen: HostPort,
        *,
        token: str,
        ssl_context: ssl.SSLContext | None,
        instance: str,
        max_idle: int,
        identity: Ed25519PrivateKey | None = None,
        admission: Admission = ADMIT_ANY,
    ) -> None:
        self.listen = listen
        self.identity = identity
        self.admission = admission  # never trust on first use: see identity.daemon.setup
        self.token = token
        self.ssl_context = ssl_context
        self.instance = instance
        self.max_idle = max(1, max_idle)  # arrivals kept waiting in the lobby at most
        self.ports: list[int] = []
        self._lobby: collections.deque[_Arrival] = collections.deque()
        self._borrowed: set[_Arrival] = set()
        self._arrived = trio.Event()
        self._pending = 0  # connections in their handshake

    @property
    def address(self) -> str:
        return f"listen {self.listen}"

    # -- the listener ---------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.listen.port, host=self.listen.host or None)
        self.ports = [
            lst.socket.getsockname()[1] for lst in listeners if isinstance(lst, trio.SocketListener)
        ]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            log.info(
                "event=source_listening addr=%s ports=%s tls=%s auth=true",
                self.listen,
                ",".join(map(str, self.ports)),
                self.ssl_context is not None,
            )
            task_status.started(self.ports)

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = peer_address(stream)
        if self._pending >= MAX_PENDING_HANDSHAKES:
            log.warning("event=wire_handshake_failed peer=%s code=busy reason=too_many", peer)
            metrics.WIRE_METRICS.handshake_failed(ErrorCode.BUSY)
            await trio.aclose_forcefully(stream)
            return
        self._pending += 1
        counted = True
        try:
            async with accept_connection(
                stream,
                token=self.token,
                identity=self.identity,
                admission=self.admission,
                ssl_context=self.ssl_context,
                handshake_timeout=HANDSHAKE_TIMEOUT,
                hooks=metrics.WIRE_METRICS,
                instance=self.instance,
            ) as conn:
                self._pending -= 1
                counted = False
                await self._host(_Arrival(conn, peer))
        except WireError as exc:
            # Wrong token, no TLS, a port scanner: logged, the connection closed; the
            # listener keeps serving.
            log.warning(
                "event=wire_handshake_failed peer=%s code=%s reason=%s",
                peer,
                exc.code.value,
                kv(exc.message or str(exc)),
            )
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("event=wire_connection_closed peer=%s reason=%s", peer, kv(str(exc)))
        except BaseExceptionGroup as group:
            if not all(isinstance(e, Exception) for e in leaf_exceptions(group)):
                raise
            log.warning("event=wire_connection_failed peer=%s error=%s", peer, kv(str(group)))
        finally:
            if counted:
                self._pending -= 1

    async def _host(self, arrival: _Arrival) -> None:
        """Keep an authenticated connection open until a slot is done with it (or it dies)."""
        conn = arrival.conn
        idle = sum(1 for a in self._lobby if not a.conn.closed)
        if idle >= self.max_idle:
            log.info("event=reverse_connection_surplus peer=%s idle=%d", arrival.peer, idle)
            return  # closed on return: the pool has all it wants
        log.info("event=reverse_connection_arrived peer=%s waiting=%d", arrival.peer, idle + 1)
        self._lobby.append(arrival)
        self._arrived.set()
        async with trio.open_nursery() as nursery:

            async def until_closed() -> None:
                await conn.wait_closed()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_closed)
            await arrival.released.wait()
            nursery.cancel_scope.cancel()

    # -- the pool's connection factory ----------------------------------------------------------

    def connector(self) -> Connector:
        return self._borrow

    @contextlib.asynccontextmanager
    async def _borrow(self) -> AsyncIterator[Connection]:
        arrival = await self._take()
        self._borrowed.add(arrival)
        try:
            yield arrival.conn
        finally:
            self._borrowed.discard(arrival)
            arrival.released.set()  # closes it: the destination does not redial it

    async def _take(self) -> _Arrival:
        asked = False
        while True:
            while self._lobby:
                arrival = self._lobby.popleft()
                if not arrival.conn.closed:
                    return arrival
                arrival.released.set()
            if self._arrived.is_set():
                self._arrived = trio.Event()
            if not asked:
                asked = await self._ask_for_one()
            timeout = ARRIVAL_TIMEOUT if asked else FIRST_ARRIVAL_TIMEOUT
            with trio.move_on_after(timeout) as cs:
                await self._arrived.wait()
            if cs.cancelled_caught:
                if asked:
                    raise WireError(
                        ErrorCode.TIMEOUT,
                        f"asked the destination for a connection; none arrived within "
                        f"{timeout:g}s on {self.listen}",
                    )
                raise WireError(
                    ErrorCode.TIMEOUT,
                    f"waiting for the destination to connect to {self.listen} "
                    f"(its --connect); none for {timeout:g}s",
                )

    async def _ask_for_one(self) -> bool:
        """Ask the destination, over a connection in use, to dial one more. False when there is
        no connection to ask on (the destination's own redial brings the first one)."""
        for arrival in list(self._borrowed):
            if arrival.conn.closed:
                continue
            try:
                result = await arrival.conn.request(OpenConnection(1), timeout=REQUEST_TIMEOUT)
            except (WireError, trio.TooSlowError) as exc:
                log.info(
                    "event=open_connection_refused peer=%s error=%s", arrival.peer, kv(str(exc))
                )
                continue
            if result.accepted > 0:
                log.debug("event=open_connection_requested peer=%s", arrival.peer)
                return True
            log.info("event=open_connection_refused peer=%s reason=destination_cap", arrival.peer)
            return False
        return False
