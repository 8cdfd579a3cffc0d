"""Disk-pressure cleanup / drain decisions and the handoff order (stop -> start -> delete)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from qbsync import metrics
from qbsync.integrations.k8s import drain_decision
from qbsync.source.cache import CompletionCache
from qbsync.source.cleanup import Candidate, Cleanup, GiB, group_candidates
from qbsync.source.paths import PathMapper
from qbsync.source.runner import _drain
from qbsync.wire.errors import ConnectionClosed, ErrorCode, WireError
from qbsync.wire.messages import StartResult, StartTorrent
from tests.source_fakes import source_config


def cand(h: str, *, size: int = 1, seeding: int = 10_000, pop: int = 0, ids=()) -> Candidate:
    return Candidate(h, h, size, seeding, pop, set(ids))


def test_groups_by_device_and_inode_and_orders_them():
    a = cand("a", size=5, pop=3, ids=[(1, 10)])
    b = cand("b", size=7, pop=0, ids=[(1, 11), (1, 10)])  # hardlinked with a
    c = cand("c", size=9, pop=0, ids=[(2, 10)])  # same inode, other device: not linked
    d = cand("d", size=1, pop=0, seeding=50_000)
    groups = group_candidates([a, b, c, d])
    assert [[m.info_hash for m in g.members] for g in groups] == [["d"], ["c"], ["a", "b"]]
    assert groups[2].popularity == 3 and groups[2].max_size == 7


class FakeQB:
    def __init__(self, fail_stop: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.calls: list[tuple[str, str]] = []
        self.fail_stop = fail_stop

    async def stop(self, h: str) -> None:
        from qbsync.qbittorrent.api import QBError

        self.calls.append(("stop", h))
        if h in self.fail_stop:
            raise QBError("torrents_stop", "boom", transient=False)

    async def start(self, h: str) -> None:
        self.calls.append(("start", h))

    async def delete(self, h: str, *, delete_files: bool) -> None:
        assert delete_files
        self.calls.append(("delete", h))

    async def add_tags(self, h: str, tags: list[str]) -> None:
        self.calls.append(("tag:" + ",".join(tags), h))

    async def remove_tags(self, h: str, tags: list[str]) -> None:
        self.calls.append(("untag:" + ",".join(tags), h))

    async def files(self, h: str) -> list[dict[str, Any]]:
        return []


def make(
    tmp_path: Path,
    qb: FakeQB,
    *,
    start_fails: bool = False,
    dry_run: bool = False,
    answer: StartResult | WireError | None = None,
    **kw,
):
    started: list[str] = []

    async def request(msg: Any, *, within: float) -> Any:
        assert isinstance(msg, StartTorrent) and msg.tag == "source-removed"
        qb.calls.append(("dest-start", msg.info_hash))
        if start_fails:
            raise ConnectionClosed("gone")
        if isinstance(answer, WireError):
            raise answer
        if answer is not None:
            return answer
        started.append(msg.info_hash)
        return StartResult(True)

    cache = CompletionCache(tmp_path / "state", read_only=True)
    cleanup = Cleanup(
        qb=cast(Any, qb),
        request=request,
        cache=cache,
        mapper=PathMapper(tmp_path, str(tmp_path)),
        min_space_gib=kw.get("min_space", 10),
        min_seeding_time=kw.get("min_seeding", 3600),
        synced_tag="synced",
        source_removed_tag="source-removed",
        exclude_cleanup_tag="keep",
        dry_run=dry_run,
    )
    return cleanup, cache, started


def t(h: str, **kw: Any) -> dict[str, Any]:
    return {"hash": h, "name": h, "tags": "synced", "size": GiB, "seeding_time": 7200} | kw


async def test_cleanup_hands_off_until_enough_space(tmp_path):
    qb = FakeQB()
    cleanup, cache, started = make(tmp_path, qb, min_space=10)
    for h in "abcd":
        await cache.put(h, "0")
    torrents = [
        t("a", size=4 * GiB, num_complete=5),  # popular: last
        t("b", size=4 * GiB),
        t("c", size=4 * GiB, tags="synced, keep"),  # exclude-cleanup
        t("d", size=4 * GiB, seeding_time=10),  # seeded too briefly
        t("e", size=4 * GiB),  # not synced by us
    ]
    result = await cleanup.run_pass(torrents, free_bytes=3 * GiB, draining=False)
    assert result is not None
    # b is handed off first (least popular); 3 + 4 = 7 GiB < 10, so a goes too.
    assert started == ["b", "a"]
    assert qb.calls[:3] == [("stop", "b"), ("dest-start", "b"), ("delete", "b")]
    assert result.groups_skipped == 1 and result.handed_off == 2
    # Enough space already: nothing happens.
    assert await cleanup.run_pass(torrents, free_bytes=20 * GiB, draining=False) is None


async def test_nothing_is_stopped_without_an_authenticated_destination(tmp_path):
    """Issue 15: with no authenticated destination connection (away, or an impostor failing
    the handshake) a pass under disk pressure stops nothing; it hands off once one is up."""
    qb = FakeQB()
    cleanup, cache, started = make(tmp_path, qb, min_space=10)
    ready = False
    cleanup.destination_ready = lambda: ready
    await cache.put("b", "0")
    result = await cleanup.run_pass([t("b", size=4 * GiB)], free_bytes=3 * GiB, draining=False)
    assert result is not None and result.deferred and result.handed_off == 0
    assert qb.calls == []  # not stopped, not asked for
    result = await cleanup.run_pass([t("b", size=4 * GiB)], free_bytes=0, draining=True)
    assert result is not None and result.deferred and qb.calls == []
    ready = True
    result = await cleanup.run_pass([t("b", size=4 * GiB)], free_bytes=3 * GiB, draining=False)
    assert result is not None and result.handed_off == 1 and started == ["b"]


async def _a_and_b_synced(tmp_path: Path, qb: FakeQB, **kw: Any) -> tuple[Cleanup, Any]:
    """A cleanup with no --min-seeding-time whose completion cache holds torrents a and b
    (synced); returns it and the list of hashes it starts on the destination."""
    cleanup, cache, started = make(tmp_path, qb, min_seeding=0, **kw)
    await cache.put("a", "0")
    await cache.put("b", "0")
    return cleanup, started


async def test_start_failure_resumes_source_and_missing_synced_tag_is_added(tmp_path):
    qb = FakeQB()
    cleanup, _ = await _a_and_b_synced(tmp_path, qb, start_fails=True)
    result = await cleanup.run_pass([t("a"), t("b", tags="")], free_bytes=0, draining=False)
    assert result is not None and result.groups_failed == 1 and result.handed_off == 0
    assert qb.calls == [
        ("tag:synced", "b"),  # tagged now, handed off in a later pass
        ("stop", "a"),
        ("dest-start", "a"),
        ("start", "a"),  # the destination could not start it: the source seeds again
    ]
    assert ("delete", "a") not in qb.calls


def refused(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value("qbsync_handoff_refused_total", {"reason": reason})
    return value or 0.0


async def test_started_false_never_deletes_on_the_source(tmp_path):
    """A destination that answers ``started=False`` (a dry-run one does) is a refusal: the
    source resumes and keeps its files. Before the fix the answer was ignored and the source
    deleted its copy."""
    qb = FakeQB()
    cleanup, cache, _ = make(tmp_path, qb, answer=StartResult(False), min_seeding=0)
    await cache.put("a", "0")
    before = refused("not-started")
    result = await cleanup.run_pass([t("a")], free_bytes=0, draining=False)
    assert result is not None and result.handed_off == 0 and result.groups_failed == 1
    assert qb.calls == [("stop", "a"), ("dest-start", "a"), ("start", "a")]
    assert refused("not-started") == before + 1
    assert "a" in cache  # the destination copy is fine, just not started: keep the entry


async def test_destination_copy_missing_resumes_and_forgets_completion(tmp_path):
    """The destination answers ``not-found`` (its files are gone): the source resumes, never
    deletes, and drops the completion cache entry and ``--synced-tag`` together (one owner:
    :mod:`qbsync.source.synced`) so the torrent is synced again."""
    qb = FakeQB()
    missing = WireError(ErrorCode.NOT_FOUND, "destination copy incomplete: payload/a.bin")
    cleanup, cache, _ = make(tmp_path, qb, answer=missing, min_seeding=0)
    await cache.put("a", "0")
    before = refused("not-found")
    result = await cleanup.run_pass([t("a")], free_bytes=0, draining=True)
    assert result is not None and result.handed_off == 0
    assert ("delete", "a") not in qb.calls and ("start", "a") in qb.calls
    assert refused("not-found") == before + 1
    assert "a" not in cache and ("untag:synced", "a") in qb.calls


async def test_a_torrent_being_resynced_is_never_a_candidate(tmp_path):
    qb = FakeQB()
    cleanup, cache, started = make(tmp_path, qb, min_seeding=0)
    cleanup.syncing = lambda h: h == "a"
    await cache.put("a", "0")
    await cache.put("b", "0")
    result = await cleanup.run_pass([t("a"), t("b")], free_bytes=0, draining=True)
    assert result is not None and started == ["b"]
    assert ("stop", "a") not in qb.calls


async def test_drain_ignores_space_seeding_and_exclude_cleanup_but_not_synced(tmp_path):
    qb = FakeQB(fail_stop={"z"})
    cleanup, cache, started = make(tmp_path, qb)
    for h in "abz":
        await cache.put(h, "0")
    torrents = [t("a", seeding_time=0, tags="synced, keep"), t("b"), t("c"), t("z")]
    result = await cleanup.run_pass(torrents, free_bytes=None, draining=True)
    assert result is not None
    assert sorted(started) == ["a", "b"]  # c is not in the cache; z failed to stop
    assert result.groups_failed == 1


async def test_dry_run_changes_nothing(tmp_path):
    qb = FakeQB()
    cleanup, started = await _a_and_b_synced(tmp_path, qb, dry_run=True)
    result = await cleanup.run_pass([t("a"), t("b", tags="")], free_bytes=0, draining=False)
    assert result is not None and result.handed_off == 1
    assert qb.calls == [] and started == []


async def test_drain_gate_fails_closed(tmp_path: Path) -> None:
    assert (await drain_decision("")).drain  # empty annotation: unconditional
    home = {"HOME": str(tmp_path)}  # no ~/.kube/config there
    nothing = await drain_decision("qbsync/drain", env={**home, "POD_NAME": "p"})
    assert not nothing.drain and "no Kubernetes configuration" in nothing.reason
    kubeconfig = {**home, "KUBECONFIG": str(tmp_path / "missing")}
    missing = await drain_decision("qbsync/drain", env=kubeconfig)
    assert not missing.drain and "POD_NAME" in missing.reason
    # A kubeconfig that cannot be read: the lookup fails, so no drain.
    broken = await drain_decision("qbsync/drain", env={**kubeconfig, "POD_NAME": "p"})
    assert not broken.drain and "lookup failed" in broken.reason


async def test_drain_runs_under_its_deadline_and_resets_the_gauge(tmp_path, autojump_clock, caplog):
    """A drain that cannot finish (a hung handoff) ends at --drain-timeout, logged, and the
    ``draining`` gauge goes back to 0."""
    caplog.set_level(logging.INFO, logger="qbsync.source.runner")
    started = trio.Event()

    class HungCleanup:
        async def run_pass(self, torrents: Any, *, free_bytes: Any, draining: bool) -> None:
            assert draining and free_bytes is None
            assert list(torrents) == [t("a")]  # a fresh list, not the last cycle's
            started.set()
            await trio.sleep_forever()

    class ListingQB:
        async def torrents(self) -> list[dict[str, Any]]:
            return [t("a")]

    orchestrator = SimpleNamespace(cleanup=HungCleanup())
    config = source_config(tmp_path, drain_annotation="", drain_timeout="7")
    begin = trio.current_time()
    with trio.fail_after(60):  # without its own deadline the drain would hang here
        await _drain(config, cast(Any, ListingQB()), cast(Any, orchestrator))
    assert started.is_set()
    assert trio.current_time() - begin == pytest.approx(7.0)
    assert metrics.draining._value.get() == 0
    assert any("event=drain_timeout" in r.message for r in caplog.records)


async def test_drain_skipped_when_the_gate_is_closed(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="qbsync.source.runner")
    monkeypatch.delenv("POD_NAME", raising=False)

    class NoCleanup:
        async def run_pass(self, *args: Any, **kw: Any) -> None:
            raise AssertionError("the drain must not run when the gate is closed")

    config = source_config(tmp_path)  # default --drain-annotation qbsync/drain
    await _drain(config, cast(Any, None), cast(Any, SimpleNamespace(cleanup=NoCleanup())))
    assert any("event=drain_skipped" in r.message for r in caplog.records)


async def test_resync_removes_the_sources_synced_tag_before_it_starts(tmp_path, autojump_clock):
    """A selection change re-syncs a synced torrent: ``synced`` no longer holds, so it is
    removed first (a hand-off must not pick the torrent while the destination re-verifies
    it), and the torrent is tracked, so cleanup skips it too."""
    from qbsync.source.monitor import MaindataUpdate
    from qbsync.wire.messages import InitResult, InitTorrent, SyncStatus
    from tests.source.test_source_orchestrator import eventually, on_disk, running
    from tests.source.test_source_orchestrator import make as make_orchestrator

    events: list[tuple[str, str]] = []

    def init(msg: InitTorrent) -> InitResult:
        events.append(("resync" if msg.resync else "init", msg.info_hash))
        return InitResult(SyncStatus.READY)

    torrents = on_disk(tmp_path, "t0", state="stalledUP", progress=1, tags="synced")
    (h,) = torrents
    rig = make_orchestrator(tmp_path, torrents, {InitTorrent: init})

    async def remove_tags(info_hash: str, tags: list[str]) -> None:
        events.append(("untag:" + ",".join(tags), info_hash))

    rig.qb.remove_tags = remove_tags  # type: ignore[method-assign]
    rig.orch.cache.load()
    await rig.orch.cache.put(h, "an-older-selection")

    async with running(rig):
        # what the monitor reports when the selected size changes
        rig.orch.on_update(
            MaindataUpdate(False, {h: frozenset({"size"})}, frozenset(), frozenset())
        )
        await eventually(lambda: ("resync", h) in events)
    assert events == [("untag:synced", h), ("resync", h)]
    assert h not in rig.orch.cache
    assert rig.registry.get(h) is not None  # tracked: cleanup's candidates skip it


def make_tagged(tmp_path: Path, qb: FakeQB, **kw: Any) -> tuple[Cleanup, CompletionCache, Any]:
    cleanup, cache, started = make(tmp_path, qb, **kw)
    cleanup.handoff_tag = "move"
    cleanup.exclude_sync_tag = "nosync"
    return cleanup, cache, started


async def test_handoff_tag_moves_only_tagged_synced_torrents_whatever_space_and_keep(tmp_path):
    """Precedence: the tag overrides --min-space, --min-seeding-time and the exclude-cleanup
    tag; the exclude-sync tag wins; a tagged torrent not synced yet waits (pending)."""
    qb = FakeQB()
    cleanup, cache, started = make_tagged(tmp_path, qb, min_space=0)
    for h in "abce":
        await cache.put(h, "0")
    torrents = [
        t("a", tags="move, keep", seeding_time=0),  # exclude-cleanup: overridden
        t("b"),  # untagged: stays
        t("c", tags="move, nosync"),  # exclude-sync wins
        t("d", tags="move"),  # not synced yet: pending
        t("e", tags="synced, move"),
    ]
    assert await cleanup.run_tagged(torrents) == 2
    assert started == ["a", "e"]
    assert ("delete", "a") in qb.calls and ("delete", "e") in qb.calls
    assert not any(h in ("b", "c", "d") for _, h in qb.calls)
    assert cleanup.tag_status() == {"tag": "move", "pending": 1, "refused": {}}


async def test_handoff_tag_disabled_does_nothing(tmp_path):
    qb = FakeQB()
    cleanup, cache, started = make(tmp_path, qb)
    await cache.put("a", "0")
    assert await cleanup.run_tagged([t("a", tags="synced, move")]) == 0
    assert qb.calls == [] and started == []


async def test_handoff_tag_dry_run_deletes_nothing(tmp_path, caplog):
    qb = FakeQB()
    cleanup, cache, started = make_tagged(tmp_path, qb, dry_run=True)
    await cache.put("a", "0")
    with caplog.at_level(logging.INFO, logger="qbsync.source.cleanup"):
        assert await cleanup.run_tagged([t("a", tags="move")]) == 0
        assert await cleanup.run_tagged([t("a", tags="move")]) == 0
    assert qb.calls == [] and started == []
    assert caplog.text.count("event=dry_run action=handoff") == 1


async def test_handoff_tag_refusal_keeps_source_and_retries_with_backoff(tmp_path, autojump_clock):
    """A refusal resumes the source (nothing deleted), shows in status and the metric, and is
    retried after 5 s, then 10 s, while the tag stays; removing the tag forgets it."""
    qb = FakeQB()
    cleanup, cache, _started = make_tagged(tmp_path, qb, answer=WireError(ErrorCode.CONFLICT, "no"))
    await cache.put("a", "0")
    before = metrics.handoff_tag_results.labels("refused")._value.get()
    torrents = [t("a", tags="move")]
    assert await cleanup.run_tagged(torrents) == 0
    assert qb.calls == [("stop", "a"), ("dest-start", "a"), ("start", "a")]
    status = cleanup.tag_status()
    assert status["refused"]["a"]["reason"] == "conflict"
    assert status["refused"]["a"]["attempts"] == 1 and status["pending"] == 1
    assert metrics.handoff_tag_results.labels("refused")._value.get() == before + 1
    await cleanup.run_tagged(torrents)  # too early: not tried
    assert len(qb.calls) == 3
    await trio.sleep(5)
    await cleanup.run_tagged(torrents)
    assert len(qb.calls) == 6 and cleanup.tag_status()["refused"]["a"]["attempts"] == 2
    await trio.sleep(5)
    await cleanup.run_tagged(torrents)
    assert len(qb.calls) == 6  # the second delay is 10 s
    assert not any(c[0] == "delete" for c in qb.calls)
    await cleanup.run_tagged([t("a", tags="synced")])  # the user took the tag away
    assert cleanup.tag_status()["refused"] == {} and cleanup.tag_status()["pending"] == 0


async def test_handoff_tag_hands_off_once_while_the_deleted_torrent_is_still_listed(tmp_path):
    """qBittorrent deletes asynchronously: the next pass may still list the torrent."""
    qb = FakeQB()
    cleanup, cache, started = make_tagged(tmp_path, qb)
    await cache.put("a", "0")
    assert await cleanup.run_tagged([t("a", tags="move")]) == 1
    assert await cleanup.run_tagged([t("a", tags="move")]) == 0
    assert started == ["a"] and qb.calls.count(("delete", "a")) == 1
    assert cleanup.tag_status()["pending"] == 0
