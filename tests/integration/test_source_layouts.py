"""Partial selections, a selection change mid-sync, and qBittorrent's temp-path layout.

Real qbittorrent-nox instances and real qbsync daemons, as in ``test_source_e2e``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.source_rig import (
    FILES,
    Rig,
    RigFactory,
    metric,
    tags_of,
)
from tests.qbharness import wait_until

pytestmark = pytest.mark.integration

B_INDEX = 1  # files in torrent order: payload/a.bin, payload/b.bin, payload/sub/c.bin


def _set_priority(rig: Rig, index: int, priority: int) -> None:
    """Set a file priority and make sure qBittorrent applied it (it can drop it on a torrent
    that was just added)."""
    api, ih = rig.src_qb.api, rig.info_hash

    def applied() -> bool:
        files = api.torrents_files(torrent_hash=ih)
        if files and int(str(files[index]["priority"])) == priority:
            return True
        api.torrents_file_priority(torrent_hash=ih, file_ids=index, priority=priority)
        return False

    wait_until(applied, 120, 0.2, f"file {index} priority {priority}")


def test_partial_selection_syncs_only_selected_files(rig: Rig) -> None:
    _, health = rig.start_source()
    rig.add_to_source(paused=True, download_limit=None)  # what is sent, not when
    _set_priority(rig, B_INDEX, 0)
    rig.src_qb.api.torrents_resume(torrent_hashes=rig.info_hash)
    rig.wait_synced()
    assert rig.dest_file("a.bin").read_bytes() == rig.seeded.expected_bytes("a.bin")
    assert rig.dest_file("sub/c.bin").read_bytes() == rig.seeded.expected_bytes("sub/c.bin")
    assert not rig.dest_file("b.bin").exists()
    assert not list(rig.dst_data.rglob("*.partial"))
    assert metric(health, "qbsync_sync_outcomes_total", {"selection": "partial"}) == 1
    # Pieces that lie only inside b.bin were never sent.
    b_start = FILES["a.bin"]
    b_end = b_start + FILES["b.bin"]
    piece = rig.seeded.piece_size
    only_b = sum(
        1 for i in range(rig.seeded.num_pieces) if i * piece >= b_start and (i + 1) * piece <= b_end
    )
    assert only_b > 0
    assert metric(health, "qbsync_pieces_acked_total") == rig.seeded.num_pieces - only_b


def test_selection_change_mid_sync_resyncs_and_ends_complete(rig: Rig) -> None:
    source, health = rig.start_source()
    rig.add_to_source(paused=True)
    _set_priority(rig, B_INDEX, 0)
    rig.src_qb.api.torrents_resume(torrent_hashes=rig.info_hash)
    wait_until(lambda: metric(health, "qbsync_pieces_acked_total") >= 10, 60, 0.1, "streaming")
    assert "synced" not in tags_of(rig.src_qb, rig.info_hash)
    _set_priority(rig, B_INDEX, 1)  # the user selects b.bin while the sync runs
    source.wait_for_log("event=selection_changed", timeout=120)
    rig.wait_synced()
    rig.assert_identical()
    assert metric(health, "qbsync_file_selection_resyncs_total") == 1
    assert "resync=true" in source.log_text()


def test_temp_path_incomplete_extension_and_move_on_completion(
    tmp_path: Path, rig_factory: RigFactory
) -> None:
    src_root = tmp_path / "src-downloads"
    rig = rig_factory(
        src_kwargs={
            "save_path": src_root,
            "temp_path": src_root / "incomplete",
            "incomplete_ext": True,
        },
    )
    # --rate-limit below the download rate: part of the torrent is read after qBittorrent
    # moved it from the temp path, so the reader must notice and follow the move.
    source, health = rig.start_source("--rate-limit", str(320 * 1024))
    rig.add_to_source()
    # While downloading, the files are <save>/incomplete/payload/*.bin.!qB.
    wait_until(lambda: list((src_root / "incomplete").rglob("*.!qB")), 30, 0.1, "incomplete files")
    # qBittorrent moves the files to the save path on completion; streaming is still going.
    wait_until(lambda: (src_root / "payload" / "a.bin").exists(), 60, 0.1, "moved")
    assert metric(health, "qbsync_pieces_acked_total") < rig.seeded.num_pieces
    rig.wait_synced()
    assert not list(src_root.rglob("*.!qB"))
    rig.assert_identical()
    assert metric(health, "qbsync_pieces_resent_total") == 0
    assert "code=internal" not in source.log_text()
