"""Hard links: a file shared by two torrents is sent once and stored once, even when both
torrents are complete on the source before the daemons start (the first run against an
existing library), where both would otherwise start syncing together."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import trio

from tests.integration.source_rig import metric, tags_of
from tests.qbharness import MiB, QBInstance, free_port, make_payload, make_torrent, wait_until
from tests.wireclient import start_destination

pytestmark = pytest.mark.integration


async def test_shared_file_of_two_torrents_complete_at_start_is_sent_and_stored_once(
    tmp_path: Path, qb_factory, qbsync_factory
) -> None:
    src = qb_factory("source")
    dst = qb_factory("destination")
    shared_size = 3 * MiB + 1234
    a_dir = make_payload(src.save_path / "A", {"shared.bin": shared_size, "a.bin": 500_000}, 1)
    b_dir = make_payload(src.save_path / "B", {"b.bin": 700_000}, 2)
    os.link(a_dir / "shared.bin", b_dir / "shared.bin")  # the source library's hard link
    torrents = [make_torrent(d, 256 * 1024) for d in (a_dir, b_dir)]
    for raw, ih in torrents:
        src.api.torrents_add(
            torrent_files={f"{ih}.torrent": raw},
            save_path=str(src.save_path),
            is_skip_checking=True,
        )
        await trio.to_thread.run_sync(wait_until, functools.partial(src.info, ih), 10, 0.05)

    dest = start_destination(qbsync_factory, dst.save_path, qb_args=dst.qbsync_args())
    health = free_port()
    source = qbsync_factory(
        "source",
        [
            "--data",
            str(src.save_path),
            *src.qbsync_args(),
            "--destination-addr",
            f"127.0.0.1:{dest.port}",
            "--state-dir",
            str(tmp_path / "source-state"),
            "--health-addr",
            f"127.0.0.1:{health}",
            "--auth-token",
            dest.token,
            "--sleep",
            "1",
        ],
    )
    source.wait_for_log("event=started", timeout=120)
    for _, ih in torrents:
        await trio.to_thread.run_sync(wait_until, functools.partial(_synced, dst, ih), 120, 0.2)

    a_copy, b_copy = dst.save_path / "A" / "shared.bin", dst.save_path / "B" / "shared.bin"
    assert a_copy.read_bytes() == (a_dir / "shared.bin").read_bytes()
    assert os.stat(a_copy).st_ino == os.stat(b_copy).st_ino  # stored once
    assert (dst.save_path / "B" / "b.bin").read_bytes() == (b_dir / "b.bin").read_bytes()
    assert metric(dest.health_port, "qbsync_hardlinks_created_total") == 1
    # Sent once: the source sent the shared file's bytes for one torrent only.
    sent = metric(health, "qbsync_bytes_sent_total")
    total = shared_size + 500_000 + 700_000
    assert sent < total + 2 * 256 * 1024  # (B's boundary pieces aside)
    assert "event=hardlink_group_wait" in source.log_text()
    for _, ih in torrents:
        info = dst.info(ih)
        assert info is not None and info.progress == 1


def _synced(inst: QBInstance, info_hash: str) -> bool:
    return "synced" in tags_of(inst, info_hash)
