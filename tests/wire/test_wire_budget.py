"""ByteBudget: the destination's global bound on piece bytes in memory (no sockets)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from qbsync.wire import ByteBudget


async def test_fast_path_and_release() -> None:
    budget = ByteBudget(100)
    assert await budget.acquire(60) == 60
    assert (budget.used, budget.available, budget.peak) == (60, 40, 60)
    budget.release(60)
    assert budget.used == 0 and budget.peak == 60
    with pytest.raises(ValueError):
        budget.release(1)
    with pytest.raises(ValueError):
        ByteBudget(0)


async def test_oversized_requests_take_the_whole_budget() -> None:
    budget = ByteBudget(100)
    assert budget.charge_for(1000) == 100
    assert await budget.acquire(1000) == 100
    budget.release(100)


async def test_waiters_are_served_in_order_so_big_pieces_are_not_starved() -> None:
    budget = ByteBudget(100)
    order: list[str] = []
    await budget.acquire(50)

    async def want(name: str, n: int) -> None:
        charge = await budget.acquire(n)
        order.append(name)
        await trio.sleep(0.01)
        budget.release(charge)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(want, "big", 100)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(want, "small", 10)  # fits now, but must queue behind "big"
            await trio.testing.wait_all_tasks_blocked()
            assert order == [] and budget.used == 50
            budget.release(50)
    assert order == ["big", "small"]
    assert budget.used == 0 and budget.peak == 100


async def test_cancelled_waiter_leaves_no_trace() -> None:
    budget = ByteBudget(100)
    await budget.acquire(100)
    with trio.move_on_after(0.05) as cs:
        await budget.acquire(10)
    assert cs.cancelled_caught
    budget.release(100)
    assert budget.used == 0
    assert await budget.acquire(100) == 100  # the cancelled waiter is not still queued


async def test_one_release_wakes_every_waiter_that_fits() -> None:
    budget = ByteBudget(100)
    await budget.acquire(100)
    got: list[int] = []

    async def want(n: int) -> None:
        got.append(await budget.acquire(n))

    async with trio.open_nursery() as nursery:
        for n in (30, 30, 30, 30):
            nursery.start_soon(want, n)
            await trio.testing.wait_all_tasks_blocked()
        budget.release(100)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [30, 30, 30] and budget.used == 90  # the fourth does not fit yet
        budget.release(30)
    assert got == [30, 30, 30, 30]


async def test_buffer_pool_reuses_and_stays_within_the_limit() -> None:
    budget = ByteBudget(4 * 1024 * 1024)  # pool cap: a quarter of the limit
    charge = await budget.acquire(1024)
    buf = budget.take_buffer(1024)
    assert len(buf) == 1024
    budget.recycle(buf)
    budget.release(charge)
    assert budget.pooled == 1024
    again = budget.take_buffer(1024)
    assert again is buf and budget.pooled == 0
    assert len(budget.take_buffer(999)) == 999  # other sizes are fresh allocations
    budget.recycle(again)
    # Charges evict pooled buffers so that used + pooled never exceeds the limit.
    await budget.acquire(budget.limit)
    assert budget.pooled == 0
    budget.release(budget.limit)


async def test_pool_is_capped() -> None:
    budget = ByteBudget(4000)  # cap 1000
    for _ in range(5):
        budget.recycle(bytearray(300))
    assert budget.pooled == 900
    budget.recycle(bytearray(0))
    assert budget.pooled == 900
