"""A real destination under abuse: bencode bombs and a flood of half-open health clients
never make a liveness or readiness probe fail, and the bombs are refused ``bad-request``."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from qbsync.torrent import MAX_ITEMS
from qbsync.wire import ErrorCode, FileEntry, InitTorrent, WireError
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
