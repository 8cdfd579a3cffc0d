"""What a hostile control frame and large ``.torrent`` files cost a real destination.

Run: ``make bench-bounds`` (``.venv/bin/python -m bench.bounds``; ``--budget-mib``,
``--large``, ``--bomb-mib``).

Set-up on 127.0.0.1: one ``qbsync destination`` (no qBittorrent: only decoding and metadata
are measured) and this script as its source, over the real protocol.

1. Idle baseline: ``/livez`` and an ``InitTorrent(probe=True)`` on a second connection, timed
   20 times each.
2. The codec bomb (issue 15, finding 4): a 32 MiB ``InitTorrent`` whose unknown key holds 16
   million empty maps. While the destination decodes it (between its
   ``event=wire_decode_started`` and ``wire_decode_finished`` log lines) this script keeps
   timing ``/livez`` and the probe; before the fix the decode ran on the event loop and
   neither was answered for 12 s (1.2 GiB RSS).
3. ``--large`` InitTorrents with 26 MiB ``.torrent`` files (1.3 million pieces each): how many
   are admitted under ``--max-metadata`` and how many answered ``busy``; peak RSS (VmHWM).

Last line::

    RESULT decode_s=.. livez_idle_ms=.. livez_during_p50_ms=.. livez_during_max_ms=..
      probe_idle_ms=.. probe_during_p50_ms=.. probe_during_max_ms=.. answered_during=..
      livez_ratio=.. rss_base_mib=.. rss_bomb_peak_mib=.. large_ready=.. large_busy=..
      rss_large_peak_mib=.. budget_mib=.. peak_over_budget_mib=..
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request

import trio
from tests.bounds_rig import bomb_body, large_init, peak_rss_bytes, raw_init_bodies
from tests.qbharness import QbsyncProcess
from tests.wireclient import wire_client

from bench.benchlib import MiB, median, print_result, stack
from qbsync.wire import InitTorrent, WireError


def livez_ms(port: int) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=60) as r:
        r.read()
    return (time.perf_counter() - start) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-mib", type=int, default=256, help="--max-metadata")
    ap.add_argument("--large", type=int, default=6, help="26 MiB .torrent inits to send")
    ap.add_argument("--bomb-mib", type=int, default=32)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    with stack(args.keep) as s:
        proc, port, health = s.destination_process(
            s.root / "data",
            "--max-metadata",
            str(args.budget_mib),
            log_name="qbsync-destination.log",
        )
        proc.start()
        proc.wait_for_log("event=destination_ready", timeout=60)
        rss_base = peak_rss_bytes(proc.pid) / MiB
        result = trio.run(measure, proc, port, health, s.token, args)

    result["rss_base_mib"] = f"{rss_base:.0f}"
    result["budget_mib"] = str(args.budget_mib)
    result["peak_over_budget_mib"] = f"{float(result['rss_large_peak_mib']) - args.budget_mib:.0f}"
    print_result(result)
    return 0


async def measure(
    proc: QbsyncProcess, port: int, health: int, token: str, args: argparse.Namespace
) -> dict[str, str]:
    out: dict[str, str] = {}
    probe_msg = InitTorrent(info_hash="c1" * 20, probe=True)
    async with wire_client(port, token) as prober:

        async def probe_ms() -> float:
            start = time.perf_counter()
            await prober.conn.request(probe_msg, timeout=120)
            return (time.perf_counter() - start) * 1000

        idle_livez = [await trio.to_thread.run_sync(livez_ms, health) for _ in range(20)]
        idle_probe = [await probe_ms() for _ in range(20)]

        bomb_hash = "b0" * 20
        body = bomb_body(bomb_hash, args.bomb_mib * MiB - 64)
        during_livez: list[float] = []
        during_probe: list[float] = []
        with raw_init_bodies({bomb_hash: body}):
            async with (
                wire_client(port, token, request_timeout=600) as bomber,
                trio.open_nursery() as nursery,
            ):

                async def send_bomb() -> None:
                    await bomber.conn.request(InitTorrent(info_hash=bomb_hash), timeout=600)

                nursery.start_soon(send_bomb)
                await trio.to_thread.run_sync(proc.wait_for_log, "event=wire_decode_started", 300)
                while "event=wire_decode_finished" not in proc.log_text():
                    # (a sample straddling the end of the decode still counts as "during")
                    during_livez.append(await trio.to_thread.run_sync(livez_ms, health))
                    during_probe.append(await probe_ms())
        decode_s = next(
            float(part.split("=", 1)[1])
            for line in proc.log_text().splitlines()
            if "event=wire_decode_finished" in line
            for part in line.split()
            if part.startswith("seconds=")
        )
        rss_bomb = peak_rss_bytes(proc.pid) / MiB

    ready = busy = 0
    async with wire_client(port, token, request_timeout=600) as client:
        for seed in range(args.large):
            msg = await trio.to_thread.run_sync(large_init, seed)
            try:
                await client.conn.request(msg, timeout=600)
                ready += 1
            except WireError as exc:
                if exc.code.value != "busy":
                    raise
                busy += 1
            del msg
    rss_large = peak_rss_bytes(proc.pid) / MiB
    print(
        f"bomb of {args.bomb_mib} MiB decoded in {decode_s:.2f} s; "
        f"{len(during_livez)} /livez and {len(during_probe)} probes answered meanwhile; "
        f"{args.large} large torrents: {ready} admitted, {busy} busy"
    )
    out.update(
        decode_s=f"{decode_s:.2f}",
        livez_idle_ms=f"{median(idle_livez):.1f}",
        livez_during_p50_ms=f"{median(during_livez):.1f}",
        livez_during_max_ms=f"{max(during_livez, default=float('nan')):.1f}",
        probe_idle_ms=f"{median(idle_probe):.1f}",
        probe_during_p50_ms=f"{median(during_probe):.1f}",
        probe_during_max_ms=f"{max(during_probe, default=float('nan')):.1f}",
        answered_during=str(len(during_livez) + len(during_probe)),
        livez_ratio=f"{median(during_livez) / max(median(idle_livez), 1e-6):.1f}",
        rss_bomb_peak_mib=f"{rss_bomb:.0f}",
        large_ready=str(ready),
        large_busy=str(busy),
        rss_large_peak_mib=f"{rss_large:.0f}",
    )
    return out


if __name__ == "__main__":
    sys.exit(main())
