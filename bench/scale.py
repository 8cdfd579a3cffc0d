"""Cost of many torrents: an idle source watching 2,000 synced torrents, and a destination
starting with 2,000 finalized torrents.

Run: ``make bench-scale`` (``.venv/bin/python -m bench.scale``; ``--count``, ``--measure-s``).

**Idle source.** ``--count`` small single-file torrents (16 KiB) are added to a source
qbittorrent-nox as complete, and recorded in the source's completion cache
(``<state-dir>/completed_on_dest.json``, with their real selection fingerprint) exactly as the
source writes it after syncing them: the state of a source whose library is all synced. The
source daemon is started, left ``--settle-s`` seconds, then measured for ``--measure-s``
seconds: qBittorrent requests per second (``qbsync_qb_api_calls_total`` on its /metrics) and
CPU (user+system from ``/proc/<pid>/stat``, as a share of one core). Baseline in the same run:
the same source daemon against the same qBittorrent with no torrents, measured the same way.

**Destination start-up.** ``--count`` finalized torrents are laid out in a destination's data
directory as the destination leaves them: each torrent's file on disk and its
``.qbsync/<hash>/.finalized`` marker (written with the project's own marker type). Start-up
is the time from launching ``qbsync destination`` to its ``event=destination_ready`` log line;
baseline: the same with an empty data directory. Last line::

    RESULT idle_qb_requests_per_s=.. idle_cpu_pct=.. idle_baseline_qb_requests_per_s=..
           idle_baseline_cpu_pct=.. dest_startup_s=.. dest_startup_baseline_s=..
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tests.qbharness import QBInstance, make_torrent

from bench.benchlib import Stack, cpu_seconds, metric, print_result, stack
from qbsync.destination.state import FINALIZED_NAME, FinalizedFile, FinalizedMarker, dump_json

SIZE = 16 * 1024


def make_library(root: Path, count: int) -> list[tuple[str, bytes, str]]:
    """``count`` single-file payloads under ``root``: (name, .torrent, info-hash)."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        name = f"t{i:05d}.bin"
        path = root / name
        path.write_bytes(i.to_bytes(4, "big") * (SIZE // 4))
        torrent, ih = make_torrent(path, 16 * 1024)
        out.append((name, torrent, ih))
    return out


def idle_source(
    s: Stack, src: QBInstance, dport: int, state: Path, settle: float, span: float
) -> tuple[float, float]:
    """Start a source on ``state``; after ``settle`` s, measure ``span`` s; stop it."""
    proc, health = s.source(src, dport, state_dir=state)
    time.sleep(settle)
    calls0, cpu0, t0 = metric(health, "qb_api_calls_total"), cpu_seconds(proc.pid), time.time()
    time.sleep(span)
    calls1, cpu1, t1 = metric(health, "qb_api_calls_total"), cpu_seconds(proc.pid), time.time()
    proc.stop()
    return (calls1 - calls0) / (t1 - t0), 100 * (cpu1 - cpu0) / (t1 - t0)


def dest_startup(s: Stack, data: Path) -> float:
    proc, _, _ = s.destination_process(
        data, log_name=f"qbsync-destination-startup-{len(s.procs)}.log"
    )
    t0 = time.monotonic()
    proc.start()
    try:
        proc.wait_for_log("event=destination_ready", timeout=300)
        return time.monotonic() - t0
    finally:
        proc.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--settle-s", type=float, default=10.0)
    ap.add_argument("--measure-s", type=float, default=20.0)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    with stack(keep=args.keep) as s:
        src = s.qb("source", refresh_ms=1500)  # qBittorrent's default refresh interval
        dst = s.qb("destination")
        _, dport, _ = s.destination(dst)

        base_rate, base_cpu = idle_source(
            s, src, dport, s.root / "state-empty", args.settle_s, args.measure_s
        )
        print(f"idle source, no torrents: {base_rate:.2f} qB requests/s, CPU {base_cpu:.1f} %")

        t0 = time.monotonic()
        library = make_library(src.save_path, args.count)
        for _name, torrent, ih in library:
            src.api.torrents_add(
                torrent_files={f"{ih}.torrent": torrent},
                save_path=str(src.save_path),
                is_skip_checking=True,
            )
        listed = 0
        while listed < args.count:
            listed = len(src.api.torrents_info())
            time.sleep(0.5)
        print(f"{args.count} torrents added to the source in {time.monotonic() - t0:.0f} s")
        state = s.root / "state-synced"
        state.mkdir()
        (state / "completed_on_dest.json").write_text(json.dumps({ih: "0" for *_, ih in library}))
        rate, cpu = idle_source(s, src, dport, state, args.settle_s, args.measure_s)
        print(f"idle source, {args.count} synced: {rate:.2f} qB requests/s, CPU {cpu:.1f} %")

        empty = s.root / "dest-empty"
        empty.mkdir()
        base_start = dest_startup(s, empty)
        data = s.root / "dest-finalized"
        data.mkdir()
        for name, _, ih in library:
            path = data / name
            path.write_bytes(b"\0" * SIZE)
            st = os.stat(path)
            marker = FinalizedMarker(
                info_hash=ih,
                finalized_at=time.time(),
                files=(FinalizedFile(name, SIZE, st.st_dev, st.st_ino),),
            )
            mdir = data / ".qbsync" / ih
            mdir.mkdir(parents=True)
            (mdir / FINALIZED_NAME).write_bytes(dump_json(marker))
        start = dest_startup(s, data)
        print(
            f"destination start-up: {start:.2f} s with {args.count} finalized torrents, "
            f"{base_start:.2f} s empty"
        )
    result = {
        "count": args.count,
        "idle_qb_requests_per_s": f"{rate:.2f}",
        "idle_cpu_pct": f"{cpu:.1f}",
        "idle_baseline_qb_requests_per_s": f"{base_rate:.2f}",
        "idle_baseline_cpu_pct": f"{base_cpu:.1f}",
        "dest_startup_s": f"{start:.2f}",
        "dest_startup_baseline_s": f"{base_start:.2f}",
    }
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
