"""Connection pool: reconnect with backoff, auth failures logged with their code, generations."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from qbsync.source.pool import (
    HEALTHY_AFTER,
    QUEUE_AHEAD,
    ConnectionPool,
    DestinationUnavailable,
    describe_error,
)
from qbsync.wire.errors import ConnectionClosed, ErrorCode, WireError
from qbsync.wire.messages import Abort, AbortResult
from tests.source_fakes import FakeConn, FakeConnector

H = "ab" * 20
MB = 1_000_000


async def test_auth_failure_retries_with_backoff_then_connects(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="qbsync.source.pool")
    good = FakeConn(on_request=lambda msg: AbortResult(existed=msg.info_hash == H))
    connector = FakeConnector(
        lambda n: WireError(ErrorCode.AUTH_FAILED, "token mismatch") if n <= 4 else good
    )
    pool = ConnectionPool(connector, address="dest:1", reconnect_max_delay=3.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        with pytest.raises(DestinationUnavailable):
            await pool.pick(within=1.0)  # nothing transfers while auth fails
        conn = await pool.pick()
        assert conn is good and pool.generation == 1
        assert await pool.request(Abort(H), within=5) == AbortResult(existed=True)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(connector.attempts, connector.attempts[1:], strict=False)]
    assert len(gaps) == 4
    assert all(0.3 < g <= 3.0 + 1e-9 for g in gaps), (
        gaps
    )  # jittered, capped at --reconnect-max-delay
    assert gaps[2] > gaps[0]  # exponential
    failures = [r for r in caplog.records if "event=destination_connect_failed" in r.message]
    assert len(failures) == 4
    assert all("code=auth-failed" in r.message and r.levelno == logging.ERROR for r in failures)


async def test_reconnect_after_close_bumps_generation_and_backoff_resets(autojump_clock):
    conns: list[FakeConn] = []

    def script(n: int) -> FakeConn | BaseException:
        if n in (2, 3, 4):
            return OSError(111, "Connection refused")
        conns.append(FakeConn())
        return conns[-1]

    connector = FakeConnector(script)
    pool = ConnectionPool(connector, address="dest:1", reconnect_max_delay=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await pool.pick()
        assert pool.generation == 1
        conns[0].close()  # the destination went away
        await trio.sleep(0.01)
        assert pool.connected == 0 and pool.last_error is not None
        await pool.pick()
        assert pool.generation == 2  # a reconnect: senders re-initialize their torrents
        await trio.sleep(HEALTHY_AFTER + 1)  # healthy for a while ...
        closed_at = trio.current_time()
        conns[1].close()
        await pool.pick()
        nursery.cancel_scope.cancel()
    # ... so the reconnect after it waited the base delay again, not the grown one.
    assert connector.attempts[-1] - closed_at < 1.0
    assert pool.generation == 3


async def test_request_retries_once_on_a_closed_connection(autojump_clock):
    first = FakeConn(on_request=lambda msg: ConnectionClosed("gone"))
    second = FakeConn(on_request=lambda msg: AbortResult(existed=True))
    connector = FakeConnector(lambda n: first if n == 1 else second)
    pool = ConnectionPool(connector, address="d:1", min_connections=1, reconnect_max_delay=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await pool.pick()

        def close_first(msg: object) -> BaseException:
            first.close()
            return ConnectionClosed("gone")

        first.on_request = close_first
        assert await pool.request(Abort(H), within=10) == AbortResult(existed=True)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected_pool(*conns: FakeConn) -> AsyncIterator[ConnectionPool]:
    """A running pool whose connections are ``conns`` (all of them, at once), for the body
    of the ``with`` block."""
    it = iter(conns)
    n = len(conns)
    pool = ConnectionPool(
        FakeConnector(lambda _: next(it)), address="d:1", min_connections=n, max_connections=n
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        while pool.connected < n:  # noqa: ASYNC110
            await trio.sleep(0.01)
        yield pool
        nursery.cancel_scope.cancel()


async def test_pick_prefers_least_loaded(autojump_clock):
    a, b = FakeConn(), FakeConn()
    async with connected_pool(a, b) as pool:
        a.inflight_bytes = 10
        assert await pool.pick() is b
        b.inflight_bytes = 20
        assert await pool.pick() is a


async def test_pick_counts_pieces_queued_behind_a_connection(autojump_clock):
    """Pieces assigned but not written yet (waiting for credit) count as load: pieces
    alternate, and a connection with more credit left takes the next one."""
    a, b = FakeConn(), FakeConn()
    async with connected_pool(a, b) as pool:
        first = await pool.pick(nbytes=100)
        second = await pool.pick(nbytes=100)
        assert {first, second} == {a, b}
        assert pool.queued_bytes(a) == pool.queued_bytes(b) == 100
        pool.unassign(a, 100)
        assert await pool.pick(nbytes=100) is a
        pool.unassign(a, 100)
        pool.unassign(b, 100)
        a.credit = 10_000  # b can take more now
        assert await pool.pick(nbytes=100) is b


async def test_pick_waits_while_every_connection_has_a_queue(autojump_clock):
    """A piece is bound to a connection only when one has room: not a whole torrent at once."""
    a = FakeConn()
    async with connected_pool(a) as pool:
        for _ in range(QUEUE_AHEAD):
            await pool.pick(nbytes=100)
        with trio.move_on_after(5) as scope:
            await pool.pick(nbytes=100)
        assert scope.cancelled_caught
        pool.unassign(a, 100)
        with trio.fail_after(1):
            assert await pool.pick(nbytes=100) is a


async def test_scales_to_max_while_pieces_queue_on_every_connection(autojump_clock, caplog):
    """Window-limited path: every connection has pieces waiting on it (the queue itself is
    empty because senders hold the pieces), each new connection adds throughput."""
    caplog.set_level(logging.INFO, logger="qbsync.source.pool")
    connector = FakeConnector(lambda n: FakeConn())
    pool = ConnectionPool(connector, address="d:1", min_connections=2, max_connections=5)

    async def queue_on_each() -> None:
        while True:
            for c in pool.connections():
                if pool.queued_bytes(c) < 10 * MB:
                    pool._assigned[id(c)] = pool._assigned.get(id(c), 0) + 1_000_000
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        nursery.start_soon(_feed, pool, True)
        nursery.start_soon(queue_on_each)
        await trio.sleep(30)
        connected = pool.connected
        nursery.cancel_scope.cancel()
    assert connected == 5
    assert not [r for r in caplog.records if "reason=no_gain" in r.message]


def test_describe_error_unwraps_groups_and_keeps_cancellation():
    assert describe_error(WireError(ErrorCode.AUTH_FAILED, "bad")) == ("auth-failed", "bad")
    assert describe_error(OSError(111, "Connection refused")) == (
        "connect-failed",
        "Connection refused",
    )
    group = ExceptionGroup("g", [ValueError("x"), WireError(ErrorCode.TIMEOUT, "slow")])
    assert describe_error(group) == ("timeout", "slow")
    assert describe_error(KeyboardInterrupt()) is None
    assert describe_error(BaseExceptionGroup("g", [KeyboardInterrupt()])) is None


async def _feed(pool: ConnectionPool, per_connection: bool) -> None:
    """Acknowledge 1 MB per 100 ms per connection (or in total): the simulated link."""
    while True:
        await trio.sleep(0.1)
        pool.record_acked(1_000_000 * (pool.connected if per_connection else 1))


async def test_scales_up_while_connections_are_the_bottleneck(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="qbsync.source.pool")
    starved = lambda n: FakeConn()  # noqa: E731
    connector = FakeConnector(starved)
    pool = ConnectionPool(
        connector, address="d:1", min_connections=1, max_connections=3, queue_depth=lambda: 100
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        nursery.start_soon(_feed, pool, True)
        await trio.sleep(0.5)
        for c in connector.conns:
            c.credit = 0  # every connection waits for the destination's credit
        while pool.connected < 3:
            for c in connector.conns:
                c.credit = 0
            await trio.sleep(0.1)
        await trio.sleep(60)
        connected = pool.connected
        nursery.cancel_scope.cancel()
    assert connected == 3
    assert not [r for r in caplog.records if "reason=no_gain" in r.message]


async def test_extra_connection_without_gain_is_removed(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="qbsync.source.pool")
    connector = FakeConnector(lambda n: FakeConn())
    pool = ConnectionPool(
        connector, address="d:1", min_connections=1, max_connections=3, queue_depth=lambda: 100
    )

    async def starve() -> None:
        while True:
            for c in connector.conns:
                c.credit = 0
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        nursery.start_soon(_feed, pool, False)  # the link is the limit, not connections
        nursery.start_soon(starve)
        await trio.sleep(30)
        connected = pool.connected
        nursery.cancel_scope.cancel()
    assert [r for r in caplog.records if "reason=no_gain" in r.message]
    assert connected == 1
    ups = [r for r in caplog.records if "direction=up" in r.message]
    assert len(ups) == 1  # cooldown: no second attempt within 60 s
