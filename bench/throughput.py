"""qbsync against "rsync, then add the torrent and let qBittorrent check it", end to end.

Run: ``make bench-throughput`` (``.venv/bin/python -m bench.throughput``; ``--size-mib 1024``
for the 1 GiB case of the README table; ``--rounds``; ``--keep`` keeps the work directory).

Set-up, all on 127.0.0.1 under one temporary directory: a *source* qbittorrent-nox, a
*destination* one, a third (*check*) for the rsync workflow, an ``rsync --daemon`` exporting the
source's save path, and both qbsync daemons (default settings) already running.

Each round makes a new payload (3 files, ``--piece-mib`` pieces, a new info-hash) in the source's
save path, then, on the same bytes:

* **rsync**: ``rsync -a --whole-file rsync://.../payload-N/`` into the check instance's save path
  (time to exit); then the torrent is added to the check instance, which hash-checks it, until
  it is complete (**rsync then check**). ``rsync --fsync`` into a scratch directory is timed too.
* **qbsync**: the torrent is added to the source qBittorrent as complete (skip-checking: the
  data is there), which is the moment it "completes on the source". Measured from that moment:
  the first and last piece written on the destination (``bytes_received_total`` on the
  destination's /metrics, polled every 20 ms) and ``synced`` in the destination qBittorrent
  (polled every 20 ms).

Medians over the rounds. Both workflows read the payload from the page cache (it was just
written). Peak RSS is each qbsync process's ``VmHWM`` at the end. The machine is shared, so only
ratios measured in the same run mean anything. Last line::

    RESULT start_s=.. stream_mb_s=.. rsync_mb_s=.. ratio_stream_vs_rsync=..
           synced_s=.. last_byte_to_synced_s=.. rsync_then_check_s=..
           ratio_synced_vs_rsync_then_check=.. dest_peak_rss_mb=.. source_peak_rss_mb=..
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.qbharness import SEEDING_STATES

from bench.benchlib import (
    MiB,
    add_complete,
    delivery_window,
    median,
    metric,
    new_torrent,
    peak_rss_mb,
    poll,
    split_files,
    stack,
    tags,
)

POLL = 0.02


def rsync(port: int, module_path: str, dest: Path, *extra: str) -> float:
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    subprocess.run(
        [
            "rsync",
            "-a",
            "--whole-file",
            *extra,
            f"rsync://127.0.0.1:{port}/{module_path}/",
            f"{dest}/",
        ],
        check=True,
    )
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256, help="payload size (default 256)")
    ap.add_argument("--piece-mib", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--profile",
        type=Path,
        help="record both daemons with py-spy (collapsed stacks) into this directory",
    )
    ap.add_argument("--source-arg", action="append", default=[], help="extra qbsync source flag")
    ap.add_argument("--dest-arg", action="append", default=[], help="extra destination flag")
    args = ap.parse_args()
    total = args.size_mib * MiB
    files = split_files(total)
    rows: list[dict[str, float]] = []
    with stack(keep=args.keep) as s:
        src = s.qb("source")
        dst = s.qb("destination")
        check = s.qb("check")
        scratch = s.root / "rsync-fsync"
        rport = s.rsync_daemon({"src": src.save_path})
        dproc, dport, dhealth = s.destination(dst, *args.dest_arg)
        sproc, _ = s.source(src, dport, *args.source_arg)
        if args.profile:
            for role, proc in (("source", sproc), ("destination", dproc)):
                s.profile(proc.pid, args.profile / f"{role}.txt")
        print(
            f"payload {args.size_mib} MiB in {len(files)} files, {args.piece_mib} MiB pieces, "
            f"{args.rounds} rounds; work dir {s.root}",
            flush=True,
        )
        for r in range(args.rounds):
            name = f"payload-{r}"
            torrent, ih = new_torrent(src.save_path / name, files, args.piece_mib * MiB, seed=r)
            row: dict[str, float] = {}
            # rsync, then add to qBittorrent and wait for its check.
            t0 = time.monotonic()
            row["rsync_s"] = rsync(rport, f"src/{name}", check.save_path / name)
            check.api.torrents_add(
                torrent_files={f"{ih}.torrent": torrent},
                save_path=str(check.save_path),
                content_layout="Original",
            )

            def checked(ih: str = ih) -> bool:
                info = check.info(ih)
                return bool(info and info.progress == 1 and info.state in SEEDING_STATES)

            poll(checked, 600, POLL, "check instance complete")
            row["rsync_then_check_s"] = time.monotonic() - t0
            row["rsync_fsync_s"] = rsync(rport, f"src/{name}", scratch / name, "--fsync")
            shutil.rmtree(scratch / name)
            # qbsync: complete on the source while both daemons run.
            base = metric(dhealth, "bytes_received_total")
            t0 = time.monotonic()
            add_complete(src, torrent, ih, src.save_path)
            first, last = delivery_window(dhealth, base, total, t0, 600, POLL)
            poll(lambda ih=ih: "synced" in tags(dst, ih), 600, POLL, "synced on the destination")
            row["synced_s"] = time.monotonic() - t0
            row["first_s"], row["last_s"] = first, last
            row["stream_s"] = max(last - first, 1e-3)
            rows.append(row)
            print(
                f"round {r + 1}: rsync {row['rsync_s']:.2f}s (fsync {row['rsync_fsync_s']:.2f}s), "
                f"rsync+check {row['rsync_then_check_s']:.2f}s | qbsync first piece "
                f"{first:.2f}s, last {last:.2f}s, synced {row['synced_s']:.2f}s",
                flush=True,
            )
        dest_rss = peak_rss_mb(dproc.pid)
        src_rss = peak_rss_mb(sproc.pid)

    def med(key: str) -> float:
        return median([r[key] for r in rows])

    mb = total / 1e6
    rsync_rate = mb / med("rsync_s")
    stream_rate = median([mb / r["stream_s"] for r in rows])
    synced_after = median([r["synced_s"] - r["last_s"] for r in rows])
    table: list[tuple[str, str, str]] = [
        ("rsync daemon, whole file", f"{med('rsync_s'):.2f} s", f"{rsync_rate:,.0f} MB/s"),
        (
            "rsync daemon, `--fsync`",
            f"{med('rsync_fsync_s'):.2f} s",
            f"{mb / med('rsync_fsync_s'):,.0f} MB/s",
        ),
        (
            "rsync, then add to qBittorrent and wait for its check",
            f"{med('rsync_then_check_s'):.2f} s",
            "",
        ),
        ("qbsync, to the first piece on the destination", f"{med('first_s'):.2f} s", ""),
        (
            "qbsync, first piece to last piece",
            f"{med('stream_s'):.2f} s",
            f"{stream_rate:,.0f} MB/s ({stream_rate / rsync_rate:.2f}x rsync)",
        ),
        (
            "qbsync, to synced in the destination qBittorrent",
            f"{med('synced_s'):.2f} s",
            f"({med('rsync_then_check_s') / med('synced_s'):.2f}x the rsync workflow)",
        ),
    ]
    print('\n| from "complete on the source" | time | rate |\n|---|---|---|')
    for label, t, rate in table:
        print(f"| {label} | {t} | {rate} |")
    print(f"\npeak RSS: destination {dest_rss:.0f} MB, source {src_rss:.0f} MB")
    result: dict[str, Any] = {
        "size_mib": args.size_mib,
        "start_s": f"{med('first_s'):.2f}",
        "stream_mb_s": f"{stream_rate:.0f}",
        "rsync_mb_s": f"{rsync_rate:.0f}",
        "ratio_stream_vs_rsync": f"{stream_rate / rsync_rate:.2f}",
        "synced_s": f"{med('synced_s'):.2f}",
        "last_byte_to_synced_s": f"{synced_after:.2f}",
        "rsync_then_check_s": f"{med('rsync_then_check_s'):.2f}",
        "ratio_synced_vs_rsync_then_check": f"{med('rsync_then_check_s') / med('synced_s'):.2f}",
        "dest_peak_rss_mb": f"{dest_rss:.0f}",
        "source_peak_rss_mb": f"{src_rss:.0f}",
    }
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
