"""End-to-end: the real source daemon streams a torrent while qBittorrent downloads it.

Three real qbittorrent-nox (seeder, source downloading at 512 KiB/s, destination) and both
real qbsync daemons as processes.
"""

from __future__ import annotations

import time

import pytest

from tests.integration.source_rig import (
    Rig,
    histogram_quantile,
    http_status,
    metric,
    tags_of,
)
from tests.qbharness import wait_until

pytestmark = pytest.mark.integration


def test_streams_while_downloading_then_verified_tagged_identical(rig: Rig) -> None:
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
    rig.wait_synced(60, dest_timeout=60)
    dst = rig.dst_qb.info(ih)
    assert dst is not None and float(dst["progress"]) == 1
    rig.assert_identical()
    # Each piece was sent exactly once, and finalize followed the last ack quickly.
    assert metric(health, "qbsync_pieces_acked_total") == n
    assert metric(health, "qbsync_pieces_resent_total") == 0
    assert metric(health, "qbsync_sync_outcomes_total", {"result": "synced"}) == 1
    code, status = http_status(health, "/readyz")
    assert code == 200, status
    lag_p50 = histogram_quantile(health, "qbsync_piece_lag_seconds", 0.5)
    lag_p95 = histogram_quantile(health, "qbsync_piece_lag_seconds", 0.95)
    print(f"piece lag (first seen complete -> acked): p50<={lag_p50}s p95<={lag_p95}s")
    # The source keeps seeding after a sync.
    src_info = rig.src_qb.info(ih)
    assert src_info is not None and src_info["state"] in ("stalledUP", "uploading")
    log = source.log_text()
    assert "event=torrent_synced" in log and "code=internal" not in log


def _wait_acked(port: int, at_least: int, timeout: float = 60) -> float:
    return wait_until(
        lambda: (v := metric(port, "qbsync_pieces_acked_total")) >= at_least and v,
        timeout,
        0.1,
        f"{at_least} pieces acknowledged",
    )


def test_exclude_tag_mid_sync_aborts_on_destination(rig: Rig) -> None:
    source, health = rig.start_source("--exclude-sync-tag", "no-sync")
    ih = rig.info_hash
    rig.add_to_source()
    _wait_acked(health, 10)
    assert rig.dest_partials(), "the destination should hold partial data mid-sync"
    rig.src_qb.api.torrents_add_tags(tags="no-sync", torrent_hashes=ih)
    source.wait_for_log("event=torrent_excluded", timeout=120)
    wait_until(lambda: "event=torrent_aborted" in source.log_text(), 120, 0.1, "abort sent")
    wait_until(rig.dest_clean, 120, 0.2, "destination cleaned up")
    sent = metric(health, "qbsync_pieces_acked_total")
    # The source keeps downloading, but nothing more is sent and nothing is finalized.
    wait_until(lambda: rig.source_progress() >= 1, 60, 0.5, "download done")
    time.sleep(2.5)
    assert metric(health, "qbsync_pieces_acked_total") == sent
    assert metric(health, "qbsync_exclude_sync_abort_total") == 1
    assert "synced" not in tags_of(rig.src_qb, ih)
    assert rig.dst_qb.info(ih) is None
    assert rig.dest_clean()


def test_removed_on_source_mid_sync_aborts_on_destination(rig: Rig) -> None:
    source, health = rig.start_source()
    ih = rig.info_hash
    rig.add_to_source()
    _wait_acked(health, 10)
    assert rig.dest_partials()
    rig.src_qb.api.torrents_delete(delete_files=True, torrent_hashes=ih)
    source.wait_for_log("event=torrent_removed", timeout=120)
    wait_until(lambda: "event=torrent_aborted" in source.log_text(), 120, 0.1, "abort sent")
    wait_until(rig.dest_clean, 120, 0.2, "destination cleaned up")
    assert rig.dst_qb.info(ih) is None
    code, status = http_status(health, "/status")
    assert code == 200 and status["tracked"] == [], status
    log = source.log_text()
    assert "code=internal" not in log and "Traceback" not in log


def test_kill9_then_restart_resumes_without_resending_acked_pieces(rig: Rig) -> None:
    first, health = rig.start_source()
    ih = rig.info_hash
    n = rig.seeded.num_pieces
    rig.add_to_source()
    acked_before = _wait_acked(health, n // 3)
    first.kill()  # SIGKILL: no clean shutdown, nothing flushed on the source side
    time.sleep(2)  # the source qBittorrent keeps downloading meanwhile

    second, health2 = rig.start_source()
    wait_until(lambda: "synced" in tags_of(rig.src_qb, ih), 90, 0.2, "synced after restart")
    log = second.log_text()
    needed = [
        int(part.split("=", 1)[1])
        for line in log.splitlines()
        if "event=torrent_initialized" in line
        for part in line.split()
        if part.startswith("needed=")
    ]
    assert needed, log
    # The destination still had every piece acknowledged before the kill ...
    assert needed[0] <= n - acked_before, (needed, acked_before, n)
    # ... and the restarted source sent exactly the missing ones, each once.
    assert metric(health2, "qbsync_pieces_acked_total") == needed[0]
    assert metric(health2, "qbsync_pieces_resent_total") == 0
    received = metric(rig.dest_health, "qbsync_pieces_received_total")
    print(
        f"kill -9: pieces={n} acked_before_kill={acked_before:.0f} needed_after_restart="
        f"{needed[0]} received_by_destination={received:.0f} (duplicates {received - n:.0f})"
    )
    assert received <= n + (n - acked_before - needed[0]), (received, n)
    rig.assert_identical()


def test_wrong_token_transfers_nothing_and_says_why(rig: Rig) -> None:
    source, health = rig.start_source(token="not-the-right-token")
    rig.add_to_source(download_limit=None)
    wait_until(lambda: source.log_text().count("code=auth-failed") >= 3, 120, 0.2, "retries logged")
    assert "event=destination_connect_failed" in source.log_text()
    assert metric(rig.dest_health, "qbsync_pieces_received_total") == 0
    assert rig.dest_clean()
    code, body = http_status(health, "/readyz")
    assert code == 503 and "auth-failed" in str(body), body
    assert http_status(health, "/livez")[0] == 200  # alive, just not ready
    assert source.returncode is None  # keeps retrying, no crash loop
    assert "synced" not in tags_of(rig.src_qb, rig.info_hash)


def test_dry_run_changes_nothing_anywhere(rig: Rig) -> None:
    source, health = rig.start_source("--dry-run")
    ih = rig.info_hash
    rig.add_to_source(download_limit=None)
    wait_until(lambda: rig.source_progress() >= 1, 60, 0.2, "downloaded")
    source.wait_for_log("event=dry_run action=sync", timeout=120)
    time.sleep(3)  # a few more cycles
    assert metric(rig.dest_health, "qbsync_pieces_received_total") == 0
    assert metric(health, "qbsync_pieces_sent_total") == 0
    assert rig.dest_clean()
    assert not list(rig.dst_data.rglob("*.bin"))
    assert rig.dst_qb.info(ih) is None
    assert tags_of(rig.src_qb, ih) == set()
    assert not (rig.state_dir / "completed_on_dest.json").exists()
    assert http_status(health, "/readyz")[0] == 200
    # Liveness never depends on qBittorrent; readiness does.
    rig.src_qb.stop()
    wait_until(lambda: http_status(health, "/readyz")[0] == 503, 120, 0.2, "not ready")
    body = http_status(health, "/readyz")[1]
    assert "qbittorrent" in str(body), body
    time.sleep(2)
    assert http_status(health, "/livez")[0] == 200
    assert source.returncode is None


def test_destination_restart_mid_stream_reconnects_and_completes(rig: Rig) -> None:
    source, health = rig.start_source()
    ih = rig.info_hash
    rig.add_to_source()
    _wait_acked(health, 20)
    assert rig.dest is not None
    assert rig.dest.stop() == 0  # graceful: the destination flushes its state
    wait_until(lambda: "event=destination_disconnected" in source.log_text(), 120, 0.1, "noticed")
    time.sleep(1.5)  # the source keeps downloading and queueing meanwhile
    rig.start_destination()  # same port, same --data: it recovers its state
    wait_until(lambda: "synced" in tags_of(rig.src_qb, ih), 90, 0.2, "synced after restart")
    log = source.log_text()
    assert "generation=2" in log  # reconnected, and re-initialized the torrent
    rig.assert_identical()
    assert "code=internal" not in log


def test_starts_before_qbittorrent_and_recovers(rig: Rig) -> None:
    rig.src_qb.stop()
    source, health = rig.start_source(wait_started=False)
    wait_until(lambda: "event=qbittorrent_unreachable" in source.log_text(), 120, 0.2, "waiting")
    assert http_status(health, "/livez")[0] == 200  # alive: qBittorrent is not our liveness
    assert http_status(health, "/readyz")[0] == 503
    rig.src_qb.start()  # same ports as before
    source.wait_for_log("event=started", timeout=60)
    wait_until(lambda: http_status(health, "/readyz")[0] == 200, 120, 0.2, "ready")
    rig.add_to_source(download_limit=None)
    wait_until(lambda: "synced" in tags_of(rig.src_qb, rig.info_hash), 60, 0.2, "synced")
