"""A real destination under abuse: bencode bombs and a flood of half-open health clients
never make a liveness or readiness probe fail, and the bombs are refused ``bad-request``."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from qbsync.torrent import MAX_ITEMS
from qbsync.wire import ErrorCode, FileEntry, InitTorrent, SyncStatus, WireError
from tests.bounds_rig import (
    MiB,
    bomb_body,
    large_init,
    peak_rss_bytes,
    raw_init_bodies,
    release_file_env,
)
from tests.wireclient import start_destination

pytestmark = pytest.mark.integration


def _bomb() -> bytes:
    return b"d4:infod5:filesl" + b"de" * (MAX_ITEMS + 1) + b"e4:name1:x12:piece lengthi16384eee"


async def _probe_until(dest: object, stop: trio.Event, seen: list[int]) -> None:
    while not stop.is_set():
        for path in ("/livez", "/readyz"):
            status, _ = await trio.to_thread.run_sync(dest.http, path)  # type: ignore[attr-defined]
            seen.append(status)
        await trio.sleep(0.05)


async def test_bencode_bombs_are_refused_and_probes_stay_ok(tmp_path: Path, qbsync_factory) -> None:
    dest = start_destination(qbsync_factory, tmp_path / "data")
    bomb = _bomb()
    seen: list[int] = []
    stop = trio.Event()
    codes: list[ErrorCode] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_probe_until, dest, stop, seen)
        async with dest.client() as client:
            for i in range(4):
                msg = InitTorrent(
                    info_hash=f"{i:02x}" * 20,
                    name="x",
                    torrent_file=bomb,
                    files=(FileEntry("x/a", 1),),
                )
                with pytest.raises(WireError) as err:
                    await client.conn.request(msg, timeout=60)
                codes.append(err.value.code)
        stop.set()
    assert codes == [ErrorCode.BAD_REQUEST] * 4
    assert seen and set(seen) == {200}, seen
    assert "bencoded values" in dest.proc.log_text()


async def test_half_open_health_flood_never_fails_a_probe(tmp_path: Path, qbsync_factory) -> None:
    """300 clients that send half a request and stall on the health port (the shipped probes
    restart the pod after a few failures; before the fix 64 such clients made every probe
    answer 503 for 10 s)."""
    dest = start_destination(qbsync_factory, tmp_path / "data")
    flood: list[socket.socket] = []
    seen: list[int] = []
    try:
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", dest.health_port), timeout=5)
            s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
            flood.append(s)
            if i % 25 == 24:
                for path in ("/livez", "/readyz"):
                    seen.append(dest.http(path)[0])
    finally:
        for s in flood:
            s.close()
    assert seen == [200] * 24


# --- issue 15, finding 4: the codec bomb and large .torrent files ---------------------------


async def test_codec_bomb_decodes_off_the_loop_and_probes_are_answered_meanwhile(
    tmp_path: Path, qbsync_factory
) -> None:
    """A 32 MiB InitTorrent of nested empty maps under an unknown key. The destination is told
    to hold every worker-thread decode until a file exists, so the ordering is observed, not
    timed: /livez, /readyz and an InitTorrent probe on another connection are all answered
    while the bomb's decode has started and not finished. Before the fix the decode ran on the
    event loop (/healthz silent for 12 s, 1.2 GiB)."""
    release = tmp_path / "release-decode"
    budget_mib = 64
    dest = start_destination(
        qbsync_factory,
        tmp_path / "data",
        extra=["--max-metadata", str(budget_mib)],
        env=release_file_env(release),
    )
    bomb_hash = "b0" * 20
    results: list[object] = []
    with raw_init_bodies({bomb_hash: bomb_body(bomb_hash)}):
        async with dest.client() as bomber, trio.open_nursery() as nursery:

            async def send_bomb() -> None:
                bomb = InitTorrent(info_hash=bomb_hash)  # sent as the raw bomb body
                answer = await bomber.conn.request(bomb, timeout=300)
                results.append(answer)

            nursery.start_soon(send_bomb)
            await trio.to_thread.run_sync(dest.proc.wait_for_log, "event=wire_decode_started", 120)
            # the decode is running (or held): everything else must still be answered
            assert dest.http("/livez")[0] == 200
            assert dest.http("/readyz")[0] == 200
            async with dest.client() as prober:
                probe = await prober.conn.request(
                    InitTorrent(info_hash="c1" * 20, probe=True), timeout=60
                )
            assert probe.status == SyncStatus.READY
            assert "event=wire_decode_finished" not in dest.proc.log_text()
            release.touch()
            await trio.to_thread.run_sync(dest.proc.wait_for_log, "event=wire_decode_finished", 300)
    # the bomb decoded to a plain probe of its info-hash: the unknown key was skipped
    assert [getattr(r, "status", r) for r in results] == [SyncStatus.READY]
    assert peak_rss_bytes(dest.proc.pid) < (budget_mib + 100) * MiB


async def test_large_torrents_are_charged_to_the_metadata_budget(
    tmp_path: Path, qbsync_factory
) -> None:
    """Four tracked torrents with 26 MiB .torrent files held 600 MiB (piece hashes as 1.4
    million objects each) under a cap of 4,096 torrents. Now each costs about twice its size
    (raw .torrent + one hash buffer), and what does not fit the budget is answered busy."""
    budget_mib = 128
    dest = start_destination(
        qbsync_factory, tmp_path / "data", extra=["--max-metadata", str(budget_mib)]
    )
    outcomes: list[str] = []
    async with dest.client() as client:
        for seed in range(4):
            msg = await trio.to_thread.run_sync(large_init, seed)
            try:
                result = await client.conn.request(msg, timeout=300)
                outcomes.append(result.status.value)
            except WireError as exc:
                outcomes.append(exc.code.value)
    # 2 x ~50 MiB fit in 128 MiB, the third and fourth do not
    assert outcomes == ["ready", "ready", "busy", "busy"], outcomes
    assert "--max-metadata" in dest.proc.log_text()
    assert peak_rss_bytes(dest.proc.pid) < (budget_mib + 100) * MiB
