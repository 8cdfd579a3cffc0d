"""One connection, the connection pool and rsync over a modelled long fat path.

Run: ``make bench-wan`` (``.venv/bin/python -m bench.wan``; ``--size-mib``, ``--rtt-ms``,
``--window-mib``).

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

Cases, each on a new torrent that completes on the source while the daemons run (the
destination daemon stays up, the source daemon is restarted with other flags):

* ``one``: ``--min-connections 1 --max-connections 1``;
* ``pool``: the defaults (2..8, adaptive), a first torrent (the pool grows while it streams)
  and a second one right after (the pool already grown);
* ``rsync``: ``rsync --whole-file`` of the same payload through the same proxy (one TCP
  connection) from an rsync daemon.

Rates are payload bytes over first-to-last piece on the destination (rsync: bytes over its
run time). The proxy reports the bytes each connection carried. Last line::

    RESULT one_mb_s=.. pool_mb_s=.. pool_warm_mb_s=.. rsync_mb_s=.. pool_vs_one=..
           pool_vs_rsync=.. pool_connections=..
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import trio
from tests.qbharness import QBInstance, free_port, wait_until

from bench.benchlib import (
    MiB,
    add_complete,
    delivery_window,
    metric,
    metric_by_label,
    new_torrent,
    poll,
    split_files,
    stack,
    tags,
)

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


def stream_case(
    src: QBInstance, dhealth: int, size: int, piece: int, seed: int
) -> tuple[float, str]:
    """Add a new torrent as complete on the source; return (MB/s first-to-last piece on the
    destination, info-hash)."""
    name = f"payload-{seed}"
    torrent, ih = new_torrent(src.save_path / name, split_files(size), piece, seed)
    base = metric(dhealth, "bytes_received_total")
    t0 = time.monotonic()
    add_complete(src, torrent, ih, src.save_path)
    first, last = delivery_window(dhealth, base, size, t0, 900, 0.02)
    return size / 1e6 / max(last - first, 1e-3), ih


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxy", nargs=3, metavar=("LISTEN", "UPSTREAM", "STATS"))
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--window-mib", type=float, default=4.0)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--piece-mib", type=int, default=4)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    rtt, window = args.rtt_ms / 1000, int(args.window_mib * MiB)
    if args.proxy:
        listen, upstream, stats = args.proxy
        trio.run(proxy_main, int(listen), int(upstream), Path(stats), rtt, window)
        return 0

    size, piece = args.size_mib * MiB, args.piece_mib * MiB
    results: dict[str, float] = {}
    per_conn: dict[str, list[int]] = {}
    with stack(keep=args.keep) as s:
        src = s.qb("source")
        dst = s.qb("destination")
        rport = s.rsync_daemon({"src": src.save_path})
        _, dport, dhealth = s.destination(dst)
        print(
            f"model: RTT {args.rtt_ms:g} ms, window {args.window_mib:g} MiB per connection "
            f"(<= {window / rtt / MiB:.0f} MiB/s each); payload {args.size_mib} MiB",
            flush=True,
        )

        # rsync through its own proxy.
        rproxy = Proxy(s.root, rport, rtt, window)
        s.others.append(rproxy.proc)
        name = "payload-rsync"
        new_torrent(src.save_path / name, split_files(size), piece, 99)
        out = s.root / "rsync-out"
        t0 = time.monotonic()
        subprocess.run(
            [
                *("rsync", "-a", "--whole-file"),
                *(f"rsync://127.0.0.1:{rproxy.port}/src/{name}/", f"{out}/"),
            ],
            check=True,
        )
        results["rsync"] = size / 1e6 / (time.monotonic() - t0)
        print(f"rsync: {results['rsync']:.0f} MB/s", flush=True)

        for case, flags, seeds in (
            ("one", ("--min-connections", "1", "--max-connections", "1"), (1,)),
            ("pool", (), (2, 3)),
        ):
            proxy = Proxy(s.root, dport, rtt, window)
            s.others.append(proxy.proc)
            sproc, shealth = s.source(src, proxy.port, *flags)
            for k, seed in enumerate(seeds):
                rate, ih = stream_case(src, dhealth, size, piece, seed)
                poll(lambda ih=ih: "synced" in tags(dst, ih), 300, 0.05, "synced")
                key = case if k == 0 else f"{case}_warm"
                results[key] = rate
                conns = metric(shealth, "connections_active")
                scale = metric_by_label(shealth, "connection_scale_events_total", "direction")
                results[f"{key}_connections"] = conns
                print(
                    f"{key}: {rate:.0f} MB/s, {conns:.0f} connections open at the end, "
                    f"scale events {scale}",
                    flush=True,
                )
            per_conn[case] = sorted((c["up"] for c in proxy.counters().values()), reverse=True)
            print(
                f"{case}: bytes per connection (MB) {[round(b / 1e6) for b in per_conn[case]]}",
                flush=True,
            )
            sproc.stop()
    pool_best = results.get("pool_warm", results["pool"])
    result = {
        "one_mb_s": f"{results['one']:.0f}",
        "pool_mb_s": f"{results['pool']:.0f}",
        "pool_warm_mb_s": f"{results.get('pool_warm', float('nan')):.0f}",
        "rsync_mb_s": f"{results['rsync']:.0f}",
        "pool_vs_one": f"{pool_best / results['one']:.2f}",
        "pool_vs_rsync": f"{pool_best / results['rsync']:.2f}",
        "pool_connections": f"{results.get('pool_warm_connections', 0):.0f}",
    }
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
