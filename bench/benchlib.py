"""Shared pieces of the end-to-end benchmarks: real qbittorrent-nox and qbsync processes on
127.0.0.1, an rsync daemon, metric scraping, peak RSS.

The benchmarks reuse the integration tests' harness (``tests/qbharness.py``), so they run
from a fresh clone with ``make bench-...`` (which creates the virtualenv) and need only
``qbittorrent-nox`` and ``rsync`` installed. Every process started here is stopped by its own
PID when the :class:`Stack` closes.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.metrics_scrape import metric as metric  # re-exported: the scripts import it from here
from tests.metrics_scrape import samples
from tests.qbharness import (
    QBInstance,
    QbsyncProcess,
    free_port,
    make_torrent,
    wait_until,
)

from qbsync.qbittorrent.instance import stop_process

MiB = 1024 * 1024
KiB = 1024


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


GiB = 1024 * MiB


def print_result(result: Mapping[str, object]) -> None:
    """The one ``RESULT key=value ...`` line every bench ends with (what CI and people grep)."""
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``median (min-max)`` of several rounds: one round on a shared machine proves little."""
    if not values:
        return "n/a"
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def median_and_range(key: str, values: Sequence[float], fmt: str = "{:.2f}") -> dict[str, str]:
    """RESULT fields ``key``, ``key_min``, ``key_max`` for a ratio measured over rounds: the
    median and how far the rounds spread (one round on a shared machine proves little)."""
    return {
        key: fmt.format(median(values)),
        f"{key}_min": fmt.format(min(values)),
        f"{key}_max": fmt.format(max(values)),
    }


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` (root only): the next reads come from disk.
    False when not permitted (not root, or a container without a writable /proc/sys)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def cpu_seconds_with_children(pid: int) -> float:
    """:func:`cpu_seconds` plus the CPU time of the children ``pid`` has reaped (an rsync
    daemon forks one child per connection and reaps it when it exits)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields[11:15]) / ticks


def peak_rss_mb(pid: int) -> float:
    """``VmHWM`` (peak resident set) of a running process, in MB (MiB)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def metric_by_label(port: int, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for got, value in samples(port, name):
        key = got.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def split_files(
    total: int, names: Sequence[str] = ("a.bin", "sub/b.bin", "c.bin")
) -> dict[str, int]:
    """``total`` bytes over a few files of uneven sizes (none piece-aligned)."""
    shares = [0.5, 0.3]
    sizes = [int(total * s) - 12345 * (i + 1) for i, s in enumerate(shares)]
    sizes.append(total - sum(sizes))
    return dict(zip(names, sizes, strict=True))


def tags(inst: QBInstance, info_hash: str) -> set[str]:
    info = inst.info(info_hash)
    if not info:
        return set()
    return {t.strip() for t in str(info.get("tags") or "").split(",") if t.strip()}


class Stack:
    """Processes of one benchmark run under one temporary directory."""

    def __init__(self, root: Path | None = None, keep: bool = False) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="qbsync-bench-"))
        self.keep = keep
        self.qbs: list[QBInstance] = []
        self.procs: list[QbsyncProcess] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self.spies: list[subprocess.Popen[bytes]] = []
        self.token = secrets.token_hex(16)
        self.rsync_pid = 0

    def qb(self, name: str, **kw: Any) -> QBInstance:
        inst = QBInstance(
            name, self.root / f"qb-{name}", refresh_ms=kw.pop("refresh_ms", 250), **kw
        )
        self.qbs.append(inst)
        return inst

    def destination_process(
        self,
        data: Path,
        *extra: str,
        env: Mapping[str, str] | None = None,
        log_name: str = "",
    ) -> tuple[QbsyncProcess, int, int]:
        """A destination daemon on ``data`` with this stack's token, listening and serving
        health on free ports: (process, port, health port). Not started (a caller may time its
        start-up); the stack stops it when it closes."""
        port, health = free_port(), free_port()
        while health == port:
            health = free_port()
        proc = QbsyncProcess(
            "destination",
            [
                "--data",
                str(data),
                "--listen",
                f"127.0.0.1:{port}",
                "--health-addr",
                f"127.0.0.1:{health}",
                "--auth-token",
                self.token,
                *extra,
            ],
            env,
            self.root / (log_name or f"qbsync-destination-{len(self.procs)}.log"),
        )
        self.procs.append(proc)
        return proc, port, health

    def destination(
        self, dst: QBInstance, *extra: str, env: Mapping[str, str] | None = None
    ) -> tuple[QbsyncProcess, int, int]:
        """A started, ready destination daemon in front of qBittorrent ``dst``."""
        proc, port, health = self.destination_process(
            dst.save_path, *dst.qbsync_args(), *extra, env=env
        )
        proc.start()
        proc.wait_for_log("event=destination_ready", timeout=60)
        return proc, port, health

    def source(
        self,
        src: QBInstance,
        dest_port: int,
        *extra: str,
        env: Mapping[str, str] | None = None,
        state_dir: Path | None = None,
    ) -> tuple[QbsyncProcess, int]:
        health = free_port()
        proc = QbsyncProcess(
            "source",
            [
                "--data",
                str(src.save_path),
                *src.qbsync_args(),
                "--destination-addr",
                f"127.0.0.1:{dest_port}",
                "--state-dir",
                str(state_dir or self.root / f"source-state-{len(self.procs)}"),
                "--health-addr",
                f"127.0.0.1:{health}",
                "--auth-token",
                self.token,
                *extra,
            ],
            env,
            self.root / f"qbsync-source-{len(self.procs)}.log",
        )
        self.procs.append(proc)
        proc.start()
        proc.wait_for_log("event=started", timeout=60)
        return proc, health

    def rsync_daemon(self, modules: Mapping[str, Path]) -> int:
        """``rsync --daemon`` on 127.0.0.1 and a free port, read-only modules; returns the port."""
        port = free_port()
        conf = self.root / "rsyncd.conf"
        lines = [
            "use chroot = no",
            "read only = yes",
            f"pid file = {self.root / 'rsyncd.pid'}",
            f"log file = {self.root / 'rsyncd.log'}",
        ]
        if os.getuid() == 0:  # the default "nobody" cannot enter mkdtemp()'s 0700 directory
            lines += ["uid = root", "gid = root"]
        for name, path in modules.items():
            lines += [f"[{name}]", f"path = {path}"]
        conf.write_text("\n".join(lines) + "\n")
        proc = subprocess.Popen(
            [
                "rsync",
                "--daemon",
                "--no-detach",
                f"--config={conf}",
                "--address=127.0.0.1",
                f"--port={port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.others.append(proc)
        self.rsync_pid = proc.pid  # for its CPU time (children included)

        def listening() -> bool:
            with contextlib.suppress(OSError):
                import socket

                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            return False

        wait_until(listening, 10, 0.05, "rsync daemon listening")
        return port

    def profile(self, pid: int, out: Path) -> None:
        """Sample ``pid`` with py-spy (``pip install -e '.[bench]'``) until the stack closes;
        collapsed stacks, threads and idle frames included, written to ``out``."""
        out.parent.mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        proc = subprocess.Popen(
            [
                *(spy, "record", "--pid", str(pid), "--format", "raw", "--threads", "--idle"),
                *("--rate", "200", "--nonblocking", "-o", str(out)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.spies.append(proc)

    def close(self) -> None:
        for spy in self.spies:  # SIGINT makes py-spy write its output
            with contextlib.suppress(Exception):
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        for other in self.others:
            with contextlib.suppress(Exception):
                stop_process(other, 10)
        for inst in self.qbs:
            with contextlib.suppress(Exception):
                inst.stop()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            print(f"kept {self.root}", file=sys.stderr)


@contextlib.contextmanager
def stack(keep: bool = False) -> Iterator[Stack]:
    s = Stack(keep=keep)
    try:
        yield s
    finally:
        s.close()


def write_payload(root: Path, files: Mapping[str, int], seed: int) -> None:
    """Pseudo-random files under ``root``, written in 64 MiB chunks (``random.randbytes``
    cannot make more than 256 MiB at once)."""
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"{seed}:{rel}")
        with open(path, "wb") as fh:
            left = size
            while left:
                n = min(left, 64 * MiB)
                fh.write(rng.randbytes(n))
                left -= n


def new_torrent(where: Path, files: Mapping[str, int], piece: int, seed: int) -> tuple[bytes, str]:
    """Write a payload directory ``where`` and return its ``.torrent`` and info-hash."""
    write_payload(where, files, seed)
    return make_torrent(where, piece)


def add_complete(inst: QBInstance, torrent: bytes, info_hash: str, save_path: Path) -> None:
    """Add a torrent whose data is already in ``save_path`` as complete (skip-checking): the
    moment it is listed is the moment it "completes" on that qBittorrent."""
    result = inst.api.torrents_add(
        torrent_files={f"{info_hash}.torrent": torrent},
        save_path=str(save_path),
        is_skip_checking=True,
        content_layout="Original",
    )
    if result != "Ok.":
        raise RuntimeError(f"torrents_add returned {result!r}")


def poll(pred: Any, timeout: float, interval: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def delivery_window(
    dhealth: int, base: float, total: int, t0: float, timeout: float, interval: float
) -> tuple[float, float]:
    """Seconds after ``t0`` (monotonic) at which the destination behind health port ``dhealth``
    had received its first byte and ``total`` bytes beyond ``base`` (its counter before the
    case began): the streaming window a benchmark divides the payload by."""
    first = 0.0
    while True:
        got = metric(dhealth, "bytes_received_total") - base
        now = time.monotonic() - t0
        if got > 0 and not first:
            first = now
        if got >= total:
            return first, now
        if now > timeout:
            raise TimeoutError(f"payload not delivered in {timeout:g} s")
        time.sleep(interval)
