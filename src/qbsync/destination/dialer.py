"""Reverse dialing: ``qbsync destination --connect HOST:PORT`` dials a source's ``--listen``.

One :class:`Dialer` per ``--connect`` address. It keeps at least one connection to that source
up: when none is open it dials, and after a failure (or a connection that did not stay up
:data:`HEALTHY_AFTER` seconds) it waits a jittered exponential backoff capped at
``--reconnect-max-delay`` first. Every further connection is the source's decision: its pool
asks with ``OpenConnection`` and closes the ones it no longer wants, and a connection the
source closed is not redialed while another one is up -- so the source's adaptive pool
behaves as in forward mode (:mod:`qbsync.source.reverse`).

Only the TCP direction is reversed: over each dialed stream the destination runs the same
handshake as the protocol server and serves the same requests and pieces
(:func:`qbsync.wire.server.serve_dialed`); TLS is done by the dialing side as the client
(``--tls-ca``), whatever the role.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .. import metrics
from ..log import kv
from ..ratelimit import Backoff
from ..wire.address import HostPort
from ..wire.budget import ByteBudget
from ..wire.errors import WireError
from ..wire.keys import ADMIT_ANY, Admission
from ..wire.messages import OpenConnection, OpenConnectionResult, Piece, PieceAck
from ..wire.server import OpenPeers, Peer, PeerHook, ServerHandler, serve_dialed
from ..wire.transport import describe, dial

log = logging.getLogger("qbsync.destination.dialer")

RECONNECT_BASE = 0.5
HEALTHY_AFTER = 10.0  # a connection up this long resets the backoff
CONNECT_TIMEOUT = 10.0
MAX_CONNECTIONS = 32  # per source: more OpenConnection requests are answered accepted=0


class Dialer:
    def __init__(
        self,
        addr: HostPort,
        handler: ServerHandler,
        *,
        token: str | None,
        identity: Ed25519PrivateKey | None = None,
        admission: Admission = ADMIT_ANY,
        ssl_context: ssl.SSLContext | None,
        budget: ByteBudget,
        reconnect_max_delay: float,
        on_peer: PeerHook,
        max_piece: int,
        peers: OpenPeers | None = None,
    ) -> None:
        self.addr = addr
        self.handler = handler
        self.token = token
        self.identity = identity
        self.admission = admission
        self.ssl_context = ssl_context
        self.budget = budget
        self.reconnect_max_delay = reconnect_max_delay
        self.on_peer = on_peer
        self.peers = peers  # the status page's list of open connections
        self.max_piece = max_piece
        self.open = 0  # connections dialing, in their handshake or up
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backoff = Backoff(RECONNECT_BASE, self.reconnect_max_delay)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                if self._up():
                    # Up: nothing to do until the last connection ends.
                    await self._changed.wait()
                    self._changed = trio.Event()
                    continue
                up_for = await self._connection()
                if up_for >= HEALTHY_AFTER:
                    backoff.reset()
                if self._up():
                    continue  # others are still up: the source has what it asked for
                delay = backoff.next_delay()
                log.warning(
                    "event=dial_retry addr=%s retry_in_s=%.1f attempt=%d",
                    self.addr,
                    delay,
                    backoff.failures,
                )
                await trio.sleep(delay)

    def _up(self) -> bool:
        return self.open > 0

    def open_more(self, count: int) -> int:
        """The source asked for ``count`` more connections: dial them (up to the cap)."""
        n = max(0, min(count, MAX_CONNECTIONS - self.open))
        if self._nursery is not None:
            for _ in range(n):
                self._nursery.start_soon(self._connection)
        return n

    async def _connection(self) -> float:
        """Dial, serve until the connection ends; how long it was up (0: never)."""
        self.open += 1
        started = trio.current_time()
        try:
            with trio.move_on_after(CONNECT_TIMEOUT) as cs:
                stream = await dial(self.addr, ssl_context=self.ssl_context)
            if cs.cancelled_caught:
                log.warning("event=dial_failed addr=%s code=timeout", self.addr)
                return 0.0
        except (OSError, WireError) as exc:
            code = exc.code.value if isinstance(exc, WireError) else "connect-failed"
            log.warning(
                "event=dial_failed addr=%s code=%s error=%s", self.addr, code, kv(describe(exc))
            )
            return 0.0
        else:
            log.info("event=dialed addr=%s connections=%d", self.addr, self.open)
            await serve_dialed(
                stream,
                _DialedHandler(self.handler, self),
                token=self.token,
                identity=self.identity,
                admission=self.admission,
                budget=self.budget,
                max_piece=self.max_piece,
                hooks=metrics.WIRE_METRICS,
                on_peer=self.on_peer,
                peers=self.peers,
            )
            return trio.current_time() - started
        finally:
            self.open -= 1
            self._changed.set()


class _DialedHandler:
    """The destination's handler, plus ``OpenConnection`` (meaningful only on a connection the
    destination dialed: it dials the same source again)."""

    def __init__(self, inner: ServerHandler, dialer: Dialer) -> None:
        self.inner = inner
        self.dialer = dialer

    async def handle_request(self, peer: Peer, request: Any) -> Any:
        if isinstance(request, OpenConnection):
            accepted = self.dialer.open_more(request.count)
            log.info(
                "event=open_connection addr=%s asked=%d accepted=%d connections=%d",
                self.dialer.addr,
                request.count,
                accepted,
                self.dialer.open,
            )
            return OpenConnectionResult(accepted)
        return await self.inner.handle_request(peer, request)

    async def handle_piece(self, peer: Peer, piece: Piece) -> PieceAck:
        return await self.inner.handle_piece(peer, piece)
