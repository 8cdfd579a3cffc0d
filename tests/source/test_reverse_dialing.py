"""Reverse dialing in process, over real loopback sockets: the source listens
(:class:`ReverseHub`), the destination dials (:class:`Dialer`), and the source's pool grows and
shrinks through the injected connection factory exactly as it does by dialing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from qbsync import metrics
from qbsync.destination.dialer import Dialer
from qbsync.source.pool import ConnectionPool
from qbsync.source.reverse import ReverseHub
from qbsync.wire import DEFAULT_MAX_PIECE, ByteBudget, HostPort, Peer
from qbsync.wire.errors import ErrorCode, WireError
from qbsync.wire.messages import Piece, PieceAck, StartResult, StartTorrent

TOKEN = "0123456789abcdef0123456789abcdef"


class Handler:
    """A destination that answers StartTorrent and records who asked."""

    def __init__(self) -> None:
        self.peers: list[str] = []

    async def handle_request(self, peer: Peer, request: Any) -> Any:
        self.peers.append(peer.instance)
        if isinstance(request, StartTorrent):
            return StartResult(True)
        raise WireError(ErrorCode.BAD_REQUEST, "not in this test")

    async def handle_piece(self, peer: Peer, piece: Piece) -> PieceAck:
        return PieceAck(piece.info_hash, piece.index)


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(30):
        while not condition():  # noqa: ASYNC110  (state of real sockets: polled, under a deadline)
            await trio.sleep(0.01)


async def start(nursery: trio.Nursery, *, token: str = TOKEN) -> tuple[ReverseHub, Dialer, Handler]:
    hub = ReverseHub(
        HostPort("127.0.0.1", 0), token=TOKEN, ssl_context=None, instance="box", max_idle=4
    )
    ports = await nursery.start(hub.run)
    handler = Handler()
    opened: list[tuple[str, bool]] = []
    dialer = Dialer(
        HostPort("127.0.0.1", ports[0]),
        handler,
        token=token,
        ssl_context=None,
        budget=ByteBudget(1 << 20),
        reconnect_max_delay=1.0,
        on_peer=lambda peer, up: opened.append((peer.instance, up)),
        max_piece=DEFAULT_MAX_PIECE,
    )
    await nursery.start(dialer.run)
    return hub, dialer, handler


async def test_pool_grows_and_shrinks_through_the_destination(nursery: trio.Nursery) -> None:
    hub, dialer, handler = await start(nursery)
    pool = ConnectionPool(
        hub.connector(), address=hub.address, min_connections=1, max_connections=3
    )
    await nursery.start(pool.run)
    await until(lambda: pool.connected == 1 and dialer.open == 1)
    # A request goes source -> destination over the connection the destination dialed, and
    # the destination knows which source it is (Hello.instance).
    assert (await pool.request(StartTorrent("ab" * 20), within=10)).started
    assert handler.peers == ["box"]
    # Growing: what the scaler does (a new slot) asks the destination for one more.
    slot = pool._add_slot()
    await until(lambda: pool.connected == 2 and dialer.open == 2)
    assert metrics.connections_active._value.get() == 2
    # Shrinking: the retired slot closes its connection; the destination does not redial it.
    await pool._retire(slot)
    await until(lambda: pool.connected == 1 and dialer.open == 1)
    assert metrics.connections_active._value.get() == 1
    assert (await pool.request(StartTorrent("ab" * 20), within=10)).started
    assert dialer.open == 1
    nursery.cancel_scope.cancel()


async def test_listening_source_refuses_a_wrong_token(nursery: trio.Nursery) -> None:
    before = metrics.REGISTRY.get_sample_value(
        "qbsync_wire_handshake_failures_total", {"code": "auth-failed"}
    )
    hub, _dialer, _ = await start(nursery, token="f" * 32)
    await until(
        lambda: (
            (
                metrics.REGISTRY.get_sample_value(
                    "qbsync_wire_handshake_failures_total", {"code": "auth-failed"}
                )
                or 0
            )
            > (before or 0)
        )
    )
    assert not hub._lobby and not hub._borrowed  # nothing reached the pool
    nursery.cancel_scope.cancel()
