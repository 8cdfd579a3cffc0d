"""Handing seeding over: disk-pressure cleanup and the SIGTERM drain (real processes)."""

from __future__ import annotations

import shutil
import signal

import pytest

from tests.integration.source_rig import (
    Rig,
    metric,
    tags_of,
)
from tests.qbharness import SEEDING_STATES, wait_until

pytestmark = pytest.mark.integration


def test_disk_pressure_hands_synced_torrent_to_destination(rig: Rig) -> None:
    ih = rig.info_hash
    # Any real disk is below a 1 PiB threshold: cleanup runs as soon as the torrent is synced.
    source, health = rig.start_source("--min-space", str(1 << 20), "--min-seeding-time", "0")
    rig.add_to_source(download_limit=None)
    wait_until(lambda: rig.src_qb.info(ih) is None, 90, 0.2, "removed from the source")
    source.wait_for_log("event=handed_off", timeout=120)
    rig.wait_source_files_deleted()  # deleted with its files
    dst = rig.dst_qb.info(ih)
    assert dst is not None
    assert {"synced", "source-removed"} <= tags_of(rig.dst_qb, ih)
    rig.dst_qb.wait_seeding(ih, timeout=30)
    rig.assert_identical()
    assert metric(health, "qbsync_cleanup_torrents_handed_off_total") == 1
    # The removal that followed the handoff is recognized: the cache entry goes.
    wait_until(lambda: "event=handoff_removed" in source.log_text(), 120, 0.2, "cache pruned")


def test_sigterm_drain_hands_off_when_unconditional(rig: Rig) -> None:
    ih = rig.info_hash
    source, _ = rig.start_source("--drain-annotation", "", "--min-space", "0")
    rig.add_to_source(download_limit=None)
    wait_until(lambda: "synced" in tags_of(rig.src_qb, ih), 90, 0.2, "synced")
    assert rig.src_qb.info(ih) is not None  # no disk pressure: still seeding on the source
    source.signal(signal.SIGTERM)
    assert source.wait(60) == 0
    log = source.log_text()
    assert "event=drain_start" in log and "event=drain_done handed_off=1" in log
    assert rig.src_qb.info(ih) is None
    assert "source-removed" in tags_of(rig.dst_qb, ih)


def test_sigterm_without_annotation_outside_kubernetes_does_not_drain(rig: Rig) -> None:
    ih = rig.info_hash
    source, _ = rig.start_source("--min-space", "0")  # default --drain-annotation qbsync/drain
    rig.add_to_source(download_limit=None)
    wait_until(lambda: "synced" in tags_of(rig.src_qb, ih), 90, 0.2, "synced")
    source.signal(signal.SIGTERM)
    assert source.wait(60) == 0
    assert "event=drain_skipped" in source.log_text()  # fail-closed
    assert rig.src_qb.info(ih) is not None


def test_dry_run_neither_cleanup_nor_drain_hands_off(rig: Rig) -> None:
    """A synced torrent under disk pressure, then a SIGTERM with an unconditional drain, in dry
    run: both would hand it off (and say so), neither stops, starts, deletes or writes."""
    ih = rig.info_hash
    first, _ = rig.start_source("--min-space", "0")
    rig.add_to_source(download_limit=None)
    rig.wait_synced()
    assert first.stop() == 0
    cache = rig.state_dir / "completed_on_dest.json"
    cached = cache.read_bytes()
    assert ih in cached.decode()

    dry, _ = rig.start_source(
        "--dry-run",
        "--min-space",
        str(1 << 20),
        "--min-seeding-time",
        "0",
        "--drain-annotation",
        "",
    )
    dry.wait_for_log("event=dry_run action=handoff", timeout=120)
    dry.signal(signal.SIGTERM)
    assert dry.wait(60) == 0
    assert "event=drain_done handed_off=1" in dry.log_text()  # the drain ran, in dry run
    src = rig.src_qb.info(ih)
    assert src is not None and src["state"] in SEEDING_STATES, src
    assert (rig.src_qb.save_path / rig.seeded.name).exists()
    dst = rig.dst_qb.info(ih)
    assert dst is not None and dst["state"] in ("pausedUP", "stoppedUP"), dst  # never started
    assert "source-removed" not in tags_of(rig.dst_qb, ih)
    assert cache.read_bytes() == cached


def _synced_then_stopped(rig: Rig) -> None:
    """Sync the rig's torrent with a source that never hands off, then stop that source."""
    first, _ = rig.start_source("--min-space", "0")
    rig.add_to_source(download_limit=None)
    rig.wait_synced()
    assert first.stop() == 0


def test_handoff_to_destination_whose_files_were_deleted_keeps_the_source_copy(rig: Rig) -> None:
    """The unlucky user: the destination's files are deleted while its qBittorrent keeps
    listing the torrent (stopped, still at progress 1.0). A source under disk pressure offers
    it for hand-off; the destination refuses (``not-found``: its copy is gone), the source
    resumes seeding with its files, forgets the completion and syncs the torrent again; only
    then is it handed off. Before the fix the source deleted its copy within 30 ms."""
    ih = rig.info_hash
    _synced_then_stopped(rig)
    shutil.rmtree(rig.dst_data / rig.seeded.name)
    dst = rig.dst_qb.info(ih)
    assert dst is not None and float(dst["progress"]) == 1.0  # qBittorrent has not noticed
    source, health = rig.start_source("--min-space", str(1 << 20), "--min-seeding-time", "0")
    log = source.wait_for_log("event=completion_forgotten", timeout=60)
    assert "event=handoff_refused" in log and "reason=not-found" in log
    assert metric(health, "qbsync_handoff_refused_total", {"reason": "not-found"}) >= 1
    assert (rig.src_qb.save_path / rig.seeded.name).exists()
    assert rig.src_qb.info(ih) is not None
    # Synced again, verified again, and only then handed off.
    wait_until(lambda: rig.src_qb.info(ih) is None, 120, 0.2, "handed off after the re-sync")
    rig.assert_identical()
    rig.dst_qb.wait_seeding(ih, timeout=30)


def test_dry_run_destination_never_causes_a_source_delete(rig: Rig) -> None:
    """A destination in dry run answers ``started=False``. The source used to ignore the
    answer and delete its copy; now it resumes and keeps it, and counts the refusal."""
    ih = rig.info_hash
    _synced_then_stopped(rig)
    assert rig.dest is not None and rig.dest.stop() == 0
    rig.start_destination("--dry-run")
    source, health = rig.start_source("--min-space", str(1 << 20), "--min-seeding-time", "0")
    source.wait_for_log("event=handoff_refused", timeout=60)
    assert "reason=not-started" in source.log_text()
    assert metric(health, "qbsync_handoff_refused_total", {"reason": "not-started"}) >= 1
    rig.src_qb.wait_seeding(ih, timeout=30)
    assert (rig.src_qb.save_path / rig.seeded.name).exists()
    assert metric(health, "qbsync_cleanup_torrents_handed_off_total") == 0
    dst = rig.dst_qb.info(ih)
    assert dst is not None and dst["state"] in ("pausedUP", "stoppedUP"), dst  # never started
