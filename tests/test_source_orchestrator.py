"""Discovery and finalize decisions of the orchestrator (with fake qB, pool and monitor)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from qbsync.config import SourceConfig, resolve
from qbsync.source.cache import CompletionCache, fingerprint
from qbsync.source.monitor import MaindataUpdate
from qbsync.source.orchestrator import Orchestrator, is_transient, skip_reason
from qbsync.source.paths import PathMapper
from qbsync.source.pool import DestinationUnavailable
from qbsync.source.reader import PieceReader
from qbsync.source.state import Registry
from qbsync.source.tracker import PieceTracker
from qbsync.wire.errors import ConnectionClosed, ErrorCode, WireError
from qbsync.wire.messages import (
    Abort,
    Finalize,
    FinalizeResult,
    InitResult,
    InitTorrent,
    StartResult,
    SyncStatus,
)

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


class FakePool:
    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.requests: list[Any] = []
        self.generation = 1
        self.connected = 1

    async def request(self, msg: Any, *, within: float) -> Any:
        self.requests.append(msg)
        answer = self.answers[type(msg).__name__]
        result = answer(msg) if callable(answer) else answer
        if isinstance(result, BaseException):
            raise result
        return result


class FakeQB:
    def __init__(self) -> None:
        self.tags: list[tuple[str, list[str]]] = []

    async def files(self, h: str) -> list[dict[str, Any]]:
        return [{"index": 0, "name": "x", "size": 1, "priority": 1}]

    async def add_tags(self, h: str, tags: list[str]) -> None:
        self.tags.append((h, tags))


class FakeMonitor:
    def __init__(self, torrents: dict[str, dict[str, Any]]) -> None:
        self.torrents = torrents
        self.ready = trio.Event()
        self.ready.set()
        self.on_update: Any = None
        self.on_removed: Any = None
        self.polls: list[str] = []
        self.server_state: dict[str, Any] = {}

    def request_poll(self, t: Any) -> None:
        self.polls.append(t.info_hash)


def make(tmp_path: Path, torrents, answers, **flags: str):
    config = resolve(
        "source",
        {
            "data": str(tmp_path),
            "qb_url": "http://127.0.0.1:1",
            "destination_addr": "127.0.0.1:2",
            "state_dir": str(tmp_path / "state"),
            "exclude_sync_tag": "no-sync",
            "sleep": "1",
            **flags,
        },
        env={},
    )
    assert isinstance(config, SourceConfig)
    qb, pool, monitor = FakeQB(), FakePool(answers), FakeMonitor(torrents)
    registry = Registry()
    orch = Orchestrator(
        config,
        qb=cast(Any, qb),
        pool=cast(Any, pool),
        registry=registry,
        monitor=cast(Any, monitor),
        reader=PieceReader(),
        cache=CompletionCache(config.state_dir, read_only=config.dry_run),
        mapper=PathMapper(tmp_path, str(tmp_path)),
    )
    return orch, qb, pool, monitor, registry


async def test_discovery_probes_sorts_by_destination_share_and_records_complete(tmp_path):
    torrents = {
        H[0]: torrent(H[0]),  # destination has 5 pieces
        H[1]: torrent(H[1], state="stalledUP", progress=1),  # destination has 10 pieces
        H[2]: torrent(H[2], tags="no-sync"),  # excluded: never probed
        H[3]: torrent(H[3]),  # already complete on the destination
        H[4]: torrent(H[4], state="stoppedDL"),  # paused download: not syncable
        H[5]: torrent(H[5]),  # destination is verifying it
    }
    have = {H[0]: 5, H[1]: 10}

    def probe(msg: InitTorrent) -> InitResult:
        assert msg.probe and not msg.files  # a probe creates nothing on the destination
        if msg.info_hash == H[3]:
            return InitResult(SyncStatus.COMPLETE)
        if msg.info_hash == H[5]:
            return InitResult(SyncStatus.VERIFYING)
        return InitResult(SyncStatus.READY, pieces_have_count=have[msg.info_hash])

    orch, qb, pool, _, _ = make(tmp_path, torrents, {"InitTorrent": probe})
    orch.cache.load()
    tracked: list[str] = []

    async def fake_track(h: str, info: dict[str, Any], **kw: Any) -> None:
        tracked.append(h)

    orch._track = fake_track
    await orch.cycle()
    assert tracked == [H[1], H[0]]  # most data on the destination first
    assert sorted(m.info_hash for m in pool.requests) == sorted([H[0], H[1], H[3], H[5]])
    assert H[3] in orch.cache and qb.tags == [(H[3], ["synced"])]
    # Probed again only after --sleep; the complete one never again.
    pool.requests.clear()
    tracked.clear()
    await orch.cycle()
    assert [m.info_hash for m in pool.requests] == [H[0], H[1]]


async def test_discovery_stops_when_destination_unreachable(tmp_path):
    torrents = {H[0]: torrent(H[0]), H[1]: torrent(H[1])}
    orch, _, pool, _, _ = make(tmp_path, torrents, {"InitTorrent": DestinationUnavailable()})
    orch.cache.load()
    await orch.cycle()
    assert len(pool.requests) == 1  # gave up for this cycle after the first outage


def _complete_torrent(registry: Registry, h: str) -> Any:
    meta = type("M", (), {})()
    meta.info_hash, meta.name, meta.num_pieces = h, "t", 1
    meta.fingerprint, meta.selected_size, meta.partial, meta.save_sub_path = "0", 1, False, ""
    meta.torrent_file = b""
    meta.locate = lambda mapper, info: False
    t = registry.add(cast(Any, meta), PieceTracker(1), since=0)
    t.tracker.apply_needed(None)
    t.init_generation = 1
    return t


async def test_finalize_verifying_polls_then_synced_and_tagged(tmp_path):
    answers = iter(
        [FinalizeResult(SyncStatus.VERIFYING)] * 2 + [FinalizeResult(SyncStatus.COMPLETE)]
    )
    torrents = {H[0]: torrent(H[0], state="stalledUP", progress=1, category="tv", tags="x, y")}
    orch, qb, pool, _, registry = make(tmp_path, torrents, {"Finalize": lambda m: next(answers)})
    orch.cache.load()
    _complete_torrent(registry, H[0])
    orch._discover = _noop
    with trio.fail_after(10):
        while H[0] in registry:
            await orch.cycle()
            await trio.sleep(0.3)
    finals = [m for m in pool.requests if isinstance(m, Finalize)]
    assert len(finals) == 3 and finals[0].category == "tv" and finals[0].tags == ("x", "y")
    assert orch.cache.get(H[0]) == "0"
    assert qb.tags == [(H[0], ["synced"])]


async def test_finalize_failures_cap_at_three_then_sync_failed(tmp_path):
    torrents = {H[0]: torrent(H[0], state="stalledUP", progress=1)}
    fail = WireError(ErrorCode.VERIFY_FAILED, "recheck stopped at 99%")
    orch, qb, pool, _, registry = make(
        tmp_path,
        torrents,
        {
            "Finalize": fail,
            "InitTorrent": InitResult(SyncStatus.READY, b"\x00", 0, 1),
        },
    )
    orch.cache.load()
    t = _complete_torrent(registry, H[0])
    t.meta.init_request = lambda resync=False: InitTorrent(H[0])
    orch._discover = _noop
    with trio.fail_after(30):
        while H[0] in registry:
            t.next_finalize_at = 0
            await orch.cycle()
    assert sum(isinstance(m, Finalize) for m in pool.requests) == 3
    assert qb.tags == [(H[0], ["sync-failed"])]
    assert H[0] not in orch.cache


async def test_destination_outage_during_finalize_is_not_a_failure(tmp_path):
    torrents = {H[0]: torrent(H[0], state="stalledUP", progress=1)}
    orch, qb, _, _, registry = make(tmp_path, torrents, {"Finalize": ConnectionClosed()})
    orch.cache.load()
    t = _complete_torrent(registry, H[0])
    orch._discover = _noop
    for _ in range(5):
        t.next_finalize_at = 0
        await orch.cycle()
    assert t.finalize_failures == 0 and H[0] in registry and not qb.tags


async def test_exclusion_and_removal_abort_mid_sync_but_keep_synced_entries(tmp_path):
    torrents = {H[0]: torrent(H[0]), H[1]: torrent(H[1])}
    orch, _, pool, monitor, registry = make(
        tmp_path, torrents, {"Abort": lambda m: type("R", (), {"existed": True})()}
    )
    orch.cache.load()
    await orch.cache.put(H[2], "0")  # synced earlier; excluded later: entry must stay
    monitor.torrents[H[2]] = torrent(H[2], tags="no-sync")
    for h in (H[0], H[1]):
        t = _complete_torrent(registry, h)
        t.tracker = PieceTracker(2)  # mid-sync
    orch._discover = _noop
    monitor.torrents[H[0]]["tags"] = "no-sync"
    del monitor.torrents[H[1]]
    orch.on_update(
        MaindataUpdate(False, {H[0]: frozenset({"tags"})}, frozenset(), frozenset({H[1]}))
    )
    await orch.cycle()
    aborted = sorted(m.info_hash for m in pool.requests if isinstance(m, Abort))
    assert aborted == [H[0], H[1]] and all(m.delete_files for m in pool.requests)
    assert len(registry) == 0
    assert H[2] in orch.cache


async def test_dry_run_never_mutates(tmp_path):
    torrents = {H[0]: torrent(H[0]), H[1]: torrent(H[1])}

    def probe(msg: InitTorrent) -> InitResult:
        assert msg.probe
        if msg.info_hash == H[1]:
            return InitResult(SyncStatus.COMPLETE)
        return InitResult(SyncStatus.READY)

    orch, qb, pool, _, registry = make(tmp_path, torrents, {"InitTorrent": probe}, dry_run="true")
    orch.cache.load()
    await orch.cycle()
    assert len(registry) == 0  # nothing tracked, so nothing is ever sent
    assert all(isinstance(m, InitTorrent) and m.probe for m in pool.requests)
    assert qb.tags == []
    assert not (tmp_path / "state").exists()


async def _noop() -> None:
    return None


async def test_abort_deferred_while_unreachable_then_sent(tmp_path):
    torrents = {H[0]: torrent(H[0], tags="no-sync")}
    orch, _, pool, _, registry = make(
        tmp_path, torrents, {"Abort": lambda m: type("R", (), {"existed": True})()}
    )
    orch.cache.load()
    t = _complete_torrent(registry, H[0])
    t.tracker = PieceTracker(2)  # mid-sync
    orch._discover = _noop
    pool.connected = 0  # destination down when the exclusion tag shows up
    await orch.cycle()
    assert len(registry) == 0 and not pool.requests  # untracked now, abort deferred
    await orch.cycle()
    assert not pool.requests
    pool.connected = 1
    await orch.cycle()
    assert [type(m).__name__ for m in pool.requests] == ["Abort"]
    await orch.cycle()
    assert len(pool.requests) == 1  # sent once


async def test_synced_torrent_removed_from_source_is_started_on_destination(tmp_path):
    """source.md §11.7: the destination takes over seeding; a failed StartTorrent keeps the
    completion-cache entry so the handoff is retried (at maintenance), a success drops it."""
    answers: list[Any] = [WireError(ErrorCode.QB_ERROR, "qBittorrent down"), StartResult(True)]
    orch, _, pool, _, _ = make(tmp_path, {}, {"StartTorrent": lambda m: answers.pop(0)})
    orch.cache.load()
    await orch.cache.put(H[0], "0")
    orch.on_removed(H[0])
    await orch.cycle()
    assert [(type(m).__name__, m.tag) for m in pool.requests] == [
        ("StartTorrent", "source-removed")
    ]
    assert H[0] in orch.cache  # kept: retried later
    await orch._maintenance()  # the maintenance pass hands over what is cached but gone
    assert len(pool.requests) == 2 and H[0] not in orch.cache
    stored = json.loads((tmp_path / "state" / "completed_on_dest.json").read_text())
    assert H[0] not in stored
