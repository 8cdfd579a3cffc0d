"""How far the destination trails a source that is still downloading.

Run: ``make bench-lag`` (``.venv/bin/python -m bench.lag``; ``--size-mib``, ``--piece-mib``,
``--rate-mib``).

Set-up on 127.0.0.1: a *seeder* qbittorrent-nox seeding a generated payload, a *source*
qbittorrent-nox that downloads it with a ``--rate-mib`` (default 50 MiB/s) download limit, a
*destination* qbittorrent-nox, and both qbsync daemons already running (the source at
``--log-level debug`` so it logs each acknowledged piece with a millisecond timestamp).

Per piece, the lag is the time from qBittorrent on the source reporting the piece complete
(``torrents/pieceStates`` polled every 20 ms by this script: the completion is seen up to
20 ms late, so the lag is under-estimated by at most that) to the destination acknowledging
it (the source's ``event=piece_acked`` log line). qBittorrent itself publishes piece states
every ``Session\\RefreshInterval`` (250 ms here, 1500 ms by default): that delay is before
"reported complete" and so not part of the lag. ``complete_to_synced_s`` is from the torrent
reaching 100 % on the source to ``synced`` on the destination qBittorrent.

Baseline in the same run: ``poll_gap_ms``, the median time between two successive changes in
the source's piece states, i.e. how often qBittorrent publishes completions (a lag below it
cannot be told apart from zero). Last line::

    RESULT lag_p50_ms=.. lag_p95_ms=.. lag_max_ms=.. complete_to_synced_s=.. poll_gap_ms=..
"""

from __future__ import annotations

import argparse
import calendar
import itertools
import re
import sys
import threading
import time

from bench.benchlib import MiB, median, new_torrent, poll, split_files, stack, tags

ACK = re.compile(r"^time=(\S+)Z .*event=piece_acked hash=(\w+) piece=(\d+)")
POLL = 0.02


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
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    files = split_files(args.size_mib * MiB)
    with stack(keep=args.keep) as s:
        seeder = s.qb("seeder")
        src = s.qb("source")
        dst = s.qb("destination")
        torrent, ih = new_torrent(seeder.save_path / "payload", files, args.piece_mib * MiB, 1)
        seeder.api.torrents_add(
            torrent_files={f"{ih}.torrent": torrent},
            save_path=str(seeder.save_path),
            content_layout="Original",
        )
        seeder.wait_seeding(ih, timeout=600)
        _, dport, _ = s.destination(dst)
        sproc, _ = s.source(src, dport, "--log-level", "debug")
        seen: dict[int, float] = {}
        changes: list[float] = []
        complete_at: list[float] = []
        stop = threading.Event()

        def watch() -> None:
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
        src.api.torrents_add(
            torrent_files={f"{ih}.torrent": torrent},
            save_path=str(src.save_path),
            download_limit=args.rate_mib * MiB,
            content_layout="Original",
        )
        poll(lambda: src.info(ih), 10, 0.05, "source lists the torrent")
        src.api.torrents_add_peers(peers=f"127.0.0.1:{seeder.bt_port}", torrent_hashes=ih)
        t0 = time.time()
        poll(lambda: complete_at, 900, 0.05, "download complete on the source")
        download_s = complete_at[0] - t0
        poll(lambda: "synced" in tags(dst, ih), 300, POLL, "synced on the destination")
        synced_at = time.time()
        stop.set()
        watcher.join(5)
        acked: dict[int, float] = {}
        for line in sproc.log_text().splitlines():
            m = ACK.match(line)
            if m and m.group(2) == ih:
                acked.setdefault(int(m.group(3)), wall(m.group(1)))
    lags = [(acked[i] - seen[i]) * 1000 for i in seen if i in acked]
    gaps = [b - a for a, b in itertools.pairwise(changes)]
    n = -(-sum(files.values()) // (args.piece_mib * MiB))
    print(
        f"{args.size_mib} MiB, {n} pieces of {args.piece_mib} MiB, source limited to "
        f"{args.rate_mib} MiB/s: download {download_s:.1f} s "
        f"({args.size_mib / max(download_s, 1e-3):.0f} MiB/s); {len(lags)} pieces timed"
    )
    result = {
        "lag_p50_ms": f"{quantile(lags, 0.5):.0f}",
        "lag_p95_ms": f"{quantile(lags, 0.95):.0f}",
        "lag_max_ms": f"{max(lags) if lags else float('nan'):.0f}",
        "complete_to_synced_s": f"{synced_at - complete_at[0]:.2f}",
        "poll_gap_ms": f"{median(gaps) * 1000:.0f}",
        "pieces": len(lags),
    }
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
