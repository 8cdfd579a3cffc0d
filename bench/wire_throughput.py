"""Wire protocol throughput versus a raw Trio socket stream, over loopback.

Run: ``.venv/bin/python bench/wire_throughput.py`` (``make bench``). The default run takes
well under a minute.

Every case runs as two fresh processes, like the real deployment: a *receiver* (the
destination side) and a *sender* (the source side), connected by ``--conns`` TCP connections
to 127.0.0.1. Fresh processes give clean peak RSS figures (``VmHWM`` from
``/proc/self/status``). Modes:

* ``raw``: the same bytes through plain ``trio.SocketStream`` s: ``send_all`` of one buffer,
  ``recv_into`` a preallocated buffer, the same socket tuning. This is the ceiling of this
  stack;
* ``wire``: :func:`qbsync.wire.open_connection` / :func:`qbsync.wire.serve` with the default
  credit window and a 512 MiB byte budget. The handler just acks (``--hash`` makes it SHA-1
  each piece in a worker thread, like the destination does). Each connection has
  ``SENDERS_PER_CONN`` concurrent ``send_piece`` callers;
* ``wire+tls``: the same through ``trio.SSLStream`` with a throwaway self-signed certificate;
  ``raw+tls`` is the plain-stream reference for it.

Repeats are interleaved (raw, wire, raw, wire, ...) and the fastest run of each mode is kept,
because loopback numbers on a shared 2-core VM are noisy.

A memory case then sends ``--flat-factor`` times more data through ``wire`` with 4 MiB pieces.
The receiver's peak RSS must stay flat: it is bounded by the credit window and the byte
budget, not by the number of bytes sent.

The last line is machine-readable::

    RESULT wire_vs_raw=<ratio> tls_vs_raw=<ratio> peak_rss_mb=<n> tag_mb_s=<n>

Both ratios are measured on 4 MiB pieces. ``tag_mb_s`` is the rate of the per-frame tag
(protocol 2) over 16 MiB pieces in one process. ``peak_rss_mb`` is the largest receiver peak
(destination side) of any wire case.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

MiB = 1024 * 1024
SENDERS_PER_CONN = 4
TOKEN = "bench-token"
H = "ab" * 20


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# --- receiver process -------------------------------------------------------------------------


class AckHandler:
    def __init__(self, hash_pieces: bool) -> None:
        self.hash_pieces = hash_pieces

    async def handle_request(self, peer: Any, request: Any) -> Any:
        raise NotImplementedError

    async def handle_piece(self, peer: Any, piece: Any) -> Any:
        from qbsync.wire import PieceAck

        if self.hash_pieces:
            await trio.to_thread.run_sync(hashlib.sha1, piece.data)
        return PieceAck(piece.info_hash, piece.index)


async def receiver(spec: dict[str, Any]) -> None:
    """Serve until stdin closes, then report peak RSS."""
    from qbsync.wire import ByteBudget, serve, server_ssl_context
    from qbsync.wire.address import HostPort
    from qbsync.wire.transport import tune_socket

    budget = ByteBudget(512 * MiB)
    async with trio.open_nursery() as nursery:
        if spec["mode"].startswith("raw"):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            piece = spec["piece"]
            tls = spec.get("tls")
            ssl_context = server_ssl_context(*tls) if tls else None

            per_conn = spec["total"] // spec["conns"]

            async def sink(tcp: trio.SocketStream) -> None:
                tune_socket(tcp)
                buf = memoryview(bytearray(piece))
                got = 0
                stream: trio.abc.Stream = tcp
                if ssl_context is None:
                    while got < per_conn:
                        n = await tcp.socket.recv_into(buf[: min(piece, per_conn - got)])
                        if not n:
                            return
                        got += n
                else:  # what any TLS receiver must do: receive_some + copy into the buffer
                    stream = trio.SSLStream(tcp, ssl_context, server_side=True)
                    while got < per_conn:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        pos = got % piece
                        n = min(len(data), piece - pos)
                        buf[pos : pos + n] = data[:n]
                        got += len(data)
                await stream.send_all(b"k")  # "all received"

            nursery.start_soon(trio.serve_listeners, sink, listeners)
        else:
            tls = spec.get("tls")
            ssl_context = server_ssl_context(*tls) if tls else None
            ports = await nursery.start(
                functools.partial(
                    serve,
                    HostPort("127.0.0.1", 0),
                    AckHandler(spec["hash"]),
                    token=TOKEN,
                    ssl_context=ssl_context,
                    budget=budget,
                )
            )
            port = ports[0]
        emit({"port": port})
        await trio.to_thread.run_sync(sys.stdin.read)  # the driver closes stdin when done
        nursery.cancel_scope.cancel()
    cpu = os.times()
    emit(
        {
            "peak_rss_mb": peak_rss_mb(),
            "budget_peak_mb": budget.peak / MiB,
            "cpu_s": cpu.user + cpu.system,
        }
    )


# --- sender process ---------------------------------------------------------------------------


async def send_raw(spec: dict[str, Any]) -> float:
    from qbsync.wire.transport import tune_socket

    piece, conns = spec["piece"], spec["conns"]
    per_conn = spec["total"] // conns
    payload = memoryview(bytes(piece))

    tls = spec.get("tls")

    async def one() -> None:
        tcp = await trio.open_tcp_stream("127.0.0.1", spec["port"])
        tune_socket(tcp)
        stream: trio.abc.Stream = tcp
        if tls:
            from qbsync.wire import client_ssl_context

            stream = trio.SSLStream(tcp, client_ssl_context(tls[0]), server_hostname="127.0.0.1")
        sent = 0
        while sent < per_conn:
            n = min(piece, per_conn - sent)
            await stream.send_all(payload[:n])
            sent += n
        await stream.receive_some(1)  # the receiver got everything
        await trio.aclose_forcefully(stream)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(conns):
            nursery.start_soon(one)
    return time.perf_counter() - start


async def send_wire(spec: dict[str, Any]) -> float:
    from qbsync.wire import client_ssl_context, open_connection
    from qbsync.wire.address import HostPort

    piece = spec["piece"]
    count = spec["total"] // piece
    tls = spec.get("tls")
    ssl_context = client_ssl_context(tls[0]) if tls else None
    payload = bytes(piece)
    next_index = 0

    async def one() -> None:
        nonlocal next_index
        async with open_connection(
            HostPort("127.0.0.1", spec["port"]), token=TOKEN, ssl_context=ssl_context
        ) as conn:

            async def sender() -> None:
                nonlocal next_index
                while next_index < count:
                    index = next_index
                    next_index += 1
                    ack = await conn.send_piece(H, index, index * piece, payload)
                    assert ack.ok

            async with trio.open_nursery() as senders:
                for _ in range(SENDERS_PER_CONN):
                    senders.start_soon(sender)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(spec["conns"]):
            nursery.start_soon(one)
    return time.perf_counter() - start


def sender(spec: dict[str, Any]) -> None:
    raw = spec["mode"].startswith("raw")
    elapsed = trio.run(send_raw if raw else send_wire, spec)
    moved = spec["total"] // spec["piece"] * spec["piece"]
    if raw:
        moved = spec["total"] // spec["conns"] * spec["conns"]
    cpu = os.times()
    emit(
        {
            "seconds": elapsed,
            "mb_per_s": moved / elapsed / 1e6,
            "peak_rss_mb": peak_rss_mb(),
            "cpu_s": cpu.user + cpu.system,
        }
    )


# --- driver -----------------------------------------------------------------------------------


def make_cert(directory: Path) -> list[str] | None:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=bench",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return [str(cert), str(key)]


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One receiver process and one sender process."""
    cmd = [sys.executable, os.path.abspath(__file__)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    rx = subprocess.Popen(
        [*cmd, "--receiver", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert rx.stdout is not None and rx.stdin is not None
        port = json.loads(rx.stdout.readline())["port"]
        out = subprocess.run(
            [*cmd, "--sender", json.dumps({**spec, "port": port})],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        rx.stdin.close()
        stats = json.loads(rx.stdout.readline())
        rx.wait(timeout=30)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    return {
        **{k: spec[k] for k in ("mode", "piece", "total", "conns")},
        "mb_per_s": result["mb_per_s"],
        "sender_rss_mb": result["peak_rss_mb"],
        "receiver_rss_mb": stats["peak_rss_mb"],
        "budget_peak_mb": stats["budget_peak_mb"],
        "sender_cpu_s": result["cpu_s"],
        "receiver_cpu_s": stats["cpu_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--receiver", help=argparse.SUPPRESS)
    parser.add_argument("--sender", help=argparse.SUPPRESS)
    parser.add_argument("--total-mib", type=int, default=1024, help="bytes per case (MiB)")
    parser.add_argument("--tls-total-mib", type=int, default=256, help="bytes per TLS case")
    parser.add_argument("--sizes", default="1,4,16", help="piece sizes in MiB")
    parser.add_argument("--conns", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (fastest kept)")
    parser.add_argument("--hash", action="store_true", help="SHA-1 every piece in a thread")
    parser.add_argument("--no-tls", action="store_true")
    parser.add_argument("--flat-factor", type=int, default=10, help="0 skips the RSS case")
    args = parser.parse_args()
    if args.receiver:
        trio.run(receiver, json.loads(args.receiver))
        return 0
    if args.sender:
        sender(json.loads(args.sender))
        return 0

    sizes = [int(s) * MiB for s in args.sizes.split(",")]
    results: list[dict[str, Any]] = []
    header = (
        f"{'case':<10} {'piece':>6} {'MiB':>6} {'MB/s':>7} {'recv RSS MB':>12} "
        f"{'send RSS MB':>12} {'budget peak MiB':>16}"
    )

    def show(label: str, r: dict[str, Any]) -> None:
        print(
            f"{label:<10} {r['piece'] // MiB:>4}Mi {r['total'] // MiB:>6} {r['mb_per_s']:>7.0f} "
            f"{r['receiver_rss_mb']:>12.1f} {r['sender_rss_mb']:>12.1f} "
            f"{r['budget_peak_mb']:>16.1f}",
            flush=True,
        )

    def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
        top = dict(max(runs, key=lambda r: r["mb_per_s"]))
        for key in ("receiver_rss_mb", "sender_rss_mb", "budget_peak_mb"):
            top[key] = max(r[key] for r in runs)
        return top

    with tempfile.TemporaryDirectory() as tmp:
        tls = None if args.no_tls else make_cert(Path(tmp))
        base = {"conns": args.conns, "hash": args.hash}
        print(header)
        for piece in sizes:
            runs: dict[str, list[dict[str, Any]]] = {"raw": [], "wire": []}
            for _ in range(args.repeat):  # interleaved, so load changes hit both modes
                for mode in runs:
                    spec = {**base, "mode": mode, "piece": piece, "total": args.total_mib * MiB}
                    runs[mode].append(run_case(spec))
            for mode, mode_runs in runs.items():
                results.append(best(mode_runs))
                show(mode, results[-1])
            if tls:
                tls_runs: dict[str, list[dict[str, Any]]] = {"raw+tls": [], "wire+tls": []}
                for _ in range(max(1, args.repeat - 1)):
                    for mode in tls_runs:
                        spec = {
                            **base,
                            "mode": mode,
                            "piece": piece,
                            "total": max(args.tls_total_mib * MiB, piece * args.conns),
                            "tls": tls,
                        }
                        tls_runs[mode].append(run_case(spec))
                for mode, mode_runs in tls_runs.items():
                    results.append(best(mode_runs))
                    show(mode, results[-1])
        flat: dict[str, Any] | None = None
        if args.flat_factor:
            spec = {
                **base,
                "mode": "wire",
                "piece": 4 * MiB,
                "total": args.total_mib * MiB * args.flat_factor,
            }
            flat = run_case(spec)
            results.append(flat)
            show(f"wire x{args.flat_factor}", flat)

    def pick(mode: str, piece: int) -> dict[str, Any] | None:
        return next(
            (r for r in results if r["mode"] == mode and r["piece"] == piece and r is not flat),
            None,
        )

    ref = 4 * MiB if 4 * MiB in sizes else sizes[0]
    raw, wire, wire_tls = pick("raw", ref), pick("wire", ref), pick("wire+tls", ref)
    raw_tls = pick("raw+tls", ref)
    if raw_tls and wire_tls:
        print(
            f"TLS: wire+tls / raw+tls = {wire_tls['mb_per_s'] / raw_tls['mb_per_s']:.2f} "
            "(trio.SSLStream itself is the TLS ceiling)"
        )
    assert raw is not None and wire is not None
    wire_vs_raw = wire["mb_per_s"] / raw["mb_per_s"]
    tls_vs_raw = wire_tls["mb_per_s"] / raw["mb_per_s"] if wire_tls else float("nan")
    peak = max(r["receiver_rss_mb"] for r in results if r["mode"].startswith("wire"))
    if flat is not None:
        print(
            f"memory: {wire['total'] // MiB} MiB sent -> receiver peak RSS "
            f"{wire['receiver_rss_mb']:.0f} MB; {args.flat_factor}x more "
            f"({flat['total'] // MiB} MiB) -> {flat['receiver_rss_mb']:.0f} MB"
        )
    tag_mb_s = frame_tag_rate()
    print(
        f"RESULT wire_vs_raw={wire_vs_raw:.2f} tls_vs_raw={tls_vs_raw:.2f} peak_rss_mb={peak:.0f} "
        f"tag_mb_s={tag_mb_s:.0f}"
    )
    return 0


def frame_tag_rate(piece: int = 16 * MiB, rounds: int = 20) -> float:
    """MB/s of the per-frame tag (``wire.keys.FrameMac``) over ``piece``-byte payloads, in
    this process: the CPU each side spends per piece to authenticate it (the wire cases above
    include it; comparing their MB/s with a run of the version before tags shows it end to
    end). NaN before protocol 2 (no tags)."""
    try:
        from qbsync.wire.keys import FrameMac
    except ImportError:
        return float("nan")
    mac = FrameMac(bytes(32))
    header = bytes(64)
    payload = memoryview(bytearray(os.urandom(piece)))
    mac.tag(0, (header, payload))
    start = time.perf_counter()
    for n in range(rounds):
        mac.tag(n, (header, payload))
    elapsed = time.perf_counter() - start
    rate = piece * rounds / elapsed / 1e6
    print(
        f"frame tag: {rate:.0f} MB/s ({elapsed / rounds * 1e3:.2f} ms per {piece // MiB} MiB "
        "piece, payload not copied)"
    )
    return rate


if __name__ == "__main__":
    sys.exit(main())
