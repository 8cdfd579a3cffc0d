"""The pool's growth policy (qbsync.source.growth) alone and driven by the pool on Trio's
MockClock (``autojump_clock``): a simulated link where each connection carries a fixed rate up
to a path limit, every connection has a piece waiting on it while there is work."""

from __future__ import annotations

import logging
import re

import pytest
import trio

from qbsync.source.growth import Action, GrowthPolicy, Sample
from qbsync.source.pool import ConnectionPool
from tests.source_fakes import FakeConn, FakeConnector

MB = 1_000_000
TICK = 0.01


def _sample(throughput: float, n: int, saturated: bool = True) -> Sample:
    return Sample(throughput=throughput, slots=n, connected=n, saturated=saturated, demand=True)


def test_policy_doubles_while_each_step_pays_then_undoes_a_step_without_gain():
    p = GrowthPolicy(2, 16)
    t, n = 0.0, 2
    steps = []
    for _ in range(40):
        rate = min(n, 4) * MB  # the path carries 4 connections' worth
        d = p.step(t, _sample(rate, n))
        if d.action is Action.ADD:
            steps.append(("up", d.count, d.reason))
            n += d.count
        elif d.action is Action.RETIRE:
            steps.append(("down", d.count, d.reason))
            n -= d.count
        t += 0.5
    assert steps == [("up", 2, "saturated"), ("up", 4, "saturated"), ("down", 4, "no_gain")]
    assert n == 4


def test_policy_goes_additive_when_a_step_gains_less_than_half_of_its_share():
    p = GrowthPolicy(2, 16)
    t, n = 0.0, 4
    ups = []
    for _ in range(60):
        rate = min(n, 5) * MB  # 4 -> 8 gains 25 %: kept, then one at a time
        d = p.step(t, _sample(rate, n))
        if d.action is Action.ADD:
            ups.append(d.count)
            n += d.count
        elif d.action is Action.RETIRE:
            n -= d.count
        t += 0.5
    assert ups[:2] == [4, 1]
    assert not p.doubling
    assert n == 8  # the single extra one gained nothing and was undone


def test_policy_waits_for_a_baseline_before_a_step():
    """First interval of a long-RTT transfer: every connection has pieces waiting, no ack is
    back yet. A step judged against 0 would be undone as "no gain"; it waits for traffic."""
    p = GrowthPolicy(2, 8)
    assert p.step(0.0, _sample(0.0, 2)).action is Action.HOLD
    d = p.step(0.5, _sample(40 * MB, 2))
    assert (d.action, d.count) == (Action.ADD, 2)


def test_policy_holds_at_max_and_without_saturation():
    p = GrowthPolicy(2, 2)
    assert all(p.step(i, _sample(MB, 2)).action is Action.HOLD for i in range(10))
    p = GrowthPolicy(1, 8)
    assert all(p.step(i, _sample(MB, 1, saturated=False)).action is Action.HOLD for i in range(10))


async def _link(pool: ConnectionPool, per_conn: float, limit: float, busy: list[bool]) -> None:
    """Every 10 ms: acknowledge min(connections x per_conn, limit) bytes/s worth, and keep a
    piece waiting on every connection while ``busy[0]``. (Ticks much shorter than the pool's
    interval, so where a tick falls moves a measured throughput by 2 %, not by the 10 % the
    policy asks of a step.)"""
    while True:
        await trio.sleep(TICK)
        if not busy[0]:
            continue
        conns = [s.conn for s in pool._slots if s.conn is not None and not s.retiring]
        for s in pool._slots:  # a retiring one finishes what it had and gets nothing new
            if s.retiring and s.conn is not None:
                pool.unassign(s.conn, pool._assigned.get(id(s.conn), 0))
        for _ in conns:  # one "piece" per connection, so the pool's piece-size hint holds
            pool.record_acked(int(min(len(conns) * per_conn, limit) * TICK / len(conns)))
        for c in conns:
            if pool.queued_bytes(c) < MB // 2:
                pool._assigned[id(c)] = pool._assigned.get(id(c), 0) + MB


def _scale_log(caplog) -> list[tuple[str, int, str]]:
    out = []
    for r in caplog.records:
        m = re.search(r"event=connection_scale direction=(\w+) reason=(\w+) count=(\d+)", r.message)
        if m:
            out.append((m.group(1), int(m.group(3)), m.group(2)))
    return out


@pytest.fixture(autouse=True)
def _pool_log(caplog):
    """Every pool test reads the pool's scaling decisions from its log."""
    caplog.set_level(logging.INFO, logger="qbsync.source.pool")


def _pool(max_connections: int) -> ConnectionPool:
    return ConnectionPool(
        FakeConnector(lambda n: FakeConn()),
        address="d:1",
        min_connections=2,
        max_connections=max_connections,
    )


async def _connected_after(pool: ConnectionPool, seconds: float, per_conn: float, limit: float):
    """Run ``pool`` on a busy simulated link for ``seconds`` of mock time; how many
    connections it then has."""
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        nursery.start_soon(_link, pool, per_conn, limit, [True])
        await trio.sleep(seconds)
        connected = pool.connected
        nursery.cancel_scope.cancel()
    return connected


async def test_pool_grows_while_throughput_grows(autojump_clock, caplog):
    connected = await _connected_after(_pool(16), 20, 20 * MB, float("inf"))
    assert connected == 16
    assert _scale_log(caplog) == [
        ("up", 2, "saturated"),
        ("up", 4, "saturated"),
        ("up", 8, "saturated"),
    ]


async def test_pool_stops_growing_when_throughput_does_not(autojump_clock, caplog):
    connected = await _connected_after(_pool(16), 25, 20 * MB, 80 * MB)  # 4 connections fill it
    assert connected == 4
    assert _scale_log(caplog) == [
        ("up", 2, "saturated"),
        ("up", 4, "saturated"),
        ("down", 4, "no_gain"),
    ]


async def test_pool_shrinks_to_the_minimum_when_idle(autojump_clock, caplog):
    pool = _pool(8)
    busy = [True]
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        nursery.start_soon(_link, pool, 20 * MB, float("inf"), busy)
        while pool.connected < 8:  # noqa: ASYNC110
            await trio.sleep(0.5)
        busy[0] = False
        pool._assigned.clear()  # the work is done: nothing waits on any connection
        await trio.sleep(30)
        still = pool.connected  # not idle long enough yet
        await trio.sleep(60)
        connected = pool.connected
        nursery.cancel_scope.cancel()
    assert still == 8
    assert connected == 2
    downs = [e for e in _scale_log(caplog) if e[0] == "down"]
    assert downs == [("down", 1, "idle")] * 6


async def test_pool_grows_when_the_memory_budget_hides_the_bottleneck(autojump_clock, caplog):
    """Nothing queues on any connection because every byte of --max-inflight is between disk
    and ack (window-limited connections hold it): with pieces waiting in the queue, that
    counts as the connections being the bottleneck."""
    connector = FakeConnector(lambda n: FakeConn())
    pool = ConnectionPool(
        connector, address="d:1", min_connections=2, max_connections=4, queue_depth=lambda: 10
    )
    pool.memory_starved = lambda: True

    async def link() -> None:
        while True:
            await trio.sleep(0.05)
            for c in connector.conns:
                c.inflight_bytes = MB  # carrying pieces; none queued behind them
                pool.record_acked(MB)

    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        nursery.start_soon(link)
        await trio.sleep(10)
        connected = pool.connected
        nursery.cancel_scope.cancel()
    assert connected == 4
    assert _scale_log(caplog) == [("up", 2, "saturated")]
