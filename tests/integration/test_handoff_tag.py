"""``--handoff-tag``: a tag set in qBittorrent moves that torrent now (real processes)."""

from __future__ import annotations

import pytest

from tests.integration.conftest import SeededFactory
from tests.integration.source_rig import (
    FILES,
    PIECE,
    Rig,
    http_status,
    metric,
    tags_of,
)
from tests.qbharness import SEEDING_STATES, wait_until

pytestmark = pytest.mark.integration


def _cycles(health: int) -> int:
    code, body = http_status(health, "/status")
    assert code == 200, body
    return int(body["cycles"])


def _wait_cycles(health: int, n: int) -> None:
    """Until the orchestrator ran ``n`` more cycles (each one would have handed off)."""
    target = _cycles(health) + n
    wait_until(lambda: _cycles(health) >= target, 60, 0.2, f"{n} more cycles")


def test_tagged_torrent_is_moved_and_untagged_one_stays(
    rig: Rig, seeded_torrent: SeededFactory
) -> None:
    tagged = rig.info_hash
    other = seeded_torrent(FILES, piece_size=PIECE, seed=7, name="other", seeder=rig.seeded.seeder)
    # No disk pressure (--min-space 0) and a long --min-seeding-time: only the tag moves it.
    source, health = rig.start_source(
        "--handoff-tag", "handoff", "--min-space", "0", "--min-seeding-time", "999999"
    )
    other.add_to(rig.src_qb, download_limit=None)
    rig.add_to_source(download_limit=None, tags=["handoff", "tv"])
    wait_until(lambda: rig.src_qb.info(tagged) is None, 120, 0.2, "tagged torrent moved")
    assert "event=handed_off" in source.log_text()
    rig.wait_source_files_deleted()  # deleted with its files
    rig.dst_qb.wait_seeding(tagged, timeout=30)
    rig.assert_identical()
    dst_tags = tags_of(rig.dst_qb, tagged)
    assert {"synced", "source-removed", "tv"} <= dst_tags
    assert "handoff" not in dst_tags  # the destination never copies the request
    assert metric(health, "qbsync_handoff_tag_total", {"result": "handed_off"}) == 1
    # The untagged torrent syncs and stays on the source, seeding.
    wait_until(lambda: "synced" in tags_of(rig.dst_qb, other.info_hash), 120, 0.2, "other synced")
    _wait_cycles(health, 3)
    info = rig.src_qb.info(other.info_hash)
    assert info is not None and info["state"] in SEEDING_STATES, info
    assert (rig.src_qb.save_path / "other").exists()
    assert metric(health, "qbsync_handoff_tag_total", {"result": "handed_off"}) == 1
    assert metric(health, "qbsync_handoff_tag_pending") == 0


def _synced_then_stopped(rig: Rig) -> None:
    first, _ = rig.start_source("--min-space", "0")
    rig.add_to_source(download_limit=None)
    rig.wait_synced()
    assert first.stop() == 0


def test_tag_on_torrent_whose_destination_copy_is_refused_keeps_the_source_copy(
    rig: Rig,
) -> None:
    """The destination refuses (here it runs --dry-run: it answers started=False). The source
    resumes its copy, says so (log, /status, metric) and tries again while the tag stays."""
    ih = rig.info_hash
    _synced_then_stopped(rig)
    assert rig.dest is not None and rig.dest.stop() == 0
    rig.start_destination("--dry-run")
    rig.src_qb.api.torrents_add_tags(tags="handoff", torrent_hashes=ih)
    source, health = rig.start_source("--handoff-tag", "handoff", "--min-space", "0")
    source.wait_for_log("event=handoff_tag_refused", timeout=60)
    source.wait_for_log("attempts=2", timeout=60)  # retried while the tag stays
    assert "reason=not-started" in source.log_text()
    assert metric(health, "qbsync_handoff_tag_total", {"result": "refused"}) >= 2
    assert metric(health, "qbsync_handoff_tag_pending") == 1
    code, body = http_status(health, "/status")
    assert code == 200
    assert body["handoff_tag"]["refused"][ih]["reason"] == "not-started"
    rig.src_qb.wait_seeding(ih, timeout=30)
    assert (rig.src_qb.save_path / rig.seeded.name).exists()
    assert "event=handed_off" not in source.log_text()


def test_without_the_flag_the_tag_does_nothing(rig: Rig) -> None:
    ih = rig.info_hash
    source, health = rig.start_source("--min-space", "0")
    rig.add_to_source(download_limit=None, tags=["handoff"])
    rig.wait_synced()
    _wait_cycles(health, 3)
    info = rig.src_qb.info(ih)
    assert info is not None and info["state"] in SEEDING_STATES, info
    assert (rig.src_qb.save_path / rig.seeded.name).exists()
    assert "handoff_tag" not in http_status(health, "/status")[1]
    assert "event=handed_off" not in source.log_text()
