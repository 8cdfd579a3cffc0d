"""qbsync against "rsync, then add the torrent and let qBittorrent check it", end to end.

Run: ``make bench-throughput`` (``.venv/bin/python -m bench.throughput``; ``--size-mib 1024``
for the 1 GiB case of the README table; ``--size-gib 10`` for the opt-in steady-state run;
``--rounds`` (default 5); ``--cold``; ``--profile DIR`` records both daemons with py-spy;
``--keep`` keeps the work directory). 256 MiB x 5 rounds takes about a minute, 1 GiB x 5
about three on a quiet 2-core machine.

Set-up, all on 127.0.0.1 under one temporary directory: a *source* qbittorrent-nox, a
*destination* one, a third (*check*) for the rsync workflow, an ``rsync --daemon`` exporting the
source's save path, and both qbsync daemons (default settings) already running.

The payload (3 files, ``--piece-mib`` pieces) is written once, not sparse, in the source's save
path; each round renames its directory (a new torrent name, so a new info-hash on the same
bytes) and removes the previous round's copies, so disk use stays near 4x the payload whatever
the number of rounds. Then, on the same bytes:

* **rsync**: ``rsync -a --whole-file rsync://.../payload-N/`` into the check instance's save path
  (time to exit); then the torrent is added to the check instance, which hash-checks it, until
  it is complete (**rsync then check**). ``rsync --fsync`` into a scratch directory is timed too.
* **qbsync**: the torrent is added to the source qBittorrent as complete (skip-checking: the
  data is there), which is the moment it "completes on the source". Measured from that moment:
  the first and last piece written on the destination (``bytes_received_total`` on the
  destination's /metrics, polled every 20 ms) and ``synced`` in the destination qBittorrent
  (polled every 20 ms).

Medians over the rounds with (min-max); a ratio is computed per round (both sides measured
back to back) and then summarised. Before each timed step (rsync, the check, qbsync) the
dirty pages the previous step left are written back (``sync``, untimed): otherwise each
transfer's writes are throttled by the kernel writing back the one before (py-spy showed the
destination's ``pwrite`` waiting on exactly that). By default both workflows read the payload
from the page cache. ``--cold`` drops it (``sync; echo 3 > /proc/sys/vm/drop_caches``, root
only: without the permission the run says so and ends with ``RESULT skipped=...``) before the
rsync copy, before qBittorrent's check, and before the qbsync transfer, as on a home server
whose cache does not hold the torrent; the drop itself is not timed. CPU seconds per GiB:
each qbsync daemon's (``/proc/<pid>/stat``, from adding the torrent to ``synced``), the rsync
daemon's (its forked sender included) and the rsync client's (the receiver), and the check
instance's qBittorrent (the hashing that qbsync's SHA-1 on write replaces). Peak RSS is each
qbsync process's ``VmHWM`` at the end. The machine is shared, so only ratios measured in the
same run mean anything. Last line::

    RESULT size_mib=.. cold=.. rounds=.. start_s=.. stream_mb_s=.. rsync_mb_s=..
           ratio_stream_vs_rsync=.. (_min, _max) synced_s=.. last_byte_to_synced_s=..
           rsync_then_check_s=.. ratio_synced_vs_rsync_then_check=.. (_min, _max)
           cpu_s_per_gib_source=.. cpu_s_per_gib_dest=.. cpu_s_per_gib_rsync_daemon=..
           cpu_s_per_gib_rsync_client=.. ratio_cpu_vs_rsync=.. cpu_s_per_gib_qb_check=..
           dest_peak_rss_mb=.. source_peak_rss_mb=..
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.qbharness import SEEDING_STATES, make_torrent

from bench.benchlib import (
    GiB,
    MiB,
    add_complete,
    cpu_seconds,
    cpu_seconds_with_children,
    delivery_window,
    drop_caches,
    median,
    median_and_range,
    metric,
    peak_rss_mb,
    poll,
    print_result,
    split_files,
    spread,
    stack,
    tags,
    write_payload,
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


def cpu_children() -> float:
    """CPU seconds of this script's reaped children (the rsync client runs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def daemon_cpu_settled(pid: int, before: float) -> float:
    """The rsync daemon's CPU (children included) once it has reaped the child that served
    the transfer just finished (it does so on SIGCHLD, a moment after the client exits)."""
    deadline = time.monotonic() + 2
    value = cpu_seconds_with_children(pid)
    while value <= before and time.monotonic() < deadline:
        time.sleep(0.02)
        value = cpu_seconds_with_children(pid)
    return value - before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256, help="payload size (default 256)")
    ap.add_argument(
        "--size-gib",
        type=int,
        help="payload size in GiB instead (opt-in steady-state run: --size-gib 10 needs about "
        "4x that free on disk)",
    )
    ap.add_argument("--piece-mib", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache (root) before each transfer and before qBittorrent's check",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--profile",
        type=Path,
        help="record both daemons with py-spy (collapsed stacks) into this directory",
    )
    ap.add_argument("--source-arg", action="append", default=[], help="extra qbsync source flag")
    ap.add_argument("--dest-arg", action="append", default=[], help="extra destination flag")
    args = ap.parse_args()
    size_mib = args.size_gib * 1024 if args.size_gib else args.size_mib
    total = size_mib * MiB
    files = split_files(total)
    if args.cold and not drop_caches():
        print("--cold: cannot drop the page cache (needs root and a writable /proc/sys): skipped")
        print("RESULT skipped=cold_needs_root")
        return 0

    def cold() -> None:
        """Before each timed step: write back what the previous step left dirty (untimed), so
        no transfer is throttled by another's writeback; with --cold, also drop the cache."""
        if args.cold:
            drop_caches()
        else:
            os.sync()

    rows: list[dict[str, float]] = []
    started = time.monotonic()
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
            f"payload {size_mib} MiB in {len(files)} files, {args.piece_mib} MiB pieces, "
            f"{args.rounds} rounds{', cold page cache' if args.cold else ''}; work dir {s.root}",
            flush=True,
        )
        # The payload is written once (not sparse); each round renames its directory, which
        # makes a new torrent (the name is in the info dict) on the same bytes.
        write_payload(src.save_path / "payload-0", files, seed=0)
        prev = ""
        for r in range(args.rounds):
            name = f"payload-{r}"
            if prev:
                # Last round's copies go (bench data only): disk use stays at ~4x the payload.
                src.api.torrents_delete(delete_files=False, torrent_hashes=prev)
                poll(lambda p=prev: not src.info(p), 60, POLL, "source forgot the torrent")
                for inst in (check, dst):
                    inst.api.torrents_delete(delete_files=True, torrent_hashes=prev)
                (src.save_path / f"payload-{r - 1}").rename(src.save_path / name)
            torrent, ih = make_torrent(src.save_path / name, args.piece_mib * MiB)
            prev = ih
            row: dict[str, float] = {}
            # rsync, then add to qBittorrent and wait for its check.
            cold()
            c0, d0 = cpu_children(), cpu_seconds_with_children(s.rsync_pid)
            t0 = time.monotonic()
            row["rsync_s"] = rsync(rport, f"src/{name}", check.save_path / name)
            row["rsync_client_cpu"] = cpu_children() - c0
            row["rsync_daemon_cpu"] = daemon_cpu_settled(s.rsync_pid, d0)
            cold()
            assert check.pid is not None
            k0 = cpu_seconds(check.pid)
            t1 = time.monotonic()
            check.api.torrents_add(
                torrent_files={f"{ih}.torrent": torrent},
                save_path=str(check.save_path),
                content_layout="Original",
            )

            def checked(ih: str = ih) -> bool:
                info = check.info(ih)
                return bool(info and info.progress == 1 and info.state in SEEDING_STATES)

            poll(checked, 1800, POLL, "check instance complete")
            # The cache drop between copy and check is not part of the workflow's time.
            row["rsync_then_check_s"] = row["rsync_s"] + time.monotonic() - t1
            row["check_cpu"] = cpu_seconds(check.pid) - k0
            row["rsync_fsync_s"] = rsync(rport, f"src/{name}", scratch / name, "--fsync")
            shutil.rmtree(scratch / name)
            # qbsync: complete on the source while both daemons run.
            cold()
            base = metric(dhealth, "bytes_received_total")
            cpu_s, cpu_d = cpu_seconds(sproc.pid), cpu_seconds(dproc.pid)
            t0 = time.monotonic()
            add_complete(src, torrent, ih, src.save_path)
            first, last = delivery_window(dhealth, base, total, t0, 1800, POLL)
            poll(lambda ih=ih: "synced" in tags(dst, ih), 600, POLL, "synced on the destination")
            row["synced_s"] = time.monotonic() - t0
            row["source_cpu"] = cpu_seconds(sproc.pid) - cpu_s
            row["dest_cpu"] = cpu_seconds(dproc.pid) - cpu_d
            row["first_s"], row["last_s"] = first, last
            row["stream_s"] = max(last - first, 1e-3)
            rows.append(row)
            print(
                f"round {r + 1}: rsync {row['rsync_s']:.2f}s (fsync {row['rsync_fsync_s']:.2f}s), "
                f"rsync+check {row['rsync_then_check_s']:.2f}s | qbsync first piece "
                f"{first:.2f}s, last {last:.2f}s, synced {row['synced_s']:.2f}s | CPU s: "
                f"source {row['source_cpu']:.2f} destination {row['dest_cpu']:.2f}, rsync "
                f"daemon {row['rsync_daemon_cpu']:.2f} client {row['rsync_client_cpu']:.2f}",
                flush=True,
            )
        dest_rss = peak_rss_mb(dproc.pid)
        src_rss = peak_rss_mb(sproc.pid)

    def col(key: str) -> list[float]:
        return [r[key] for r in rows]

    def med(key: str) -> float:
        return median(col(key))

    mb, gib = total / 1e6, total / GiB
    rsync_rates = [mb / r["rsync_s"] for r in rows]
    stream_rates = [mb / r["stream_s"] for r in rows]
    stream_ratio = [mb / r["stream_s"] / (mb / r["rsync_s"]) for r in rows]
    synced_ratio = [r["rsync_then_check_s"] / r["synced_s"] for r in rows]
    per_gib = {
        k: [r[k] / gib for r in rows]
        for k in ("source_cpu", "dest_cpu", "rsync_daemon_cpu", "rsync_client_cpu", "check_cpu")
    }
    qbsync_cpu = [(r["source_cpu"] + r["dest_cpu"]) / gib for r in rows]
    rsync_cpu = [(r["rsync_daemon_cpu"] + r["rsync_client_cpu"]) / gib for r in rows]
    cpu_ratio = [q / max(x, 1e-6) for q, x in zip(qbsync_cpu, rsync_cpu, strict=True)]
    table: list[tuple[str, str, str]] = [
        ("rsync daemon, whole file", spread(col("rsync_s")), spread(rsync_rates, "{:,.0f}")),
        (
            "rsync daemon, `--fsync`",
            spread(col("rsync_fsync_s")),
            spread([mb / x for x in col("rsync_fsync_s")], "{:,.0f}"),
        ),
        (
            "rsync, then add to qBittorrent and wait for its check",
            spread(col("rsync_then_check_s")),
            "",
        ),
        ("qbsync, to the first piece on the destination", spread(col("first_s")), ""),
        (
            "qbsync, first piece to last piece",
            spread(col("stream_s")),
            f"{spread(stream_rates, '{:,.0f}')}; {spread(stream_ratio)}x rsync",
        ),
        (
            "qbsync, to synced in the destination qBittorrent",
            spread(col("synced_s")),
            f"{spread(synced_ratio)}x the rsync workflow",
        ),
    ]
    print(
        f"\n{len(rows)} rounds, median (min-max); wall time {time.monotonic() - started:.0f} s"
        '\n\n| from "complete on the source" | time (s) | rate (MB/s) |\n|---|---|---|'
    )
    for label, t, rate in table:
        print(f"| {label} | {t} | {rate} |")
    print("\n| CPU seconds per GiB | median (min-max) |\n|---|---|")
    for label, values in (
        ("qbsync source", per_gib["source_cpu"]),
        ("qbsync destination", per_gib["dest_cpu"]),
        ("qbsync, both daemons", qbsync_cpu),
        ("rsync daemon (sender)", per_gib["rsync_daemon_cpu"]),
        ("rsync client (receiver)", per_gib["rsync_client_cpu"]),
        ("rsync, both processes", rsync_cpu),
        ("qbsync / rsync", cpu_ratio),
        (
            "qBittorrent's check after rsync (the work qbsync's SHA-1 on write replaces)",
            per_gib["check_cpu"],
        ),
    ):
        print(f"| {label} | {spread(values)} |")
    print(f"\npeak RSS: destination {dest_rss:.0f} MB, source {src_rss:.0f} MB")
    result: dict[str, Any] = {
        "size_mib": size_mib,
        "cold": int(args.cold),
        "rounds": len(rows),
        "start_s": f"{med('first_s'):.2f}",
        "stream_mb_s": f"{median(stream_rates):.0f}",
        "rsync_mb_s": f"{median(rsync_rates):.0f}",
        **median_and_range("ratio_stream_vs_rsync", stream_ratio),
        "synced_s": f"{med('synced_s'):.2f}",
        "last_byte_to_synced_s": f"{median([r['synced_s'] - r['last_s'] for r in rows]):.2f}",
        "rsync_then_check_s": f"{med('rsync_then_check_s'):.2f}",
        **median_and_range("ratio_synced_vs_rsync_then_check", synced_ratio),
        "cpu_s_per_gib_source": f"{median(per_gib['source_cpu']):.2f}",
        "cpu_s_per_gib_dest": f"{median(per_gib['dest_cpu']):.2f}",
        "cpu_s_per_gib_rsync_daemon": f"{median(per_gib['rsync_daemon_cpu']):.2f}",
        "cpu_s_per_gib_rsync_client": f"{median(per_gib['rsync_client_cpu']):.2f}",
        "ratio_cpu_vs_rsync": f"{median(cpu_ratio):.2f}",
        "cpu_s_per_gib_qb_check": f"{median(per_gib['check_cpu']):.2f}",
        "dest_peak_rss_mb": f"{dest_rss:.0f}",
        "source_peak_rss_mb": f"{src_rss:.0f}",
    }
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
