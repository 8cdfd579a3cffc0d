"""Handing seeding over: disk-pressure cleanup and the SIGTERM drain (real processes)."""

from __future__ import annotations

import signal

import pytest

from tests.integration.source_rig import (  # noqa: F401  (the *_fixture names are fixtures)
    Rig,
    metric,
    rig_factory_fixture,
    rig_fixture,
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
    source.wait_for_log("event=handed_off", timeout=5)
    assert not (rig.src_qb.save_path / rig.seeded.name).exists()  # deleted with its files
    dst = rig.dst_qb.info(ih)
    assert dst is not None
    assert {"synced", "source-removed"} <= tags_of(rig.dst_qb, ih)
    wait_until(
        lambda: (rig.dst_qb.info(ih) or {}).get("state") in SEEDING_STATES,
        30,
        0.2,
        "destination seeding",
    )
    rig.assert_identical()
    assert metric(health, "qbsync_cleanup_torrents_handed_off_total") == 1
    # The removal that followed the handoff is recognized: the cache entry goes.
    wait_until(lambda: "event=handoff_removed" in source.log_text(), 15, 0.2, "cache pruned")


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
    dry.wait_for_log("event=dry_run action=handoff", timeout=30)
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
