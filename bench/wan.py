"""One connection, the connection pool and rsync over a modelled long fat path.

Run: ``make bench-wan`` (``.venv/bin/python -m bench.wan``; ``--size-mib`` (default 256),
``--rtt-ms`` (50), ``--window-mib`` (4), ``--rounds`` (5), ``--no-warm``). The issue's three
cases: the defaults; ``--size-mib 1024``; ``--rtt-ms 100 --window-mib 2``. 5 rounds of the
defaults take about three minutes on a quiet 2-core machine.

This kernel has no ``netem``, so a userspace proxy (this module with ``--proxy``, its own
process) sits between the daemons on 127.0.0.1. **The model**: every TCP connection through
the proxy gets, in each direction, a one-way delay of ``rtt/2`` and a window of
``--window-mib``: the proxy reads at most that many bytes from the sender that have not been
"acknowledged" yet, where a byte counts as acknowledged one full RTT after the proxy read it
(delivered to the receiver after ``rtt/2``, the acknowledgement travelling back another
``rtt/2``). So one connection carries at most ``window / rtt`` (4 MiB / 50 ms = 80 MiB/s), the
bandwidth-delay limit of a TCP connection whose window is stuck at 4 MiB, which is what makes
several connections pay off on real long paths. **Limits**: no loss, no congestion control,
no slow start, no shared bottleneck between the connections (each has its own window, as if
the path had unlimited capacity); kernel socket buffers on both sides of the proxy add some
extra buffering; the proxy is Python, so it also costs CPU on this shared machine.

Each round runs three cases, each on a new torrent (the payload is written once; each transfer
renames its directory, which makes a new info-hash) that completes on the source while the
daemons run (the destination daemon stays up, the source daemon is restarted per case, so the
pool starts from ``--min-connections`` in every round):

* ``one``: ``--min-connections 1 --max-connections 1``;
* ``pool``: the defaults (2..8, adaptive), a first torrent (the pool grows while it streams)
  and a second one right after (the pool already grown);
* ``rsync``: ``rsync --whole-file`` of the same payload through the same proxy (one TCP
  connection) from an rsync daemon.

Rates are payload bytes over first-to-last piece on the destination (rsync: bytes over its
run time); printed as median (min-max) over the rounds, ratios per round. CPU seconds per GiB:
both qbsync daemons during a transfer, beside the rsync daemon (forked sender included) and
client (the proxy's own CPU is in neither). The proxy reports the bytes each connection
carried. Last line::

    RESULT rtt_ms=.. window_mib=.. size_mib=.. rounds=.. one_mb_s=.. pool_mb_s=..
           pool_warm_mb_s=.. rsync_mb_s=.. pool_vs_one=.. (_min, _max) pool_vs_rsync=..
           pool_connections=.. cpu_s_per_gib_pool=.. cpu_s_per_gib_rsync=..
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import trio
from tests.qbharness import QBInstance, free_port, make_torrent, wait_until

from bench.benchlib import (
    GiB,
    MiB,
    add_complete,
    cpu_seconds,
    cpu_seconds_with_children,
    delivery_window,
    median,
    median_and_range,
    metric,
    poll,
    print_result,
    split_files,
    spread,
    stack,
    tags,
    write_payload,
)
from qbsync.qbittorrent.instance import stop_process

CHUNK = 256 * 1024

# --- the proxy (its own process) ---------------------------------------------------------


class Pipe:
    """One direction of one connection: delay and window (see the module docstring)."""

    def __init__(self, one_way: float, window: int) -> None:
        self.one_way = one_way
        self.window = window
        self.unacked = 0
        self.room = trio.Event()
        self.bytes = 0

    async def run(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        send, recv = trio.open_memory_channel[tuple[float, bytes]](float("inf"))
        acks: collections.deque[tuple[float, int]] = collections.deque()
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                async with send:
                    while True:
                        while self.unacked >= self.window:
                            self.room = trio.Event()
                            await self.room.wait()
                        try:
                            data = await src.receive_some(min(CHUNK, self.window - self.unacked))
                        except trio.BrokenResourceError:
                            data = b""
                        now = trio.current_time()
                        if not data:
                            await send.send((now + self.one_way, b""))
                            return
                        self.unacked += len(data)
                        self.bytes += len(data)
                        acks.append((now + 2 * self.one_way, len(data)))
                        if len(acks) == 1:
                            nursery.start_soon(acker)
                        await send.send((now + self.one_way, data))

            async def acker() -> None:
                while acks:
                    at, n = acks[0]
                    await trio.sleep_until(at)
                    acks.popleft()
                    self.unacked -= n
                    self.room.set()

            async def writer() -> None:
                async with recv:
                    async for at, data in recv:
                        await trio.sleep_until(at)
                        if not data:
                            with contextlib.suppress(
                                trio.BrokenResourceError, trio.ClosedResourceError
                            ):
                                await dst.send_eof()
                            return
                        try:
                            await dst.send_all(data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            nursery.cancel_scope.cancel()
                            return

            nursery.start_soon(reader)
            nursery.start_soon(writer)


async def proxy_main(listen: int, upstream: int, stats: Path, rtt: float, window: int) -> None:
    counters: dict[int, dict[str, int]] = {}
    next_id = 0

    async def handle(client: trio.SocketStream) -> None:
        nonlocal next_id
        cid = next_id
        next_id += 1
        try:
            server = await trio.open_tcp_stream("127.0.0.1", upstream)
        except OSError:
            await client.aclose()
            return
        up, down = Pipe(rtt / 2, window), Pipe(rtt / 2, window)
        counters[cid] = {"up": 0, "down": 0}
        async with client, server, trio.open_nursery() as nursery:

            async def count() -> None:
                while True:
                    counters[cid] = {"up": up.bytes, "down": down.bytes}
                    await trio.sleep(0.2)

            nursery.start_soon(count)

            async def both() -> None:
                async with trio.open_nursery() as inner:
                    inner.start_soon(up.run, client, server)
                    inner.start_soon(down.run, server, client)
                nursery.cancel_scope.cancel()

            nursery.start_soon(both)
        counters[cid] = {"up": up.bytes, "down": down.bytes}

    async def dump() -> None:
        while True:
            tmp = trio.Path(str(stats) + ".tmp")
            await tmp.write_text(json.dumps(counters))
            await tmp.rename(stats)  # readers never see a half-written file
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dump)
        await trio.serve_tcp(handle, listen, host="127.0.0.1")


# --- the benchmark -------------------------------------------------------------------------


class Proxy:
    def __init__(self, root: Path, upstream: int, rtt: float, window: int) -> None:
        self.port = free_port()
        self.stats = root / f"proxy-{self.port}.json"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.wan",
                "--proxy",
                str(self.port),
                str(upstream),
                str(self.stats),
                "--rtt-ms",
                str(rtt * 1000),
                "--window-mib",
                str(window / MiB),
            ]
        )

        def up() -> bool:
            return self.stats.exists()

        wait_until(up, 20, 0.05, "proxy up")

    def counters(self) -> dict[str, dict[str, int]]:
        try:
            data: dict[str, dict[str, int]] = json.loads(self.stats.read_text() or "{}")
            return data
        except (OSError, ValueError):
            return {}


def stream_case(src: QBInstance, dhealth: int, torrent: bytes, ih: str, size: int) -> float:
    """Add a torrent as complete on the source; return MB/s first-to-last piece on the
    destination."""
    base = metric(dhealth, "bytes_received_total")
    t0 = time.monotonic()
    add_complete(src, torrent, ih, src.save_path)
    first, last = delivery_window(dhealth, base, size, t0, 900, 0.02)
    return size / 1e6 / max(last - first, 1e-3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxy", nargs=3, metavar=("LISTEN", "UPSTREAM", "STATS"))
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--window-mib", type=float, default=4.0)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--piece-mib", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--no-warm", action="store_true", help="skip the second pool transfer of each round"
    )
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    rtt, window = args.rtt_ms / 1000, int(args.window_mib * MiB)
    if args.proxy:
        listen, upstream, stats = args.proxy
        trio.run(proxy_main, int(listen), int(upstream), Path(stats), rtt, window)
        return 0

    size, piece = args.size_mib * MiB, args.piece_mib * MiB
    gib = size / GiB
    res: dict[str, list[float]] = collections.defaultdict(list)
    started = time.monotonic()
    with stack(keep=args.keep) as s:
        src = s.qb("source")
        dst = s.qb("destination")
        rport = s.rsync_daemon({"src": src.save_path})
        dproc, dport, dhealth = s.destination(dst)
        print(
            f"model: RTT {args.rtt_ms:g} ms, window {args.window_mib:g} MiB per connection "
            f"(<= {window / rtt / MiB:.0f} MiB/s each); payload {args.size_mib} MiB, "
            f"{args.rounds} rounds",
            flush=True,
        )
        # The payload is written once; every transfer renames its directory (a new torrent
        # name, so a new info-hash on the same bytes) and the copies are removed afterwards.
        current = src.save_path / "wan-0"
        write_payload(current, split_files(size), seed=0)
        serial = itertools.count(1)

        def fresh() -> tuple[Path, bytes, str]:
            nonlocal current
            new = src.save_path / f"wan-{next(serial)}"
            current.rename(new)
            current = new
            torrent, ih = make_torrent(new, piece)
            return new, torrent, ih

        def forget(ih: str) -> None:
            src.api.torrents_delete(delete_files=False, torrent_hashes=ih)
            poll(lambda: not src.info(ih), 60, 0.05, "source forgot the torrent")
            dst.api.torrents_delete(delete_files=True, torrent_hashes=ih)

        for r in range(args.rounds):
            # rsync through its own proxy (one TCP connection).
            rproxy = Proxy(s.root, rport, rtt, window)
            path, _, _ = fresh()
            out = s.root / "rsync-out"
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            d0 = cpu_seconds_with_children(s.rsync_pid)
            t0 = time.monotonic()
            subprocess.run(
                [
                    *("rsync", "-a", "--whole-file"),
                    *(f"rsync://127.0.0.1:{rproxy.port}/src/{path.name}/", f"{out}/"),
                ],
                check=True,
            )
            res["rsync"].append(size / 1e6 / (time.monotonic() - t0))
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            client = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
            time.sleep(0.2)  # the daemon reaps its forked sender on SIGCHLD
            res["rsync_cpu"].append((client + cpu_seconds_with_children(s.rsync_pid) - d0) / gib)
            shutil.rmtree(out)
            stop_process(rproxy.proc, 10)
            line = [f"round {r + 1}: rsync {res['rsync'][-1]:.0f} MB/s"]
            cases: list[tuple[str, tuple[str, ...], int]] = [
                ("one", ("--min-connections", "1", "--max-connections", "1"), 1),
                ("pool", (), 1 if args.no_warm else 2),
            ]
            for case, flags, transfers in cases:
                proxy = Proxy(s.root, dport, rtt, window)
                sproc, shealth = s.source(src, proxy.port, *flags)
                for k in range(transfers):
                    key = case if k == 0 else f"{case}_warm"
                    _, torrent, ih = fresh()
                    cpu0 = cpu_seconds(sproc.pid) + cpu_seconds(dproc.pid)
                    rate = stream_case(src, dhealth, torrent, ih, size)
                    poll(lambda ih=ih: "synced" in tags(dst, ih), 300, 0.05, "synced")
                    cpu = cpu_seconds(sproc.pid) + cpu_seconds(dproc.pid) - cpu0
                    res[key].append(rate)
                    res[f"{key}_cpu"].append(cpu / gib)
                    res[f"{key}_connections"].append(metric(shealth, "connections_active"))
                    forget(ih)
                    line.append(
                        f"{key} {rate:.0f} MB/s ({res[f'{key}_connections'][-1]:.0f} conns)"
                    )
                sproc.stop()
                per = sorted((c["up"] for c in proxy.counters().values()), reverse=True)
                line.append(f"{case} MB per connection {[round(b / 1e6) for b in per]}")
                stop_process(proxy.proc, 10)
            print("; ".join(line), flush=True)

    pool_vs_one = [p / o for p, o in zip(res["pool"], res["one"], strict=True)]
    pool_vs_rsync = [p / x for p, x in zip(res["pool"], res["rsync"], strict=True)]
    print(
        f"\n{args.rounds} rounds, median (min-max); wall time {time.monotonic() - started:.0f} s"
        "\n\n| case | MB/s | CPU s/GiB (both daemons; rsync: both processes) | connections |"
        "\n|---|---|---|---|"
    )
    for key, label in (
        ("rsync", "rsync, one connection"),
        ("one", "qbsync, one connection"),
        ("pool", "qbsync pool, first transfer (grows from --min-connections)"),
        ("pool_warm", "qbsync pool, second transfer"),
    ):
        if res[key]:
            conns = spread(res[f"{key}_connections"], "{:.0f}") if key != "rsync" else "1"
            print(
                f"| {label} | {spread(res[key], '{:.0f}')} | {spread(res[f'{key}_cpu'])} | "
                f"{conns} |"
            )
    print(f"| pool / one connection | {spread(pool_vs_one)}x | | |")
    result = {
        "rtt_ms": f"{args.rtt_ms:g}",
        "window_mib": f"{args.window_mib:g}",
        "size_mib": args.size_mib,
        "rounds": args.rounds,
        "one_mb_s": f"{median(res['one']):.0f}",
        "pool_mb_s": f"{median(res['pool']):.0f}",
        "pool_warm_mb_s": f"{median(res['pool_warm']):.0f}",
        "rsync_mb_s": f"{median(res['rsync']):.0f}",
        **median_and_range("pool_vs_one", pool_vs_one),
        "pool_vs_rsync": f"{median(pool_vs_rsync):.2f}",
        "pool_connections": f"{median(res['pool_connections']):.0f}",
        "cpu_s_per_gib_pool": f"{median(res['pool_cpu']):.2f}",
        "cpu_s_per_gib_rsync": f"{median(res['rsync_cpu']):.2f}",
    }
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
