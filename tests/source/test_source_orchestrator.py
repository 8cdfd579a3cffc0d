"""Discovery and finalize decisions of the orchestrator.

The orchestrator runs for real (its own loop, in a nursery) against a real connection pool and
monitor; only the edges are fakes that implement the real interfaces: ``FakeQB`` (a ``QB``)
and ``FakeDestination`` (the connections the pool opens). Time is Trio's ``MockClock`` with
autojump, so ``--sleep`` cycles, finalize polls and backoffs take no real time.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from qbsync.source.cache import CompletionCache, fingerprint
from qbsync.source.meta import build_meta
from qbsync.source.monitor import MaindataUpdate, Monitor
from qbsync.source.orchestrator import MAINTENANCE_EVERY, Orchestrator, is_transient, skip_reason
from qbsync.source.paths import PathMapper
from qbsync.source.pool import ConnectionPool, DestinationUnavailable
from qbsync.source.reader import PieceReader
from qbsync.source.state import Registry, Tracked
from qbsync.source.tracker import PieceTracker
from qbsync.wire.errors import ConnectionClosed, ErrorCode, WireError
from qbsync.wire.messages import (
    Abort,
    AbortResult,
    Finalize,
    FinalizeResult,
    InitResult,
    InitTorrent,
    StartResult,
    StartTorrent,
    SyncStatus,
)
from tests.source_fakes import FakeDestination, FakeQB, SourceTorrent, source_config

H = [f"{i:040x}" for i in range(8)]


def torrent(h: str, **kw: Any) -> dict[str, Any]:
    base = {"hash": h, "name": h[-4:], "state": "downloading", "progress": 0.5, "tags": ""}
    return base | kw


@pytest.mark.parametrize(
    ("info", "completed", "tracked", "reason"),
    [
        (torrent(H[0]), False, False, None),
        (torrent(H[0], state="stoppedUP", progress=1), False, False, None),  # auto-stopped
        (torrent(H[0], state="stoppedDL"), False, False, "state"),  # paused by the user
        (torrent(H[0], state="checkingDL"), False, False, "state"),
        (torrent(H[0], state="missingFiles"), False, False, "state"),
        (torrent(H[0], progress=0), False, False, "no-progress"),
        (torrent(H[0], tags="a, no-sync"), False, False, "excluded"),
        (torrent(H[0], tags="sync-failed"), False, False, "sync-failed"),
        (torrent(H[0], tags="no-sync-x"), False, False, None),  # exact tag match only
        (torrent(H[0]), True, False, "synced"),
        (torrent(H[0]), False, True, "tracked"),
    ],
)
def test_skip_reason(info, completed, tracked, reason):
    got = skip_reason(
        info,
        exclude_tag="no-sync",
        failed_tag="sync-failed",
        completed=completed,
        tracked=tracked,
    )
    assert got == reason


def test_transient_errors_never_count_as_failures():
    assert is_transient(ConnectionClosed())
    assert is_transient(DestinationUnavailable())
    assert is_transient(WireError(ErrorCode.BUSY))
    assert not is_transient(WireError(ErrorCode.INCOMPLETE))
    assert not is_transient(WireError(ErrorCode.VERIFY_FAILED))


def test_fingerprint():
    files: list[dict[str, object]] = [
        {"index": 2, "priority": 1},
        {"index": 0, "priority": 6},
        {"index": 1, "priority": 0},
    ]
    assert fingerprint(files) == "0,2"


async def test_completion_cache_atomic_roundtrip_and_corrupt_file(tmp_path: Path):
    cache = CompletionCache(tmp_path / "state")
    cache.load()
    await cache.put("a" * 40, "0,1")
    data = json.loads((tmp_path / "state" / "completed_on_dest.json").read_text())
    assert data == {"a" * 40: "0,1"}
    assert not [p for p in (tmp_path / "state").iterdir() if p.name.startswith(".tmp-")]
    (tmp_path / "state" / "completed_on_dest.json").write_text("{not json")
    fresh = CompletionCache(tmp_path / "state")
    fresh.load()  # corrupt: warns, starts empty, does not crash
    assert len(fresh) == 0
    dry = CompletionCache(tmp_path / "dry", read_only=True)
    await dry.put("b" * 40, "")
    assert "b" * 40 in dry and not (tmp_path / "dry").exists()


# What the destination answers an InitTorrent for a torrent it has every piece of.
NOTHING_NEEDED = InitResult(SyncStatus.READY, b"\x00", 0, 1)


@attrs.define
class Rig:
    orch: Orchestrator
    qb: FakeQB
    dest: FakeDestination
    pool: ConnectionPool
    monitor: Monitor
    registry: Registry
    torrents: dict[str, SourceTorrent]


def make(
    tmp_path: Path,
    torrents: Mapping[str, SourceTorrent],
    answers: Mapping[type, Any],
    **flags: str,
) -> Rig:
    config = source_config(tmp_path, **{"exclude_sync_tag": "no-sync", "sleep": "1", **flags})
    qb, dest, registry = FakeQB(torrents), FakeDestination(answers), Registry()
    pool = ConnectionPool(
        dest.connector,
        address="127.0.0.1:9",
        min_connections=1,
        max_connections=1,
        reconnect_max_delay=1.0,
    )
    monitor = Monitor(qb, registry)
    monitor.torrents = {h: t.info for h, t in torrents.items()}
    monitor.ready.set()  # as after the monitor's first maindata
    orch = Orchestrator(
        config,
        qb=qb,
        pool=pool,
        registry=registry,
        monitor=monitor,
        reader=PieceReader(),
        cache=CompletionCache(config.state_dir, read_only=config.dry_run),
        mapper=PathMapper(tmp_path, str(tmp_path)),
    )
    return Rig(orch, qb, dest, pool, monitor, registry, dict(torrents))


@asynccontextmanager
async def running(rig: Rig) -> AsyncIterator[None]:
    """The pool and the orchestrator's own loop, until the block ends."""
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.pool.run)
        await rig.pool.pick()  # connected (generation 1)
        await nursery.start(rig.orch.run)
        yield
        nursery.cancel_scope.cancel()


async def eventually(predicate: Callable[[], object], within: float = 30.0) -> None:
    """Wait until ``predicate()`` holds. Worker threads (file reads, layout building) run in
    real time while the mock clock jumps ahead whenever every task waits, so these tests wait
    for outcomes, never for durations, and ``within`` bounds a hang in *real* seconds: a mock
    deadline would pass in a blink while a thread is still working."""
    give_up = time.monotonic() + within
    while not predicate():  # polled: outcomes have no event to wait on
        if time.monotonic() > give_up:
            raise TimeoutError(f"not true after {within} s: {predicate}")
        await trio.sleep(0.01)


def on_disk(tmp_path: Path, *names: str, **info: Any) -> dict[str, SourceTorrent]:
    """Real torrents under ``tmp_path`` keyed by info-hash, with ``info`` fields overridden."""
    out = {}
    for name in names:
        t = SourceTorrent(tmp_path, name, {"a.bin": 40_000})
        t.info.update(info)
        out[t.info_hash] = t
    return out


def mid_sync(rig: Rig, h: str) -> Tracked:
    """Track ``h`` (real layout from its .torrent) with no piece sent yet."""
    t = rig.torrents[h]
    meta = build_meta(h, t.info, t.files, t.torrent_file, rig.orch.mapper)
    return rig.registry.add(meta, PieceTracker(meta.num_pieces, meta.mask), since=0)


def streamed(rig: Rig, h: str) -> Tracked:
    """Track ``h`` with every piece already on the destination (ready to finalize), as the
    senders leave it."""
    tracked = mid_sync(rig, h)
    tracked.tracker.apply_needed(None)
    return tracked


async def test_discovery_probes_sorts_by_destination_share_and_records_complete(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    torrents = on_disk(tmp_path, "t0", "t1", "t2", "t3", "t4", "t5")
    h = list(torrents)
    torrents[h[1]].info["state"] = "stalledUP"  # seeding
    torrents[h[0]].info.update(state="downloading", progress=0.5)
    torrents[h[2]].info["tags"] = "no-sync"  # excluded: never probed
    torrents[h[4]].info["state"] = "stoppedDL"  # paused download: not syncable
    have = {h[0]: 5, h[1]: 10}  # the destination has more of h[1]

    def init(msg: InitTorrent) -> InitResult:
        if not msg.probe:
            return InitResult(SyncStatus.READY)  # tracking: everything needed
        assert not msg.files  # a probe creates nothing on the destination
        if msg.info_hash == h[3]:
            return InitResult(SyncStatus.COMPLETE)
        if msg.info_hash == h[5]:
            return InitResult(SyncStatus.VERIFYING)
        return InitResult(SyncStatus.READY, pieces_have_count=have[msg.info_hash])

    rig = make(tmp_path, torrents, {InitTorrent: init})
    async with running(rig):

        def tracked() -> list[str]:  # a full InitTorrent is what tracking sends
            return [m.info_hash for m in rig.dest.of_type(InitTorrent) if not m.probe]

        await eventually(lambda: len(tracked()) == 2 and rig.qb.tags)  # the first cycle
        probes = [m.info_hash for m in rig.dest.of_type(InitTorrent) if m.probe]
        assert sorted(probes) == sorted([h[0], h[1], h[3], h[5]])
        # most data on the destination first
        assert tracked() == [h[1], h[0]]
        assert h[3] in rig.orch.cache and rig.qb.tags == [(h[3], ["synced"])]
        # Probed again only after --sleep (1 s); the complete one never again.
        rig.dest.requests.clear()
        await eventually(lambda: rig.dest.requests)
        await trio.sleep(3)
        assert {m.info_hash for m in rig.dest.of_type(InitTorrent) if m.probe} == {h[5]}


async def test_discovery_stops_when_destination_unreachable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    torrents = on_disk(tmp_path, "t0", "t1", state="downloading", progress=0.5)
    rig = make(tmp_path, torrents, {InitTorrent: DestinationUnavailable()})
    async with running(rig):
        await eventually(lambda: rig.dest.requests)
        await trio.sleep(0.5)  # less than --sleep: still the first cycle's outcome
        assert len(rig.dest.requests) == 1  # gave up for this cycle after the first outage


async def test_finalize_verifying_polls_then_synced_and_tagged(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    answers = iter(
        [FinalizeResult(SyncStatus.VERIFYING)] * 2 + [FinalizeResult(SyncStatus.COMPLETE)]
    )
    torrents = on_disk(tmp_path, "t0", category="tv", tags="x, y")
    (h,) = torrents
    rig = make(tmp_path, torrents, {Finalize: lambda m: next(answers), InitTorrent: NOTHING_NEEDED})
    streamed(rig, h)
    async with running(rig):
        await eventually(lambda: h not in rig.registry)
    finals = rig.dest.of_type(Finalize)
    assert len(finals) == 3 and finals[0].category == "tv" and finals[0].tags == ("x", "y")
    assert rig.orch.cache.get(h) == "0"
    assert rig.qb.tags == [(h, ["synced"])]


async def test_finalize_failures_cap_at_three_then_sync_failed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    torrents = on_disk(tmp_path, "t0")
    (h,) = torrents
    fail = WireError(ErrorCode.VERIFY_FAILED, "recheck stopped at 99%")
    rig = make(
        tmp_path,
        torrents,
        {Finalize: fail, InitTorrent: NOTHING_NEEDED},
    )
    streamed(rig, h)
    async with running(rig):
        await eventually(lambda: h not in rig.registry)
    assert len(rig.dest.of_type(Finalize)) == 3
    assert rig.qb.tags == [(h, ["sync-failed"])]
    assert h not in rig.orch.cache


async def test_destination_outage_during_finalize_is_not_a_failure(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    torrents = on_disk(tmp_path, "t0")
    (h,) = torrents
    rig = make(tmp_path, torrents, {Finalize: ConnectionClosed(), InitTorrent: NOTHING_NEEDED})
    t = streamed(rig, h)
    async with running(rig):
        await eventually(lambda: len(rig.dest.of_type(Finalize)) >= 3)  # each hits the outage
    assert len(rig.dest.of_type(Finalize)) >= 3
    assert t.finalize_failures == 0 and h in rig.registry and not rig.qb.tags


async def test_exclusion_and_removal_abort_mid_sync_but_keep_synced_entries(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    torrents = on_disk(tmp_path, "t0", "t1", "t2")
    h = list(torrents)
    rig = make(tmp_path, torrents, {Abort: AbortResult(existed=True)})
    await rig.orch.cache.put(h[2], "0")  # synced earlier; excluded later: entry must stay
    rig.monitor.torrents[h[2]]["tags"] = "no-sync"
    mid_sync(rig, h[0])
    mid_sync(rig, h[1])
    async with running(rig):
        rig.monitor.torrents[h[0]]["tags"] = "no-sync"
        del rig.monitor.torrents[h[1]]
        # what the monitor reports for those two changes
        rig.orch.on_update(
            MaindataUpdate(False, {h[0]: frozenset({"tags"})}, frozenset(), frozenset({h[1]}))
        )
        await eventually(lambda: len(rig.dest.of_type(Abort)) == 2)
    aborts = rig.dest.of_type(Abort)
    assert sorted(m.info_hash for m in aborts) == sorted([h[0], h[1]])
    assert all(m.delete_files for m in aborts)
    assert len(rig.registry) == 0
    assert h[2] in rig.orch.cache


async def test_dry_run_never_mutates(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    torrents = on_disk(tmp_path, "t0", "t1")
    h = list(torrents)

    def probe(msg: InitTorrent) -> InitResult:
        assert msg.probe
        if msg.info_hash == h[1]:
            return InitResult(SyncStatus.COMPLETE)
        return InitResult(SyncStatus.READY)

    rig = make(tmp_path, torrents, {InitTorrent: probe}, dry_run="true")
    async with running(rig):
        await eventually(lambda: len(rig.dest.requests) >= 2)
        await trio.sleep(3)  # a few more cycles
    assert len(rig.registry) == 0  # nothing tracked, so nothing is ever sent
    assert rig.dest.requests and all(
        isinstance(m, InitTorrent) and m.probe for m in rig.dest.requests
    )
    assert rig.qb.tags == []
    assert not (tmp_path / "state").exists()


async def test_abort_deferred_while_unreachable_then_sent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    torrents = on_disk(tmp_path, "t0")
    (h,) = torrents
    rig = make(tmp_path, torrents, {Abort: AbortResult(existed=True)})
    mid_sync(rig, h)
    async with running(rig):
        rig.dest.go_down()  # destination down when the exclusion tag shows up
        await eventually(lambda: rig.pool.connected == 0)
        rig.monitor.torrents[h]["tags"] = "no-sync"
        rig.orch.on_update(
            MaindataUpdate(False, {h: frozenset({"tags"})}, frozenset(), frozenset())
        )
        await eventually(lambda: len(rig.registry) == 0)
        await trio.sleep(3)
        assert not rig.dest.requests  # untracked, abort deferred
        rig.dest.down = False  # the pool reconnects on its own
        await eventually(lambda: rig.dest.requests)
        await trio.sleep(5)
        assert [type(m) for m in rig.dest.requests] == [Abort]  # sent once, not again


async def test_synced_torrent_removed_from_source_is_started_on_destination(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The destination takes over seeding; a failed StartTorrent keeps the completion-cache
    entry so the hand-off is retried at maintenance, a success drops it."""
    h = "ab" * 20
    answers: list[Any] = [WireError(ErrorCode.QB_ERROR, "qBittorrent down"), StartResult(True)]
    rig = make(tmp_path, {}, {StartTorrent: lambda m: answers.pop(0)})
    await rig.orch.cache.put(h, "0")
    async with running(rig):
        rig.orch.on_removed(h)  # as the monitor reports it
        await eventually(lambda: rig.dest.of_type(StartTorrent))
        assert [(m.info_hash, m.tag) for m in rig.dest.of_type(StartTorrent)] == [
            (h, "source-removed")
        ]
        assert h in rig.orch.cache  # kept: retried later
        await trio.sleep(0.9 * MAINTENANCE_EVERY)  # --sleep is 1 s
        assert h in rig.orch.cache and len(rig.dest.of_type(StartTorrent)) == 1
        await eventually(lambda: h not in rig.orch.cache)  # the maintenance pass retries
        assert len(rig.dest.of_type(StartTorrent)) == 2
    stored = json.loads((tmp_path / "state" / "completed_on_dest.json").read_text())
    assert h not in stored


async def test_owned_by_other_source_waits_then_records_the_finished_copy(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Several sources: another source is syncing the torrent into the destination. This one
    neither tracks nor aborts it, probes again after --sleep, and when the other copy is
    finalized records it as synced: one copy, no piece sent from here."""
    torrents = on_disk(tmp_path, "t0", "t1", state="downloading", progress=0.5)
    busy, free = list(torrents)
    other_done = False

    def init(msg: InitTorrent) -> InitResult:
        if msg.info_hash == busy and not other_done:
            raise WireError(ErrorCode.OWNED_BY_OTHER_SOURCE, "source 'b' is syncing it")
        if msg.info_hash == busy:
            return InitResult(SyncStatus.COMPLETE)
        return InitResult(SyncStatus.READY)

    rig = make(tmp_path, torrents, {InitTorrent: init})
    async with running(rig):
        await eventually(lambda: free in rig.registry)  # the other torrent is not held up
        assert busy not in rig.registry
        probes = len([m for m in rig.dest.of_type(InitTorrent) if m.info_hash == busy])
        await eventually(
            lambda: len([m for m in rig.dest.of_type(InitTorrent) if m.info_hash == busy]) > probes
        )  # asked again (after --sleep)
        other_done = True
        await eventually(lambda: busy in rig.orch.cache)
    assert (busy, ["synced"]) in rig.qb.tags
    assert not [m for m in rig.dest.of_type(InitTorrent) if m.info_hash == busy and not m.probe]
    assert not rig.dest.of_type(Abort)
