"""Several seedboxes into one home: two source daemons, each with its own qBittorrent, feed
one destination at the same time (real processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import SeededFactory
from tests.integration.source_rig import (
    FILES,
    PIECE,
    RATE,
    Rig,
    http_status,
    metric,
    tags_of,
)
from tests.qbharness import SeededTorrent, wait_until

pytestmark = pytest.mark.integration


def _identical(rig: Rig, seeded: SeededTorrent) -> None:
    for rel in FILES:
        got = (rig.dst_data / seeded.name / rel).read_bytes()
        assert got == seeded.expected_bytes(rel), (seeded.name, rel)


def test_two_sources_feed_one_destination_and_a_shared_torrent_is_stored_once(
    rig: Rig, seeded_torrent: SeededFactory, tmp_path: Path
) -> None:
    seeder = rig.seeded.seeder
    only_b = seeded_torrent(FILES, piece_size=PIECE, seed=2, name="only-b", seeder=seeder)
    shared = seeded_torrent(FILES, piece_size=PIECE, seed=3, name="shared", seeder=seeder)
    qb_b = rig.qb_factory("source-b")
    a, health_a = rig.start_source("--source-name", "box-a")
    b, health_b = rig.start_source(
        "--source-name", "box-b", qb=qb_b, state_dir=tmp_path / "state-b"
    )
    # Throttled: both sources are still downloading the shared torrent when both find it.
    shared.add_to(rig.src_qb, download_limit=RATE)
    shared.add_to(qb_b, download_limit=RATE)
    rig.add_to_source(download_limit=None)  # only on A
    only_b.add_to(qb_b, download_limit=None)

    everything = (rig.seeded, only_b, shared)
    for seeded in everything:
        wait_until(
            lambda s=seeded: "synced" in tags_of(rig.dst_qb, s.info_hash),  # type: ignore[misc]
            180,
            0.2,
            f"{seeded.name} synced on the destination",
        )
        _identical(rig, seeded)
    for inst in (rig.src_qb, qb_b):
        wait_until(
            lambda i=inst: "synced" in tags_of(i, shared.info_hash),  # type: ignore[misc]
            120,
            0.2,
            f"shared torrent recorded as synced on {inst.name}",
        )
    # Stored once: one copy on disk, and every piece crossed the wire once (pieces a source
    # resent after a timeout are the only allowed extra).
    assert sorted(p.name for p in rig.dst_data.iterdir() if not p.name.startswith(".")) == [
        "only-b",
        "payload",
        "shared",
    ]
    assert rig.dest is not None
    dest_health = rig.dest_health
    resent = metric(health_a, "qbsync_pieces_resent_total") + metric(
        health_b, "qbsync_pieces_resent_total"
    )
    total = sum(s.num_pieces for s in everything)
    assert metric(dest_health, "qbsync_pieces_received_total") == total + resent
    for health in (health_a, health_b):  # the waiting source never streamed the shared one
        assert metric(health, "qbsync_pieces_failed_total", {"code": "owned-by-other-source"}) == 0
    # The second source was told to wait (or found it finished), never sent a second copy.
    logs = a.log_text() + b.log_text()
    assert "code=owned-by-other-source" in logs or "event=torrent_complete_on_destination" in logs
    # Per-source counts on the destination.
    code, body = http_status(dest_health, "/status")
    assert code == 200
    sources = {s["name"]: s for s in body["sources"]}
    assert set(sources) == {"box-a", "box-b"}
    assert all(s["connected"] and s["connections"] >= 1 for s in sources.values())
    for name in ("box-a", "box-b"):
        assert metric(dest_health, "qbsync_source_connections", {"source": name}) >= 1
        assert metric(dest_health, "qbsync_source_torrents", {"source": name}) == 0  # all done
