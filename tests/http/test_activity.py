"""The dashboard's memory: the activity log, throughput buckets, state words, the page parts."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import attrs
import pytest

from qbsync.bitfield import Bitfield
from qbsync.http import activity, status
from qbsync.http.activity import (
    ActivityLog,
    Event,
    Throughput,
    completed_ms_ago,
    since_complete,
)
from qbsync.http.status import DaemonStatus, Peer, Sections, StatusBuilder
from qbsync.source.state import Tracked
from qbsync.source.tracker import PieceTracker
from qbsync.wire.messages import COMPLETED_UNKNOWN
from tests.status_schema import assert_valid

DAEMON = DaemonStatus(1, 0, 0, 10, "127.0.0.1:1")
T0 = 1_765_000_000.0  # a fixed wall clock


def ev(kind: str = "synced", t: float = T0, **kw: Any) -> Event:
    base: dict[str, Any] = {"time": t, "kind": kind, "hash": "ab" * 20, "name": "Show <1>"}
    base.update({"size": 1000, "duration_seconds": 12.5, "since_complete_seconds": 30.0})
    base.update(kw)
    return Event(**base)


async def test_events_and_totals_survive_a_restart_in_a_private_file(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "state", wall=lambda: T0)
    await log.record(ev("synced", size=1000))
    await log.record(ev("handed off", T0 + 1, size=1000))
    await log.record(ev("failed", T0 + 2, size=5, code="verify-failed", message="recheck 99%"))
    path = tmp_path / "state" / activity.FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]

    again = ActivityLog(tmp_path / "state", wall=lambda: T0 + 3)
    again.load()
    doc = again.status()
    assert [e["kind"] for e in doc["recent"]] == ["failed", "handed off", "synced"]
    assert doc["recent"][0]["code"] == "verify-failed"
    expected = {"bytes": 1000, "synced": 1, "handed_off": 1, "failed": 1}
    assert doc["totals"]["all"] == expected and doc["totals"]["today"] == expected
    assert doc["totals"]["since"] == round(log.since, 3)


async def test_the_log_is_bounded_and_today_is_a_calendar_day(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path, wall=lambda: T0 + 2 * 86400)
    for i in range(activity.MAX_EVENTS + 20):
        await log.record(ev("synced", T0 + i, size=1))
    await log.record(ev("synced", T0 + 2 * 86400, size=7))
    assert len(log.events) == activity.MAX_EVENTS
    doc = log.status(limit=5)
    assert len(doc["recent"]) == 5
    assert doc["totals"]["all"]["synced"] == activity.MAX_EVENTS + 21
    assert doc["totals"]["today"] == {"bytes": 7, "synced": 1, "handed_off": 0, "failed": 0}
    for day in range(activity.KEEP_DAYS + 3):
        await log.record(ev("failed", T0 + (3 + day) * 86400))
    assert len(log.days) == activity.KEEP_DAYS


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"format": 99}',
        b'{"format": 1, "since": 1, "total": [], "days": {}, "events": []}',
        b'{"format": 1, "since": "x", "total": {}, "days": {}, "events": []}',
        b" " * (activity.MAX_FILE_BYTES + 1),
    ],
)
async def test_bad_content_is_ignored_with_a_log_line_and_replaced_at_the_next_event(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / activity.FILE_NAME).write_bytes(content)
    log = ActivityLog(tmp_path)
    with caplog.at_level(logging.WARNING):
        log.load()
    assert "event=activity_ignored code=bad-request" in caplog.text
    assert log.events == [] and log.total == activity.Totals()
    await log.record(ev())
    fresh = ActivityLog(tmp_path)
    fresh.load()
    assert [e.kind for e in fresh.events] == ["synced"]


async def test_single_bad_events_are_dropped_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = ev().to_json()
    doc = {
        "format": 1,
        "since": T0,
        "total": {"bytes": 1, "synced": 1, "handed_off": 0, "failed": 0},
        "days": {},
        "events": [good, {"kind": "deleted everything"}, {**good, "size": "big"}, 7, good],
    }
    (tmp_path / activity.FILE_NAME).write_text(json.dumps(doc))
    log = ActivityLog(tmp_path)
    with caplog.at_level(logging.WARNING):
        log.load()
    assert len(log.events) == 2
    assert (
        "event=activity_events_ignored code=bad-request" in caplog.text
        and "dropped=3" in caplog.text
    )


async def test_a_planted_symlink_is_not_followed_and_not_written_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text("precious")
    state = tmp_path / "state"
    state.mkdir()
    os.symlink(target, state / activity.FILE_NAME)
    log = ActivityLog(state)
    with caplog.at_level(logging.WARNING):
        log.load()
    assert "event=activity_ignored" in caplog.text
    await log.record(ev())
    assert target.read_text() == "precious"  # the rename replaced the link, not its target
    assert not (state / activity.FILE_NAME).is_symlink()


def test_leftovers_of_an_interrupted_write_are_removed_and_nothing_else(tmp_path: Path) -> None:
    leftover = tmp_path / f".tmp-{activity.FILE_NAME}-0123abcd"
    leftover.write_text("half")
    kept = [
        tmp_path / f".tmp-{activity.FILE_NAME}-notours",
        tmp_path / ".tmp-meta.json-0123abcd",
        tmp_path / ("0123abcd" * 5),
    ]
    for k in kept:
        k.write_text("x")
    os.symlink(tmp_path / ("0123abcd" * 5), tmp_path / f".tmp-{activity.FILE_NAME}-89abcdef")
    ActivityLog(tmp_path).load()
    assert not leftover.exists()
    assert all(k.exists() for k in kept)
    assert (tmp_path / f".tmp-{activity.FILE_NAME}-89abcdef").is_symlink()  # not a file: kept


async def test_a_failed_write_is_logged_and_the_event_kept_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = ActivityLog(blocker / "state")  # its parent is a file: mkdir fails
    with caplog.at_level(logging.WARNING):
        await log.record(ev())
    assert "event=activity_write_failed code=io" in caplog.text
    assert len(log.events) == 1


def test_throughput_buckets_the_last_hour_from_a_counter() -> None:
    counter = {"v": 0.0}
    tp = Throughput(lambda: counter["v"])
    base = 1_765_000_040.0  # 20 s into a 30 s bucket (1_765_000_020 is a bucket start)
    tp.observe(base - 20, 0.0)
    counter["v"] = 3000.0
    doc = tp.status(base)
    rates = doc["bytes_per_second"]
    assert len(rates) == activity.HOUR // activity.BUCKET_SECONDS
    assert rates[-1] == 150.0  # 3000 bytes over the 20 s of the current bucket
    assert doc["bytes"] == 3000 and sum(rates[:-1]) == 0
    counter["v"] = 9000.0
    later = tp.status(base + 60)  # two buckets later
    assert later["bytes_per_second"][-3] == 100.0  # the bucket of `base`, now whole
    assert later["bytes"] == 9000
    assert tp.status(base + 2 * activity.HOUR)["bytes"] == 0  # an hour later: forgotten
    counter["v"] = 10.0  # a counter reset is a new baseline, not a negative rate
    assert tp.status(base + 2 * activity.HOUR + 5)["bytes"] == 0


async def test_the_last_hour_of_throughput_survives_a_restart(tmp_path: Path) -> None:
    tp = Throughput()
    tp.buckets = {int(T0) - 2 * activity.HOUR: 5.0, int(T0) - 60: 3000.0}
    log = ActivityLog(tmp_path, wall=lambda: T0, throughput=tp)
    await log.save()
    again_tp = Throughput()
    again = ActivityLog(tmp_path, wall=lambda: T0 + 30, throughput=again_tp)
    again.load()
    assert again_tp.buckets == {int(T0) - 60: 3000.0}  # older than an hour: not restored
    doc = again_tp.status(T0 + 30)
    assert doc["bytes"] == 3000 and doc["since"] == int(T0) - 60
    # A restored current bucket's rate is over all of its elapsed part, not since the start.
    b = int(T0) - int(T0) % activity.BUCKET_SECONDS
    restarted = Throughput()
    restarted.restore({b: 3000.0})
    restarted.observe(b + 20, 0.0)  # the daemon's first sample, 20 s into the bucket
    assert restarted.status(b + 20)["bytes_per_second"][-1] == 150.0


async def test_saving_nothing_writes_nothing(tmp_path: Path) -> None:
    await ActivityLog(tmp_path / "state", throughput=Throughput()).save()
    assert not (tmp_path / "state").exists()


def _tracked(*, complete: bool = False) -> Tracked:
    """A real tracked torrent of two pieces (``complete``: the destination has both)."""
    meta = SimpleNamespace(info_hash="ab" * 20, name="t", num_pieces=2)
    tracker = PieceTracker(2)
    if complete:
        tracker.apply_needed(Bitfield(2))  # nothing needed: every piece acknowledged
    return Tracked("ab" * 20, cast(Any, meta), tracker, since=0.0, seq=0)


def _streaming(**kw: Any) -> Tracked:
    t = _tracked(**kw)
    t.initialized(1)
    return t


def test_source_state_words() -> None:
    """The words come from the tracked torrent's phase (``Tracked.status_label``), with
    qBittorrent's progress and the pool's connection state."""
    s = status.source_state
    downloading = {"progress": 0.4}
    assert s(_streaming(), downloading, True) == "downloading + streaming"
    assert s(_streaming(), {"progress": 1.0}, True) == "streaming"
    assert s(_streaming(), downloading, False) == "waiting"
    assert s(_tracked(), downloading, True) == "waiting"  # InitTorrent not answered yet
    assert s(_streaming(complete=True), downloading, True) == "finalizing"
    verifying = _streaming(complete=True)
    verifying.begin_finalize(1.0)
    verifying.finalize_verifying(2.0)
    assert s(verifying, None, True) == "verifying"
    failed = _streaming()
    failed.begin_finalize(1.0)
    failed.finalize_failed("io", "disk")
    assert s(failed, None, False) == "retrying"
    for phase, word in [("active", "streaming"), ("scanning", "verifying")]:
        assert status.destination_state(phase) == word
    assert set(status.STATES) >= {"downloading + streaming", "verifying", "finalizing"}


class _Peers:
    def __init__(self, entries: list[Any]) -> None:
        self.entries = entries

    def all(self) -> list[Any]:
        return self.entries


@attrs.frozen
class _WirePeer:
    address: str
    conn_id: int
    fingerprint: str = "SHA256:source-a"


@attrs.frozen
class _Open:
    peer: _WirePeer
    opened: float
    software: str = "qbsync"
    tls: bool = True
    auth: bool = True


def test_destination_names_its_sources_by_address_and_key() -> None:
    """One entry per source: its connections share an address and a key; two sources behind
    one address (a NAT) are two entries, told apart by their keys."""
    open_peers = _Peers(
        [
            _Open(_WirePeer("10.0.0.5:40001", 1), 5.0),
            _Open(_WirePeer("10.0.0.5:40002", 2), 3.0),
            _Open(_WirePeer("[2001:db8::1]:5000", 3, "SHA256:source-b"), 9.0, auth=False),
        ]
    )
    peers = status.destination_peers(open_peers)
    assert [(p.address, p.connections, p.since, p.auth, p.fingerprint) for p in peers] == [
        ("10.0.0.5", 2, 3.0, "key + token", "SHA256:source-a"),
        ("[2001:db8::1]", 1, 9.0, "key", "SHA256:source-b"),
    ]
    behind_nat = _Peers(
        [
            _Open(_WirePeer("10.0.0.5:40001", 1), 5.0),
            _Open(_WirePeer("10.0.0.5:40003", 4, "SHA256:source-c"), 6.0),
        ]
    )
    assert [p.fingerprint for p in status.destination_peers(behind_nat)] == [
        "SHA256:source-a",
        "SHA256:source-c",
    ]
    daemon = status.destination_daemon(_Budget(), [48105], peers)
    assert daemon.peer == "10.0.0.5, [2001:db8::1]"
    alone = status.destination_daemon(_Budget(), [48105], [])
    assert alone.peer == "no source connected; listening on 48105"


class _Budget:
    used = 0
    limit = 1


async def test_the_page_shows_activity_totals_chart_disk_candidates_and_peers(
    tmp_path: Path,
) -> None:
    log = ActivityLog(tmp_path, wall=lambda: T0)
    await log.record(ev("synced", name="Show <1>"))
    await log.record(ev("handed off", T0 + 5, name="Show <1>"))
    tp = Throughput(lambda: 0.0)
    tp.observe(T0 - 100, 0.0)
    tp.observe(T0 - 40, 6_000_000.0)
    sections = Sections(
        activity=log,
        throughput=tp,
        peers=[Peer("192.0.2.1:7000", "destination", 2, T0 - 60, "qbsync", "key + token", True)],
        free_bytes=5 * 1024**3,
        min_space_bytes=10 * 1024**3,
        handoff_candidates=[
            {
                "hash": "cd" * 20,
                "name": "Old <Movie>",
                "size": 3,
                "seeding_time": 7200,
                "peers": 4,
                "waiting_seeding": False,
            }
        ],
    )
    doc = StatusBuilder("source", wall=lambda: T0).document(DAEMON, [], sections=sections)
    assert_valid(doc)
    page = status.render_html(doc)
    assert "<script" not in page.lower() and "Show &lt;1&gt;" in page and "<1>" not in page
    assert 'data-kind="handed off"' in page and "handed off · seeding on destination" in page
    assert "complete → seeding on destination in 30s" in page
    assert 'id="total-handed-off"' in page and "Old &lt;Movie&gt;" in page
    assert "below: handing off synced torrents" in page
    assert 'data-address="192.0.2.1:7000"' in page and "2 connections · TLS · key + token" in page
    peak = float(page.split('data-peak="', 1)[1].split('"', 1)[0])
    assert peak == 200_000.0 and '<path class="bars"' in page
    out = io.StringIO()
    status.render_table(doc, out)
    text = out.getvalue()
    assert "totals: today 1000 B moved, 1 synced, 1 handed off" in text
    assert "handed off · seeding on destination  Show <1>" in text


def test_an_empty_chart_has_no_bars() -> None:
    svg = status.chart_svg(Throughput().status(T0))
    assert 'data-peak="0.0"' in svg and "bars" not in svg


# -- the source's orchestrator records what it finishes ---------------------------------------


async def test_source_records_synced_failed_and_removed_handoffs(
    tmp_path: Path, autojump_clock: Any
) -> None:
    from qbsync.wire.errors import ErrorCode, WireError
    from qbsync.wire.messages import (
        Finalize,
        FinalizeResult,
        InitTorrent,
        StartResult,
        StartTorrent,
        SyncStatus,
    )
    from tests.source.test_source_orchestrator import (
        NOTHING_NEEDED,
        eventually,
        make,
        on_disk,
        running,
        streamed,
    )

    torrents = on_disk(tmp_path, "good", "bad", completion_on=T0)
    good, bad = torrents
    fail = WireError(ErrorCode.VERIFY_FAILED, "recheck stopped at 99%")
    rig = make(
        tmp_path,
        torrents,
        {
            Finalize: lambda m: (
                FinalizeResult(SyncStatus.COMPLETE) if m.info_hash == good else fail
            ),
            InitTorrent: NOTHING_NEEDED,
            StartTorrent: StartResult(True),
        },
    )
    log = rig.orch.activity = rig.orch.cleanup.activity = ActivityLog(tmp_path / "state")
    streamed(rig, good)
    streamed(rig, bad)
    async with running(rig):
        await eventually(lambda: good not in rig.registry and bad not in rig.registry)
        by_hash = {e.hash: e for e in log.events}
        assert by_hash[good].kind == "synced" and by_hash[good].size > 0
        assert by_hash[good].since_complete_seconds is not None
        assert by_hash[bad].kind == "failed" and by_hash[bad].code == "verify-failed"
        # The synced one is removed from the source by its user: the destination takes over.
        del rig.monitor.torrents[good]
        rig.orch.on_removed(good)
        await eventually(lambda: len(log.events) == 3)
    handed = log.events[-1]
    assert (handed.kind, handed.hash, handed.name) == ("handed off", good, by_hash[good].name)
    assert handed.message == "removed from the source"
    assert log.total.handed_off == 1 and log.total.synced == 1 and log.total.failed == 1


async def test_the_removal_after_a_cleanup_hand_off_is_not_a_second_one(
    tmp_path: Path, autojump_clock: Any
) -> None:
    from qbsync.wire.messages import StartResult, StartTorrent
    from tests.source.test_source_orchestrator import eventually, make, running

    h = "ab" * 20
    rig = make(tmp_path, {}, {StartTorrent: StartResult(True)})
    log = rig.orch.activity = ActivityLog(None)
    await rig.orch.cache.put(h, "0")
    rig.orch.cleanup.handed_off.add(h)  # as a cleanup pass leaves it after its delete
    async with running(rig):
        rig.orch.on_removed(h)
        await eventually(lambda: h not in rig.orch.cache)
    assert log.events == [] and h not in rig.orch.cleanup.handed_off


def test_completed_ms_ago_is_a_duration_on_the_senders_clock() -> None:
    assert completed_ms_ago(1_000.0, 1_090.5) == 90_500
    assert completed_ms_ago(1_000.0, 1_000.0) == 0
    # Unknown: qBittorrent has no completion time, or one after now.
    for completed in (None, 0.0, -1.0, 2_000.0):
        assert completed_ms_ago(completed, 1_090.5) == COMPLETED_UNKNOWN


def test_since_complete_adds_the_receivers_own_elapsed_time() -> None:
    assert since_complete(90_500, 2.0) == 92.5
    assert since_complete(0, -0.1) == 0.0  # never below what the source measured
    assert since_complete(COMPLETED_UNKNOWN, 5.0) is None
