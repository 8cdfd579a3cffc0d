"""How far the destination trails a source that is still downloading, stage by stage.

Run: ``make bench-lag`` (``.venv/bin/python -m bench.lag``; ``--size-mib``, ``--piece-mib``,
``--rate-mib``, ``--rounds``). 5 rounds of 256 MiB at 50 MiB/s take about two minutes.

Set-up on 127.0.0.1: a *seeder* qbittorrent-nox, a *source* qbittorrent-nox that downloads
from it with a ``--rate-mib`` (default 50 MiB/s) download limit, a *destination*
qbittorrent-nox, and both qbsync daemons already running (the source at ``--log-level
debug`` so it logs each acknowledged piece with a millisecond timestamp and the time it
spent in each stage). Each round is a new payload the seeder seeds and the source downloads.

Per piece, the lag is the time from qBittorrent on the source reporting the piece complete
(``torrents/pieceStates`` polled every 20 ms by this script: the completion is seen up to
20 ms late, so the lag is under-estimated by at most that) to the destination acknowledging
it (the source's ``event=piece_acked`` log line: the destination acks once the piece is
SHA-1-checked and written). The lag splits into stages (the ``piece_acked`` line's fields):

* ``poll``: until the source's monitor saw the piece ready (its ``sync/maindata`` every
  250 ms, then ``torrents/pieceStates`` of the torrent that moved);
* ``queue``: in the piece queue until a sender took it; ``budget``: waiting for
  ``--max-inflight`` memory; ``read``: from disk; ``pick``: waiting for a connection with room;
* ``send``: credit, the socket, the destination's SHA-1 and write, the ack. The destination's
  mean hash+write time per piece and mean flush (fsync + bitmap) time come from its metrics.

Before all of that, **qBittorrent's own reporting**: it publishes piece states every
``Session\\RefreshInterval`` (250 ms here, 1500 ms by default), so a piece is reported on
average half that after it completed. ``poll_gap_ms`` (median time between two changes in the
piece states) measures that period in the same run; it is not part of the lag.

Per round: lag p50/p95/max over its pieces; printed as median (min-max) over the rounds.
CPU seconds per GiB of both daemons (there is no rsync here: nothing else can stream a
download in progress). Last line::

    RESULT lag_p50_ms=.. lag_p95_ms=.. lag_p95_ms_min=.. lag_p95_ms_max=.. lag_max_ms=..
           complete_to_synced_s=.. poll_gap_ms=.. poll_p95_ms=.. queue_p95_ms=..
           read_p95_ms=.. pick_p95_ms=.. send_p95_ms=.. cpu_s_per_gib_source=..
           cpu_s_per_gib_dest=.. rounds=.. pieces=..
"""

from __future__ import annotations

import argparse
import calendar
import itertools
import re
import sys
import threading
import time

from bench.benchlib import (
    GiB,
    MiB,
    cpu_seconds,
    median,
    median_and_range,
    metric,
    new_torrent,
    poll,
    print_result,
    split_files,
    spread,
    stack,
    tags,
)

ACK = re.compile(r"^time=(\S+)Z .*event=piece_acked hash=(\w+) piece=(\d+)(.*)$")
FIELD = re.compile(r"(\w+)_ms=(-?\d+)")
POLL = 0.02
STAGES = ("poll", "queue", "budget", "read", "pick", "send")


def wall(ts: str) -> float:
    """``2026-01-02T03:04:05.678`` (UTC) -> seconds since the epoch."""
    base, ms = ts.split(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--piece-mib", type=int, default=2)
    ap.add_argument("--rate-mib", type=int, default=50, help="source download limit (MiB/s)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    files = split_files(args.size_mib * MiB)
    rounds: list[dict[str, float]] = []
    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    gaps: list[float] = []
    started = time.monotonic()
    with stack(keep=args.keep) as s:
        seeder = s.qb("seeder")
        src = s.qb("source")
        dst = s.qb("destination")
        dproc, dport, dhealth = s.destination(dst)
        sproc, _ = s.source(src, dport, "--log-level", "debug")
        for r in range(args.rounds):
            name = f"payload-{r}"
            torrent, ih = new_torrent(seeder.save_path / name, files, args.piece_mib * MiB, r)
            seeder.api.torrents_add(
                torrent_files={f"{ih}.torrent": torrent},
                save_path=str(seeder.save_path),
                content_layout="Original",
            )
            seeder.wait_seeding(ih, timeout=600)
            seen: dict[int, float] = {}
            changes: list[float] = []
            complete_at: list[float] = []
            stop = threading.Event()

            def watch(
                ih: str = ih,
                seen: dict[int, float] = seen,
                changes: list[float] = changes,
                complete_at: list[float] = complete_at,
                stop: threading.Event = stop,
            ) -> None:
                last: list[int] = []
                while not stop.is_set():
                    try:
                        states = [int(x) for x in src.api.torrents_piece_states(torrent_hash=ih)]
                    except Exception:
                        states = []
                    now = time.time()
                    if states != last and states:
                        changes.append(now)
                        last = states
                    for i, st in enumerate(states):
                        if st == 2 and i not in seen:
                            seen[i] = now
                    if states and all(x == 2 for x in states) and not complete_at:
                        complete_at.append(now)
                    time.sleep(POLL)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            write0 = (
                metric(dhealth, "piece_write_duration_seconds_sum"),
                metric(dhealth, "piece_write_duration_seconds_count"),
            )
            flush0 = (
                metric(dhealth, "state_flush_duration_seconds_sum"),
                metric(dhealth, "state_flush_duration_seconds_count"),
            )
            cpu0 = cpu_seconds(sproc.pid), cpu_seconds(dproc.pid)
            src.api.torrents_add(
                torrent_files={f"{ih}.torrent": torrent},
                save_path=str(src.save_path),
                download_limit=args.rate_mib * MiB,
                content_layout="Original",
            )
            poll(lambda ih=ih: src.info(ih), 10, 0.05, "source lists the torrent")
            src.api.torrents_add_peers(peers=f"127.0.0.1:{seeder.bt_port}", torrent_hashes=ih)
            t0 = time.time()
            poll(lambda c=complete_at: c, 900, 0.05, "download complete on the source")
            download_s = complete_at[0] - t0
            poll(lambda ih=ih: "synced" in tags(dst, ih), 300, POLL, "synced on the destination")
            synced_at = time.time()
            stop.set()
            watcher.join(5)
            cpu_src = cpu_seconds(sproc.pid) - cpu0[0]
            cpu_dst = cpu_seconds(dproc.pid) - cpu0[1]

            def mean_of(name: str, before: tuple[float, float]) -> float:
                total = metric(dhealth, f"{name}_sum") - before[0]
                count = metric(dhealth, f"{name}_count") - before[1]
                return total / count * 1000 if count else float("nan")

            write_ms = mean_of("piece_write_duration_seconds", write0)
            flush_ms = mean_of("state_flush_duration_seconds", flush0)
            lags: list[float] = []
            for line in sproc.log_text().splitlines():
                m = ACK.match(line)
                if not m or m.group(2) != ih or int(m.group(3)) not in seen:
                    continue
                index, acked = int(m.group(3)), wall(m.group(1))
                f = {k: float(v) for k, v in FIELD.findall(m.group(4))}
                lags.append((acked - seen[index]) * 1000)
                if f.get("seen", -1) >= 0:
                    # The monitor saw it at ack - seen_ms; this script saw it at seen[index].
                    stages["poll"].append((acked - f["seen"] / 1000 - seen[index]) * 1000)
                    for k in STAGES[1:]:
                        stages[k].append(f.get(k, float("nan")))
            gaps += [b - a for a, b in itertools.pairwise(changes)]
            gib = args.size_mib * MiB / GiB
            row = {
                "p50": quantile(lags, 0.5),
                "p95": quantile(lags, 0.95),
                "max": max(lags) if lags else float("nan"),
                "synced_s": synced_at - complete_at[0],
                "pieces": len(lags),
                "cpu_src": cpu_src / gib,
                "cpu_dst": cpu_dst / gib,
                "write_ms": write_ms,
                "flush_ms": flush_ms,
            }
            rounds.append(row)
            print(
                f"round {r + 1}: download {download_s:.1f} s "
                f"({args.size_mib / max(download_s, 1e-3):.0f} MiB/s), {len(lags)} pieces: lag "
                f"p50 {row['p50']:.0f} p95 {row['p95']:.0f} max {row['max']:.0f} ms; complete "
                f"-> synced {row['synced_s']:.2f} s; destination hash+write {write_ms:.0f} ms, "
                f"flush {flush_ms:.0f} ms; CPU s/GiB source {row['cpu_src']:.2f} destination "
                f"{row['cpu_dst']:.2f}",
                flush=True,
            )

    def col(key: str) -> list[float]:
        return [r[key] for r in rounds]

    print(
        f"\n{len(rounds)} rounds of {args.size_mib} MiB, {args.piece_mib} MiB pieces, source "
        f"limited to {args.rate_mib} MiB/s; wall time {time.monotonic() - started:.0f} s\n"
        "\n| per round | median (min-max) |\n|---|---|"
    )
    for label, key in (
        ("lag p50 (ms)", "p50"),
        ("lag p95 (ms)", "p95"),
        ("lag max (ms)", "max"),
        ("complete on source -> synced (s)", "synced_s"),
        ("destination SHA-1 + write per piece (ms)", "write_ms"),
        ("destination flush: fsync + bitmap (ms)", "flush_ms"),
        ("CPU s/GiB, source daemon", "cpu_src"),
        ("CPU s/GiB, destination daemon", "cpu_dst"),
    ):
        fmt = "{:.2f}" if key.startswith(("cpu", "synced")) else "{:.0f}"
        print(f"| {label} | {spread(col(key), fmt)} |")
    print(
        f"\nqBittorrent publishes piece states every {median(gaps) * 1000:.0f} ms (median gap); "
        "that comes before the lag.\n\n"
        "| stage, all pieces (ms) | p50 | p95 | max |\n|---|---|---|---|"
    )
    for k in STAGES:
        v = [x for x in stages[k] if x == x]
        top = max(v, default=float("nan"))
        print(f"| {k} | {quantile(v, 0.5):.0f} | {quantile(v, 0.95):.0f} | {top:.0f} |")
    result = {
        "lag_p50_ms": f"{median(col('p50')):.0f}",
        **median_and_range("lag_p95_ms", col("p95"), "{:.0f}"),
        "lag_max_ms": f"{max(col('max')):.0f}",
        "complete_to_synced_s": f"{median(col('synced_s')):.2f}",
        "poll_gap_ms": f"{median(gaps) * 1000:.0f}",
        **{
            f"{k}_p95_ms": f"{quantile(stages[k], 0.95):.0f}"
            for k in ("poll", "queue", "read", "pick", "send")
        },
        "cpu_s_per_gib_source": f"{median(col('cpu_src')):.2f}",
        "cpu_s_per_gib_dest": f"{median(col('cpu_dst')):.2f}",
        "rounds": len(rounds),
        "pieces": int(sum(col("pieces"))),
    }
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
