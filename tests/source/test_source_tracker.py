"""The per-piece state machine and the shared queue: each piece is queued once
(docs/design-decisions.md#each-piece-queued-once)."""

from __future__ import annotations

import trio

from qbsync.bitfield import Bitfield
from qbsync.source.tracker import BACKLOG, LIVE, PieceQueue, PieceTracker


def test_ready_pieces_are_queued_once():
    t = PieceTracker(6)
    assert t.mark_ready([2, 0, 2, 1, 0, 0], now=1.0) == [0, 2]
    # The same states again queue nothing (the Go reference re-queued every 500 ms).
    assert t.mark_ready([2, 0, 2, 1, 0, 0], now=2.0) == []
    assert t.take(0)
    assert t.mark_ready([2, 2, 2, 2, 0, 0], now=3.0) == [1, 3]  # in flight: not re-queued
    assert t.state(0) == "inflight" and t.state(2) == "pending" and t.state(4) == "waiting"
    assert t.first_seen[0] == 1.0 and t.first_seen[1] == 3.0


def test_take_ack_fail_release():
    t = PieceTracker(3)
    t.mark_ready([2, 2, 2], 0.0)
    assert t.take(0) and not t.take(0)  # a stale duplicate entry cannot take it twice
    assert t.ack(0) and not t.ack(0)
    assert t.take(1)
    assert t.fail(1) == 1 and t.state(1) == "pending"
    assert t.take(1)
    assert t.fail(1, requeue=False) == 2 and t.state(1) == "waiting"
    assert t.mark_ready([2, 2, 2], 1.0) == [1]  # waiting + ready -> queued by the next poll
    assert t.take(1) and t.ack(1)
    assert 1 not in t.failures  # success clears the failure count
    assert t.take(2)
    t.requeue(2)
    assert t.state(2) == "pending" and 2 not in t.failures
    assert t.sends == {0: 1, 1: 3, 2: 1}


def test_complete_needs_everything_done_and_nothing_in_flight():
    t = PieceTracker(3, mask=[2])  # piece 2 lies only in deselected files
    assert t.done[2] and not t.complete
    t.mark_ready([2, 2, 0], 0.0)
    t.take(0), t.take(1)
    t.ack(0)
    assert not t.complete
    t.ack(1)
    assert t.complete


def test_give_up_lets_finalize_run():
    t = PieceTracker(2)
    t.mark_ready([2, 2], 0.0)
    t.take(0), t.ack(0)
    t.take(1)
    t.give_up(1)
    assert t.complete and t.forced == {1}


def test_apply_needed_resumes_and_protects_fresh_acks():
    t = PieceTracker(5, mask=[4])
    t.mark_ready([2, 2, 2, 2, 0], 0.0)
    for i in (0, 1, 2):
        t.take(i)
    t.ack(0)
    t.begin_resync()
    t.ack(1)  # acknowledged while the InitTorrent was in flight
    needed = Bitfield.from_indices(5, [0, 1, 3, 4])  # destination lost 0, has 2 (in flight)
    t.apply_needed(needed)
    assert not t.done[0]  # lost on the destination: will be sent again
    assert t.done[1]  # its ack is newer than the destination's answer
    assert t.done[4]  # masked pieces stay done whatever the destination says
    assert t.state(2) == "inflight"
    assert t.state(3) == "pending"
    assert t.requeue_ready() == [0]
    t.apply_needed(None)  # COMPLETE, but piece 2's own ack settles it
    assert t.state(2) == "inflight" and not t.complete
    assert t.ack(2)  # COMPLETE: everything is there
    assert t.done.all() and not t.pending


async def test_queue_orders_live_before_backlog_and_skips_stale():
    pending: set[tuple[str, int]] = set()
    q = PieceQueue(lambda item: (item.info_hash, item.index) in pending)
    for h, i in [("b", 0), ("b", 1), ("a", 0), ("c", 5)]:
        pending.add((h, i))
    q.push("b", [0, 1], BACKLOG, key=2)
    q.push("a", [0], BACKLOG, key=1)  # tracked earlier: the destination had more of it
    q.push("c", [5], LIVE)
    pending.discard(("b", 0))  # untracked/taken meanwhile: skipped when popped
    got = [(it.info_hash, it.index) for it in [await q.get() for _ in range(3)]]
    assert got == [("c", 5), ("a", 0), ("b", 1)]
    assert q.pop_nowait() is None

    async def later() -> None:
        await trio.sleep(0.01)
        pending.add(("d", 1))
        q.push("d", [1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        with trio.fail_after(2):
            item = await q.get()  # parks until something is pushed
    assert (item.info_hash, item.index) == ("d", 1)


async def test_handoff_tagged_torrent_jumps_the_queue() -> None:
    """--handoff-tag: pieces of an urgent torrent go before live and backlog pieces, also when
    the tag arrives while its pieces are already queued (the stale entries are skipped)."""
    from types import SimpleNamespace
    from typing import Any, cast

    from qbsync.source.state import Registry

    def meta(h: str) -> Any:
        return cast(Any, SimpleNamespace(info_hash=h, num_pieces=3))

    registry = Registry()
    old = registry.add(meta("old"), PieceTracker(3), since=0)
    live = registry.add(meta("live"), PieceTracker(3), since=0)
    live.first_poll_finished()
    moved = registry.add(meta("moved"), PieceTracker(3), since=0)
    for t in (old, live, moved):
        registry.enqueue(t, t.tracker.mark_ready([2, 2, 2], 0.0))
    registry.make_urgent(moved)
    order = []
    while (item := registry.queue.pop_nowait()) is not None:
        got = registry.get(item.info_hash)
        assert got is not None
        if got.tracker.take(item.index):
            order.append(item.info_hash)
    assert order == ["moved"] * 3 + ["live"] * 3 + ["old"] * 3
    fresh = registry.add(meta("fresh"), PieceTracker(2), since=0)
    fresh.mark_urgent()
    registry.enqueue(fresh, fresh.tracker.mark_ready([2, 2], 0.0))
    assert registry.queue.pop_nowait().info_hash == "fresh"  # type: ignore[union-attr]
