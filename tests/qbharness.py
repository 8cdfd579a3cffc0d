"""Test harness: real qbittorrent-nox instances and real qbsync processes on loopback.

The qBittorrent instances themselves come from :mod:`qbsync.qbittorrent.instance`
(``qbsync demo`` uses them too). Every qBittorrent instance gets
a *generated* profile written before its first start (a default profile would enable DHT, LSD,
UPnP and a GeoIP download from the internet), listens only on 127.0.0.1 with ports from
:func:`free_port`, and is stopped by its own PID. Several helpers run test suites at the same
time on this machine, so nothing here uses a fixed port, a fixed path or a broad ``pkill``.

The pytest fixtures that wrap these classes (``qb_factory``, ``seeded_torrent``,
``qbsync_factory``) live in ``tests/integration/conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import attrs
import pytest
import qbittorrentapi
import torf

from qbsync.qbittorrent.instance import (
    QB_USERNAME,
    SEEDING_STATES,
    KiB,
    MiB,
    free_port,
    make_payload,
    qb_password_conf_value,
    stop_process,
    wait_until,
)
from qbsync.qbittorrent.instance import QBInstance as _QBInstance

QB_BINARY = os.environ.get("QBSYNC_TEST_QB_BINARY", "qbittorrent-nox")

__all__ = [
    "QB_USERNAME",
    "SEEDING_STATES",
    "KiB",
    "MiB",
    "PeerNudger",
    "QBInstance",
    "QbsyncProcess",
    "SeededTorrent",
    "free_port",
    "make_payload",
    "make_self_signed",
    "make_torrent",
    "qb_password_conf_value",
    "read_piece",
    "torrent_files",
    "wait_until",
]


def make_torrent(path: Path, piece_size: int) -> tuple[bytes, str]:
    """Create a trackerless, non-private v1 ``.torrent`` for ``path`` (file or directory).

    Returns ``(torrent bytes, hex info-hash)``. ``private=None`` leaves the key out entirely
    (``False`` would write ``private=0``); no trackers, so nothing is ever announced.
    """
    t = torf.Torrent(path=path, private=None, piece_size=piece_size, created_by=None)
    t.generate()
    data: bytes = t.dump()
    return data, str(t.infohash)


class QBInstance(_QBInstance):
    """:class:`qbsync.qbittorrent.instance.QBInstance` running ``$QBSYNC_TEST_QB_BINARY`` if set."""

    binary = QB_BINARY


class PeerNudger:
    """Points each watched download at the seeder again, and the seeder at it, while the
    download is incomplete and has no seed connected: every :attr:`INTERVAL` seconds, until
    :meth:`close`.

    There is no tracker, DHT or LSD on loopback, so the one ``torrents_add_peers`` call is all
    that tells a downloader where the seeder is, and after a connection attempt that failed
    qBittorrent waits about a minute before it dials that peer again (measured here: a seeder
    frozen through the first attempt was dialled again 55 s after it resumed). Asking the
    seeder to dial the downloader, which it has no failure on record for, connects at once.
    ``qbsync demo`` does the same for its source (``qbsync.demo.run.PEER_NUDGE_INTERVAL``).
    One thread per test (the ``seeded_torrent`` fixture owns it and closes it before any
    qBittorrent stops), with its own API client per instance so it never shares the test's
    HTTP session.
    """

    INTERVAL = 3.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: list[tuple[QBInstance, SeededTorrent]] = []
        self._clients: dict[int, qbittorrentapi.Client] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-nudger", daemon=True)

    def watch(self, inst: QBInstance, seeded: SeededTorrent) -> None:
        with self._lock:
            self._watched.append((inst, seeded))
            if not self._thread.is_alive() and not self._closed.is_set():
                self._thread.start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            started = self._thread.ident is not None
        if started:
            self._thread.join()

    def _run(self) -> None:
        while not self._closed.wait(self.INTERVAL):
            with self._lock:
                watched = list(self._watched)
            for inst, seeded in watched:
                self._nudge(inst, seeded)

    def _client(self, inst: QBInstance) -> qbittorrentapi.Client:
        client = self._clients.get(id(inst))
        if client is None:
            client = self._clients[id(inst)] = qbittorrentapi.Client(
                host=inst.url,
                FORCE_SCHEME_FROM_HOST=True,
                username=inst.username,
                password=inst.password,
                REQUESTS_ARGS={"timeout": (2, 10)},
                DISABLE_LOGGING_DEBUG_OUTPUT=True,
            )
        return client

    def _nudge(self, inst: QBInstance, seeded: SeededTorrent) -> None:
        seeder = seeded.seeder
        if not (inst.running() and seeder.running()):
            return  # stopped, or between the two halves of a restart
        try:
            found = self._client(inst).torrents_info(torrent_hashes=seeded.info_hash)
            if not found or found[0].progress >= 1 or found[0].num_seeds > 0:
                return
            # Both ways: the downloader holds back a seeder whose connection failed, but the
            # seeder has no such record of the downloader and dials it at once.
            self._client(inst).torrents_add_peers(
                peers=f"127.0.0.1:{seeder.bt_port}", torrent_hashes=seeded.info_hash
            )
            self._client(seeder).torrents_add_peers(
                peers=f"127.0.0.1:{inst.bt_port}", torrent_hashes=seeded.info_hash
            )
        except qbittorrentapi.APIError:
            return  # an instance is stopping or restarting (tests do both): next round


@attrs.define
class SeededTorrent:
    """A generated torrent that ``seeder`` is seeding from ``payload``."""

    seeder: QBInstance
    torrent: bytes
    info_hash: str
    payload: Path  # the torrent's content path (directory of a multi-file torrent)
    files: dict[str, int]  # relative path inside the torrent -> size
    piece_size: int
    seed: int
    nudger: PeerNudger | None = None  # keeps re-adding the seeder to downloads: see PeerNudger

    @property
    def name(self) -> str:
        return self.payload.name

    @property
    def total_size(self) -> int:
        return sum(self.files.values())

    @property
    def num_pieces(self) -> int:
        return -(-self.total_size // self.piece_size)

    def add_to(
        self,
        inst: QBInstance,
        *,
        save_path: Path | None = None,
        download_limit: int | None = None,
        paused: bool = False,
        tags: Iterable[str] = (),
        category: str | None = None,
        connect: bool = True,
    ) -> None:
        """Add the torrent to ``inst`` and point it at the seeder (there is no tracker or DHT)."""
        kwargs: dict[str, Any] = {}
        if download_limit is not None:
            kwargs["download_limit"] = download_limit
        if tags:
            kwargs["tags"] = list(tags)
        if category is not None:
            kwargs["category"] = category
        result = inst.api.torrents_add(
            torrent_files={f"{self.info_hash}.torrent": self.torrent},
            save_path=str(save_path if save_path is not None else inst.save_path),
            is_paused=paused,
            **kwargs,
        )
        if result != "Ok.":
            raise RuntimeError(f"{inst.name}: torrents_add returned {result!r}")
        wait_until(lambda: inst.info(self.info_hash), 120, 0.05, f"{inst.name} lists torrent")
        if connect:
            self.connect(inst)

    def connect(self, inst: QBInstance) -> None:
        inst.api.torrents_add_peers(
            peers=f"127.0.0.1:{self.seeder.bt_port}", torrent_hashes=self.info_hash
        )
        if self.nudger is not None:
            self.nudger.watch(inst, self)

    def expected_bytes(self, rel: str) -> bytes:
        return (self.payload / rel).read_bytes()


class QbsyncProcess:
    """A real ``qbsync source|destination`` subprocess; output (stdout+stderr) goes to a file.

    The environment is the test runner's minus any ``QBSYNC_*`` and conventional port
    variables (so a developer's shell cannot change a test), plus ``env``.
    """

    _SCRUB_PREFIXES = ("QBSYNC_",)
    _SCRUB_NAMES = frozenset({"HTTP_PORT", "HEALTH_PORT", "GRPC_PORT", "PORT"})

    def __init__(
        self,
        role: str,
        args: list[str],
        env: Mapping[str, str] | None,
        log_path: Path,
    ) -> None:
        self.role = role
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "qbsync.cli", self.role, *self.args]

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def start(self) -> QbsyncProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(self._SCRUB_PREFIXES) and k not in self._SCRUB_NAMES
        }
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log_path, "ab")  # noqa: SIM115  # closed in stop()/wait()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT, env=env
        )
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, SIGKILL fallback. Returns the exit code."""
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout)
        self._close()
        return code

    def kill(self) -> int | None:
        """SIGKILL our own PID (a crash, as far as the daemon can tell) and reap it."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        self._close()
        return code

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, "not running"
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; returns its exit code."""
        assert self.proc is not None, "not started"
        code = self.proc.wait(timeout)
        self._close()
        return code

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, substring: str, timeout: float = 30.0) -> str:
        """Wait until ``substring`` appears in the output; returns the whole output.

        Fails at once (not after ``timeout``) when the process exits without printing it.
        """

        def seen() -> str:
            text = self.log_text()
            if substring in text:
                return text
            if self.proc is not None and self.proc.poll() is not None:
                text = self.log_text()
                if substring in text:
                    return text
                raise AssertionError(
                    f"qbsync {self.role} exited with {self.proc.returncode} before logging "
                    f"{substring!r}; output:\n{_tail(text)}"
                )
            return ""

        try:
            return wait_until(seen, timeout, 0.05, f"qbsync {self.role} to log {substring!r}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; output:\n{_tail(self.log_text())}") from None

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return f"QbsyncProcess({self.role!r}, pid={pid}, log={self.log_path})"


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def read_piece(root: Path, files: list[tuple[str, int]], piece_size: int, index: int) -> bytes:
    """Read piece ``index`` of a torrent from disk. ``files`` is ``[(path, size), ...]`` in
    torrent order, paths relative to ``root``."""
    start, end = index * piece_size, (index + 1) * piece_size
    out = bytearray()
    pos = 0
    for rel, size in files:
        s, e = max(start, pos), min(end, pos + size)
        if s < e:
            with open(root / rel, "rb") as fh:
                fh.seek(s - pos)
                out += fh.read(e - s)
        pos += size
    return bytes(out)


def torrent_files(torrent: bytes) -> tuple[int, list[tuple[str, int]], list[bytes]]:
    """``(piece length, [(path incl. torrent name, size)], [sha1 per piece])`` of a v1 torrent."""
    import io

    t = torf.Torrent.read_stream(io.BytesIO(torrent))
    info = t.metainfo["info"]
    pieces: bytes = info["pieces"]
    hashes = [pieces[i : i + 20] for i in range(0, len(pieces), 20)]
    if "files" in info:
        files = [("/".join([info["name"], *f["path"]]), int(f["length"])) for f in info["files"]]
    else:
        files = [(info["name"], int(info["length"]))]
    return int(info["piece length"]), files, hashes


def make_self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A throwaway self-signed EC certificate valid for 127.0.0.1 and localhost.

    Needs the openssl CLI (the test is skipped without it); used by the wire and source TLS
    tests.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
