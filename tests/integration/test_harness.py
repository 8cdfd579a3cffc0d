"""The harness itself works: real qBittorrent instances seed and download from each other on
loopback, piece states move through intermediate values, and processes are cleaned up.

These tests guard every other integration test: if they fail, fix the harness first.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import QbFactory, QbsyncFactory, SeededFactory
from tests.qbharness import (
    MiB,
    free_port,
    make_payload,
    make_torrent,
    read_piece,
    torrent_files,
    wait_until,
)

pytestmark = pytest.mark.integration


def test_throttled_download_from_seeder(
    qb_factory: QbFactory, seeded_torrent: SeededFactory
) -> None:
    seeded = seeded_torrent()
    assert 3 * MiB < seeded.total_size < 8 * MiB
    piece_len, files, hashes = torrent_files(seeded.torrent)
    assert piece_len == seeded.piece_size and len(hashes) == seeded.num_pieces

    leech = qb_factory("leech")
    # ~1 MiB/s over ~6 MiB: slow enough to watch pieces arrive, quick enough for CI.
    seeded.add_to(leech, download_limit=1 * MiB)

    verified: set[int] = set()
    partial_snapshots = 0
    states_seen: set[str] = set()
    deadline = time.monotonic() + 120
    while True:
        states = [int(x) for x in leech.api.torrents_piece_states(torrent_hash=seeded.info_hash)]
        # Empty until the first refresh tick after the add (checkingResumeData).
        assert len(states) in (0, seeded.num_pieces)
        done = [i for i, s in enumerate(states) if s == 2]
        if 0 < len(done) < len(states):
            partial_snapshots += 1
        for i in done:
            if i not in verified:
                # A piece reported as 2 is already readable from disk with the right hash.
                data = read_piece(leech.save_path, files, piece_len, i)
                assert hashlib.sha1(data).digest() == hashes[i], f"piece {i} mismatch"
                verified.add(i)
        info = leech.info(seeded.info_hash)
        assert info is not None
        states_seen.add(info.state)
        if info.progress == 1 and len(verified) == seeded.num_pieces:
            break
        assert time.monotonic() < deadline, f"download stuck: {len(verified)}/{len(states)}"
        time.sleep(0.1)

    assert partial_snapshots >= 2, "never saw a partially downloaded torrent; throttle not applied?"
    assert states_seen & {"downloading", "stalledDL"}, states_seen
    for rel in seeded.files:
        got = (leech.save_path / seeded.name / rel).read_bytes()
        assert got == seeded.expected_bytes(rel), rel
    leech.wait_seeding(seeded.info_hash)
    # Stopping is clean and by PID.
    assert leech.stop() == 0
    assert leech.proc is not None and leech.proc.returncode == 0


def test_temp_path_and_incomplete_extension(
    tmp_path: Path, qb_factory: QbFactory, seeded_torrent: SeededFactory
) -> None:
    seeded = seeded_torrent({"x.bin": 2 * MiB, "y/z.bin": 1 * MiB + 5}, seed=7)
    temp = tmp_path / "incomplete"
    leech = qb_factory("leech", temp_path=temp, incomplete_ext=True)
    seeded.add_to(leech, download_limit=1 * MiB)

    # While downloading, the files are in the temp path with the .!qB suffix ...
    wait_until(
        lambda: (temp / seeded.name / "x.bin.!qB").exists(), 30, 0.05, "partial file in temp path"
    )
    info = leech.info(seeded.info_hash)
    assert info is not None and info.progress < 1
    assert Path(info.download_path) == temp
    # ... and torrents_files names carry no suffix.
    names = sorted(f.name for f in leech.api.torrents_files(torrent_hash=seeded.info_hash))
    assert names == [f"{seeded.name}/x.bin", f"{seeded.name}/y/z.bin"]

    # On completion they are moved and renamed into the save path.
    leech.wait_seeding(seeded.info_hash, timeout=60)
    wait_until(lambda: (leech.save_path / seeded.name / "x.bin").exists(), 10, 0.05, "file moved")
    assert (leech.save_path / seeded.name / "y" / "z.bin").read_bytes() == seeded.expected_bytes(
        "y/z.bin"
    )
    assert not (temp / seeded.name / "x.bin.!qB").exists()


def test_password_restart_and_isolation(tmp_path: Path, qb_factory: QbFactory) -> None:
    inst = qb_factory("locked", password="s3cret pass")
    # Without credentials the WebUI refuses even on 127.0.0.1 ...
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{inst.url}/api/v2/app/version", timeout=5)
    assert refused.value.code == 403
    # ... with them (the fixture's client logs in) it answers.
    assert inst.api.app_version().startswith("v")
    assert inst.qbsync_args() == [
        "--qb-url", inst.url, "--qb-username", "admin", "--qb-password", "s3cret pass"
    ]  # fmt: skip
    prefs = inst.api.app_preferences()
    assert prefs["dht"] is False and prefs["lsd"] is False and prefs["upnp"] is False
    assert prefs["current_network_interface"] == "lo"
    assert prefs["listen_port"] == inst.bt_port and prefs["web_ui_port"] == inst.webui_port

    payload = tmp_path / "one.bin"
    payload.write_bytes(os.urandom(300_000))
    torrent, info_hash = make_torrent(payload, 64 * 1024)
    inst.api.torrents_add(
        torrent_files={"t.torrent": torrent}, save_path=str(payload.parent), tags=["keep"]
    )
    inst.wait_seeding(info_hash)
    old_pid = inst.pid
    inst.restart()
    assert inst.pid != old_pid and old_pid is not None
    # The restart kept the torrent and its tag, on the same ports.
    info = inst.wait_seeding(info_hash)
    assert info.tags == "keep"
    assert inst.api.app_preferences()["web_ui_port"] == inst.webui_port


def test_free_port_and_wait_until() -> None:
    ports = {free_port() for _ in range(5)}
    assert all(1024 <= p < 65536 for p in ports)
    assert wait_until(lambda: 42, 1) == 42
    with pytest.raises(TimeoutError, match="never"):
        wait_until(lambda: 0, 0.2, 0.05, "never")
    with pytest.raises(ZeroDivisionError):
        wait_until(lambda: 1 // 0, 1)
    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise IndexError
        return len(calls)

    assert wait_until(flaky, 2, 0.01, ignore=(IndexError,)) == 3


def test_payload_is_deterministic(tmp_path: Path) -> None:
    a = make_payload(tmp_path / "a" / "p", {"f": 1000, "d/g": 10}, seed=1)
    b = make_payload(tmp_path / "b" / "p", {"f": 1000, "d/g": 10}, seed=1)
    c = make_payload(tmp_path / "c" / "p", {"f": 1000, "d/g": 10}, seed=2)
    assert (a / "f").read_bytes() == (b / "f").read_bytes() != (c / "f").read_bytes()
    assert (a / "d" / "g").stat().st_size == 10
    ta, ha = make_torrent(a, 16 * 1024)
    _, hb = make_torrent(b, 16 * 1024)
    assert ha == hb and len(ha) == 40
    assert b"announce" not in ta and b"private" not in ta


def test_qbsync_process_output_and_exit(qbsync_factory: QbsyncFactory, tmp_path: Path) -> None:
    # A configuration error exits 2 with one line naming the flag and the environment variable.
    proc = qbsync_factory(
        "source",
        ["--data", str(tmp_path), "--qb-url", "http://127.0.0.1:1", "--sleep", "0"],
        env={"QBSYNC_SOURCE_DESTINATION_ADDR": "127.0.0.1:9"},
    )
    text = proc.wait_for_log("--sleep / QBSYNC_SOURCE_SLEEP", timeout=30)
    assert proc.wait(30) == 2
    assert "must be greater than 0" in text
    # wait_for_log fails fast (not after the timeout) when the process is gone.
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="exited with 2"):
        proc.wait_for_log("never printed", timeout=60)
    assert time.monotonic() - t0 < 30
    # The environment of the test runner does not leak QBSYNC_* variables into the child.
    printed = qbsync_factory(
        "destination", ["--data", str(tmp_path), "--print-config"], env={"HTTP_PORT": "9999"}
    )
    assert printed.wait(30) == 0
    assert '"health_addr": ":9999"' in printed.log_text()


def test_a_download_that_lost_its_first_peer_connection_still_completes(
    qb_factory: QbFactory, seeded_torrent: SeededFactory
) -> None:
    """The harness's PeerNudger points a stalled download at the seeder again (and the seeder
    at it). Here the one ``torrents_add_peers`` call that ``add_to`` makes is left out, as if
    it had failed: with no tracker or DHT on loopback only the nudger can start the download."""
    seeded = seeded_torrent({"a.bin": 1 * MiB})
    leech = qb_factory("leech")
    seeded.add_to(leech, connect=False)
    assert seeded.nudger is not None
    seeded.nudger.watch(leech, seeded)
    wait_until(
        lambda: (leech.info(seeded.info_hash) or {}).get("progress") == 1,
        120,
        what="the nudged download completes",
    )
