"""The monitor: maindata merging, and idle cost independent of the number of torrents."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any, cast

import trio

from qbsync.source.monitor import MaindataUpdate, Monitor, merge_maindata
from qbsync.source.state import Registry
from qbsync.source.tracker import PieceTracker


def test_merge_full_partial_and_removed():
    torrents: dict[str, dict[str, Any]] = {}
    u = merge_maindata(
        torrents,
        {"full_update": True, "torrents": {"a": {"progress": 0.5, "tags": ""}, "b": {}}},
    )
    assert u.full and u.added == {"a", "b"} and not u.removed
    assert torrents["a"]["hash"] == "a"
    u = merge_maindata(torrents, {"torrents": {"a": {"progress": 0.6}}, "torrents_removed": ["b"]})
    assert u.changed == {"a": frozenset({"progress"})} and u.removed == {"b"}
    assert torrents == {"a": {"progress": 0.6, "tags": "", "hash": "a"}}  # fields kept
    # A full update after a qBittorrent restart: missing hashes count as removed, only real
    # value changes count as changed.
    torrents["c"] = {"hash": "c"}
    u = merge_maindata(
        torrents, {"full_update": True, "torrents": {"a": {"progress": 0.6, "tags": "x"}}}
    )
    assert u.removed == {"c"} and u.changed["a"] == {"tags"} and not u.added


class FakeQB:
    """sync/maindata over ``n`` torrents; piece states for any hash."""

    def __init__(self, n: int, num_pieces: int) -> None:
        self.calls: Counter[str] = Counter()
        self.full = {f"{i:040x}": {"state": "stalledUP", "progress": 1.0} for i in range(n)}
        self.deltas: list[dict[str, Any]] = []
        self.num_pieces = num_pieces

    async def maindata(self, rid: int) -> dict[str, Any]:
        self.calls["maindata"] += 1
        if rid == 0:
            return {"rid": 1, "full_update": True, "torrents": dict(self.full)}
        delta = self.deltas.pop(0) if self.deltas else {}
        return {"rid": rid + 1, **delta}

    async def piece_states(self, info_hash: str) -> list[int]:
        self.calls["piece_states"] += 1
        return [2] * self.num_pieces


def _track(registry: Registry, info_hash: str, num_pieces: int) -> Any:
    meta = SimpleNamespace(info_hash=info_hash, name="t", num_pieces=num_pieces)
    return registry.add(cast(Any, meta), PieceTracker(num_pieces), since=0)


async def test_idle_cost_is_independent_of_torrent_count(autojump_clock):
    qb = FakeQB(n=2000, num_pieces=4)
    registry = Registry()
    updates: list[MaindataUpdate] = []
    monitor = Monitor(cast(Any, qb), registry, interval=0.5, on_update=updates.append)
    tracked = [_track(registry, h, 4) for h in list(qb.full)[:20]]
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        await trio.sleep(60)
        idle_calls = dict(qb.calls)
        # One tracked torrent makes progress: only it gets its piece states polled.
        qb.deltas.append({"torrents": {tracked[0].info_hash: {"progress": 1.0, "completed": 1}}})
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    # 60 s idle = ~120 maindata calls (2/s) whatever the 2,000 torrents; piece states only
    # for the 20 tracked torrents' first poll and its two follow-ups.
    assert 115 <= idle_calls["maindata"] <= 125
    assert idle_calls["piece_states"] == 20 * 3
    assert qb.calls["piece_states"] - idle_calls["piece_states"] == 3
    assert len(monitor.torrents) == 2000 and updates[0].full
    # Each piece was queued exactly once, no matter how many polls saw it ready.
    assert len(registry.queue) == 20 * 4


async def test_removed_torrent_and_404_are_reported(autojump_clock):
    from qbsync.qbittorrent.api import QBError

    qb = FakeQB(n=3, num_pieces=2)
    h0, h1 = list(qb.full)[:2]
    removed: list[str] = []
    registry = Registry()

    async def piece_states(info_hash: str) -> list[int]:
        if info_hash == h1:
            raise QBError("torrents_piece_states", "404", transient=False, not_found=True)
        return [0, 0]

    qb.piece_states = piece_states  # type: ignore[method-assign]
    monitor = Monitor(
        cast(Any, qb),
        registry,
        on_update=lambda u: removed.extend(sorted(u.removed)),
        on_removed=removed.append,
    )
    _track(registry, h1, 2)
    qb.deltas.append({"torrents_removed": [h0]})
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    assert {h0, h1} <= set(removed)
