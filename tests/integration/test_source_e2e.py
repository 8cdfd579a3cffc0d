"""End-to-end: the real source daemon streams a torrent while qBittorrent downloads it.

Three real qbittorrent-nox (seeder, source downloading at 512 KiB/s, destination) and both
real qbsync daemons as processes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.conftest import QbFactory, QbsyncFactory, SeededFactory
from tests.integration.source_rig import FILES, metric, http_status, make_rig, tags_of
from tests.qbharness import wait_until

pytestmark = pytest.mark.integration


def test_streams_while_downloading_then_verified_tagged_identical(
    tmp_path: Path,
    qb_factory: QbFactory,
    seeded_torrent: SeededFactory,
    qbsync_factory: QbsyncFactory,
) -> None:
    rig = make_rig(tmp_path, qb_factory, seeded_torrent, qbsync_factory)
    source, health = rig.start_source()
    ih = rig.info_hash
    n = rig.seeded.num_pieces
    rig.add_to_source()

    # While the source is still downloading, the destination already holds a large share.
    best_share = 0.0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        info = rig.src_qb.info(ih)
        received = metric(rig.dest_health, "qbsync_pieces_received_total")
        if info and float(info["progress"]) >= 1:
            break
        if info and 0 < float(info["progress"]) < 1:
            best_share = max(best_share, received / n)
        time.sleep(0.2)
    assert best_share >= 0.5, f"only {best_share:.0%} on the destination before the source finished"

    # The torrent ends verified on the destination, tagged synced on both sides.
    wait_until(lambda: "synced" in tags_of(rig.src_qb, ih), 60, 0.2, "source tagged synced")
    wait_until(lambda: "synced" in tags_of(rig.dst_qb, ih), 60, 0.2, "destination tagged synced")
    dst = rig.dst_qb.info(ih)
    assert dst is not None and float(dst["progress"]) == 1
    for rel in FILES:
        assert rig.dest_file(rel).read_bytes() == rig.seeded.expected_bytes(rel), rel
    # Each piece was sent exactly once, and finalize followed the last ack quickly.
    assert metric(health, "qbsync_pieces_acked_total") == n
    assert metric(health, "qbsync_pieces_resent_total") == 0
    assert metric(health, "qbsync_sync_outcomes_total", {"result": "synced"}) == 1
    code, status = http_status(health, "/readyz")
    assert code == 200, status
    # The source keeps seeding after a sync.
    assert rig.src_qb.info(ih)["state"] in ("stalledUP", "uploading")
    log = source.log_text()
    assert "event=torrent_synced" in log and "code=internal" not in log
