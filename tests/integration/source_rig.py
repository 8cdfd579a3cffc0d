"""Shared set-up for the source integration tests.

A rig is three real qbittorrent-nox instances -- a seeder, the *source* (downloading from the
seeder at a throttled rate) and the *destination* -- plus a real ``qbsync destination``
process. Tests start the real ``qbsync source`` process with the flags they need.

Tests take the ``rig`` fixture (or ``rig_factory`` for a non-default set-up); the package's
``conftest.py`` imports them from here, so every integration test module has them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest

from tests.metrics_scrape import metric as metric  # re-exported: the tests import it from here
from tests.metrics_scrape import scrape
from tests.qbharness import (
    KiB,
    MiB,
    QBInstance,
    QbsyncProcess,
    SeededTorrent,
    free_port,
    wait_until,
)

if TYPE_CHECKING:  # conftest imports this module's fixtures: no import back at run time
    from tests.integration.conftest import QbFactory, QbsyncFactory, SeededFactory

# ~6.3 MiB in 64 KiB pieces (~100 pieces), downloaded at 512 KiB/s: ~12 s.
FILES: dict[str, int] = {
    "a.bin": 2 * MiB + 12345,
    "b.bin": 3 * MiB - 777,
    "sub/c.bin": 1 * MiB - 7000,
}
PIECE = 64 * KiB
RATE = 512 * KiB


def histogram_quantile(port: int, name: str, q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` of a histogram (for reporting)."""
    buckets: list[tuple[float, float]] = []
    for line in scrape(port).splitlines():
        m = re.match(rf'^{name}_bucket\{{le="([^"]+)"\}} (\S+)$', line)
        if m:
            buckets.append((float(m.group(1)), float(m.group(2))))
    total = buckets[-1][1] if buckets else 0.0
    for le, count in buckets:
        if total and count >= q * total:
            return le
    return float("nan")


def http_status(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (from /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def tags_of(inst: QBInstance, info_hash: str) -> set[str]:
    info = inst.info(info_hash)
    if not info:
        return set()
    return {t.strip() for t in str(info.get("tags") or "").split(",") if t.strip()}


@attrs.define
class Rig:
    tmp: Path
    qb_factory: QbFactory
    qbsync_factory: QbsyncFactory
    seeded: SeededTorrent
    src_qb: QBInstance
    dst_qb: QBInstance
    dest: QbsyncProcess | None = None
    dest_port: int = 0
    dest_health: int = 0
    token: str = attrs.field(factory=lambda: secrets.token_hex(16))
    state_dir: Path = attrs.field(init=False)
    sources: list[QbsyncProcess] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.state_dir = self.tmp / "source-state"

    @property
    def info_hash(self) -> str:
        return self.seeded.info_hash

    @property
    def dst_data(self) -> Path:
        return self.dst_qb.save_path

    def start_destination(self, *extra: str, reach: Sequence[str] | None = None) -> QbsyncProcess:
        """The rig's ``qbsync destination``, listening on ``dest_port`` (or with ``reach``
        instead, e.g. ``["--connect", addr]``)."""
        if not self.dest_port:
            self.dest_port, self.dest_health = free_port(), free_port()
        self.dest = self.qbsync_factory(
            "destination",
            [
                "--data",
                str(self.dst_data),
                *(reach if reach is not None else ["--listen", f"127.0.0.1:{self.dest_port}"]),
                *self.dst_qb.qbsync_args(),
                "--health-addr",
                f"127.0.0.1:{self.dest_health}",
                "--auth-token",
                self.token,
                "--poll-interval",
                "0.5",
                *extra,
            ],
        )
        self.dest.wait_for_log("event=destination_ready", timeout=120)
        return self.dest

    def start_source(
        self,
        *extra: str,
        token: str | None = None,
        health_port: int | None = None,
        wait_started: bool = True,
        env: Mapping[str, str] | None = None,
        qb: QBInstance | None = None,
        state_dir: Path | None = None,
        reach: Sequence[str] | None = None,
    ) -> tuple[QbsyncProcess, int]:
        """A real ``qbsync source`` for the rig's source qBittorrent (or ``qb``), dialing the
        rig's destination (or with ``reach`` instead, e.g. ``["--listen", addr]``)."""
        port = health_port or free_port()
        qb = qb or self.src_qb
        proc = self.qbsync_factory(
            "source",
            [
                "--data",
                str(qb.save_path),
                *qb.qbsync_args(),
                *(
                    reach
                    if reach is not None
                    else ["--destination-addr", f"127.0.0.1:{self.dest_port}"]
                ),
                "--state-dir",
                str(state_dir or self.state_dir),
                "--sleep",
                "1",
                "--health-addr",
                f"127.0.0.1:{port}",
                *(
                    ["--auth-token", token if token is not None else self.token]
                    if token != ""
                    else []
                ),
                "--min-connections",
                "1",
                "--max-connections",
                "2",
                "--piece-timeout",
                "20",
                "--reconnect-max-delay",
                "2",
                *extra,
            ],
            env=env,
        )
        self.sources.append(proc)
        if wait_started:
            proc.wait_for_log("event=started", timeout=120)
        return proc, port

    def add_to_source(self, *, download_limit: int | None = RATE, **kw: Any) -> None:
        self.seeded.add_to(self.src_qb, download_limit=download_limit, **kw)

    def dest_file(self, rel: str, sub: str = "") -> Path:
        base = self.dst_data / sub if sub else self.dst_data
        return base / self.seeded.name / rel

    def source_progress(self) -> float:
        info = self.src_qb.info(self.info_hash)
        return float(info["progress"]) if info else 0.0

    def dest_state_dirs(self) -> list[Path]:
        """The destination's per-torrent state directories (``<data>/.qbsync/<hash>``)."""
        root = self.dst_data / ".qbsync"
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []

    def dest_partials(self) -> list[Path]:
        return sorted(self.dst_data.rglob("*.partial"))

    def dest_clean(self) -> bool:
        """No partial data and no torrent state left on the destination."""
        return not self.dest_partials() and not self.dest_state_dirs()

    def wait_synced(self, timeout: float = 90, dest_timeout: float = 30) -> None:
        """Until the torrent carries ``synced`` on the source, then on the destination."""
        ih = self.info_hash
        wait_until(lambda: "synced" in tags_of(self.src_qb, ih), timeout, 0.2, "source synced")
        wait_until(
            lambda: "synced" in tags_of(self.dst_qb, ih), dest_timeout, 0.2, "destination synced"
        )

    def wait_source_files_deleted(self, timeout: float = 60) -> None:
        """Wait until the source qBittorrent has deleted the torrent's files. It drops the
        torrent from its list first and deletes the files afterwards, in the background, so
        "no longer listed" does not mean "files gone" yet on a busy machine."""
        content = self.src_qb.save_path / self.seeded.name
        wait_until(lambda: not content.exists(), timeout, 0.2, f"{content} deleted")

    def assert_identical(self, files: Mapping[str, int] = FILES) -> None:
        """Every file on the destination holds exactly the seeded bytes."""
        for rel in files:
            assert self.dest_file(rel).read_bytes() == self.seeded.expected_bytes(rel), rel


def make_rig(
    tmp: Path,
    qb_factory: QbFactory,
    seeded_torrent: SeededFactory,
    qbsync_factory: QbsyncFactory,
    *,
    files: Mapping[str, int] | None = None,
    src_kwargs: Mapping[str, Any] | None = None,
    start_destination: bool = True,
) -> Rig:
    seeded = seeded_torrent(dict(files or FILES), piece_size=PIECE)
    src_qb = qb_factory("source", **dict(src_kwargs or {}))
    dst_qb = qb_factory("destination")
    rig = Rig(tmp, qb_factory, qbsync_factory, seeded, src_qb, dst_qb)
    if start_destination:
        rig.start_destination()
    return rig


RigFactory = Callable[..., Rig]


@pytest.fixture(name="rig_factory")
def rig_factory_fixture(
    tmp_path: Path,
    qb_factory: QbFactory,
    seeded_torrent: SeededFactory,
    qbsync_factory: QbsyncFactory,
) -> RigFactory:
    """``rig_factory(**make_rig_options) -> Rig`` (e.g. ``start_destination=False``)."""

    def factory(**kw: Any) -> Rig:
        return make_rig(tmp_path, qb_factory, seeded_torrent, qbsync_factory, **kw)

    return factory


@pytest.fixture(name="rig")
def rig_fixture(rig_factory: RigFactory) -> Rig:
    """The default rig, its destination daemon already running."""
    return rig_factory()
