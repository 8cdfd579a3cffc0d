"""Local qBittorrent instances on 127.0.0.1 with generated, isolated profiles.

``qbsync demo`` and the integration tests both need to start throwaway ``qbittorrent-nox``
processes that never talk beyond loopback: a default profile would enable DHT, LSD, UPnP and
a GeoIP download from the internet, so every instance gets a profile written before its first
start, listens only on 127.0.0.1 with ports from :func:`free_port`, and is stopped by its own
PID (several copies may run on one machine at once, so nothing here uses a fixed port, a fixed
path or a broad ``pkill``). The test harness (``tests/qbharness.py``) builds on this module.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import qbittorrentapi

KiB = 1024
MiB = 1024 * KiB

QB_USERNAME = "admin"
# States in which a torrent with all data present is seeding (4.x and 5.x names).
SEEDING_STATES = frozenset({"stalledUP", "uploading", "queuedUP", "forcedUP"})

T = TypeVar("T")


# Ports handed out by free_port(): a block below the kernel's ephemeral range. Its upper half
# is for any process; its lower half is cut into PORT_SLOTS disjoint slots, one per process
# that asks for one with use_port_slot (the test suite gives each pytest-xdist worker its
# own). Each process walks its part in order from a random start. See free_port for why.
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_BLOCK_LOW = 10000
_MIN_BLOCK = 4096
PORT_SLOTS = 8
_port_lock = threading.Lock()
_port_cursor: int | None = None
_port_slot: int | None = None


def use_port_slot(index: int) -> None:
    """From now on, this process's :func:`free_port` draws from slot ``index`` (0 to
    ``PORT_SLOTS - 1``), which no process without that slot draws from: processes given
    different slots are never handed the same port."""
    global _port_slot, _port_cursor
    if not 0 <= index < PORT_SLOTS:
        raise ValueError(f"port slot {index} is not in 0..{PORT_SLOTS - 1}")
    with _port_lock:
        _port_slot, _port_cursor = index, None


def _port_block() -> tuple[int, int] | None:
    """[low, high) this process draws from: its slot, or the upper half of the block below the
    kernel's ephemeral range; None when that leaves too little room."""
    try:
        ephemeral_low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    if ephemeral_low - _BLOCK_LOW < _MIN_BLOCK:
        return None
    half = _BLOCK_LOW + (ephemeral_low - _BLOCK_LOW) // 2
    if _port_slot is None:
        return half, ephemeral_low
    size = (half - _BLOCK_LOW) // PORT_SLOTS
    return _BLOCK_LOW + _port_slot * size, _BLOCK_LOW + (_port_slot + 1) * size


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago and that this process has not handed
    out before (until its part of the block wraps around).

    The port is closed again when this returns, so there is a window before the caller's
    process binds it. Asking the kernel for a port (binding to port 0) picks at random from the
    ephemeral range, so two processes doing this at once -- two pytest-xdist workers, the demo
    beside a test -- can be handed the same port in that window, and outgoing connections draw
    from the same range. Instead each process walks a part of a block *below* the ephemeral
    range (the kernel never hands those out on its own) in order, from a random start, so it
    never repeats itself. Random starts alone are not enough: two walkers that start near each
    other keep colliding as they go (seen: a dozen tests of one run failed that way). So
    processes that run side by side take disjoint slots (:func:`use_port_slot`); the rest share
    the block's upper half. :class:`QBInstance` also retries with new ports when qBittorrent
    cannot bind.
    """
    global _port_cursor
    with _port_lock:
        block = _port_block()
        if block is not None:
            low, high = block
            if _port_cursor is None or not low <= _port_cursor < high:
                _port_cursor = low + secrets.randbelow(high - low)
            for _ in range(high - low):
                port = _port_cursor
                _port_cursor = low + (_port_cursor + 1 - low) % (high - low)
                if _bindable(port):
                    return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        kernel_port: int = s.getsockname()[1]
        return kernel_port


def wait_until(
    pred: Callable[[], T],
    timeout: float,
    interval: float = 0.1,
    what: str = "",
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``pred`` until it returns something truthy and return that value.

    Raises :class:`TimeoutError` naming ``what`` and the last value seen. Exceptions from
    ``pred`` propagate (a broken predicate must fail the test, not time out) unless they are
    instances of ``ignore`` -- e.g. ``IndexError`` while a torrent is not listed yet.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = pred()
        except ignore as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout:g}s waiting for {what or pred!r}; last: {last!r}"
            )
        time.sleep(interval)


def make_payload(root: Path, files: Mapping[str, int], seed: int = 0) -> Path:
    """Write deterministic pseudo-random files under ``root`` and return ``root``.

    ``files`` maps relative paths (``"sub/c.bin"``) to sizes. The content depends only on
    ``seed``, the path and the size, so two calls produce identical bytes (handy to place the
    "same" data on a destination) and different seeds produce different bytes.
    """
    root.mkdir(parents=True, exist_ok=True)
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"{seed}:{rel}")
        path.write_bytes(rng.randbytes(size))
    return root


def qb_password_conf_value(password: str) -> str:
    """The ``WebUI\\Password_PBKDF2`` value qBittorrent 4.2+ expects (PBKDF2-HMAC-SHA512)."""
    salt = os.urandom(16)
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 100_000, dklen=64)
    return f'"@ByteArray({base64.b64encode(salt).decode()}:{base64.b64encode(key).decode()})"'


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM our own child, wait, SIGKILL if it does not go; always reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.wait()


class QBInstance:
    """One real ``qbittorrent-nox`` on 127.0.0.1 with a generated, isolated profile.

    ``LocalHostAuth`` is off unless ``password`` is given, so ``api`` needs no login. With a
    password, the WebUI requires ``username``/``password`` (``MaxAuthenticationFailCount`` is
    raised so a test with a wrong password does not ban 127.0.0.1 for an hour).

    ``hardened`` (what ``qbsync demo`` runs; it needs a ``password``) turns the WebUI's own
    defences back on: CSRF protection (a request whose ``Origin``/``Referer`` is another site
    is refused), Host-header validation (only ``127.0.0.1`` and ``localhost``) and the default
    ban after failed logins. The test harness keeps them off: its clients are this process.
    """

    binary = "qbittorrent-nox"  # the executable; a subclass or instance may point elsewhere
    new_session = False  # start in its own session (a terminal's Ctrl-C does not reach it)

    def __init__(
        self,
        name: str,
        root: Path,
        *,
        refresh_ms: int = 250,
        save_path: Path | None = None,
        temp_path: Path | None = None,
        incomplete_ext: bool = False,
        password: str | None = None,
        start: bool = True,
        start_timeout: float = 30.0,
        hardened: bool = False,
    ) -> None:
        if hardened and password is None:
            raise ValueError("a hardened WebUI needs a password")
        self.hardened = hardened
        self.name = name
        self.root = root
        self.profile = root / "profile"
        self.save_path = save_path if save_path is not None else root / "downloads"
        self.temp_path = temp_path
        self.incomplete_ext = incomplete_ext
        self.refresh_ms = refresh_ms
        self.username: str | None = QB_USERNAME if password is not None else None
        self.password = password
        self.start_timeout = start_timeout
        self.webui_port = 0
        self.bt_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._log_offset = 0
        self.api: qbittorrentapi.Client = None  # type: ignore[assignment]  # set by start()
        self.save_path.mkdir(parents=True, exist_ok=True)
        if temp_path is not None:
            temp_path.mkdir(parents=True, exist_ok=True)
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.webui_port}"

    @property
    def conf_path(self) -> Path:
        return self.profile / "qBittorrent" / "config" / "qBittorrent.conf"

    @property
    def log_path(self) -> Path:
        """qBittorrent's own log (the process's stdout is in ``<root>/stdout.log``)."""
        return self.profile / "qBittorrent" / "data" / "logs" / "qbittorrent.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def qbsync_args(self, *, password_in_env: bool = False) -> list[str]:
        """``--qb-url`` (and credentials, if any) for a qbsync process talking to this instance.
        With ``password_in_env`` the password is left out: pass :meth:`qbsync_env` instead (an
        argv is readable by every local user through ``ps``)."""
        args = ["--qb-url", self.url]
        if self.password is not None:
            args += ["--qb-username", QB_USERNAME]
            if not password_in_env:
                args += ["--qb-password", self.password]
        return args

    def qbsync_env(self, role: str) -> dict[str, str]:
        """The environment carrying this instance's password to a ``qbsync <role>``."""
        if self.password is None:
            return {}
        return {f"QBSYNC_{role.upper()}_QB_PASSWORD": self.password}

    def _write_conf(self) -> None:
        # The WebUI always gets a password hash, even with LocalHostAuth off, so there is never
        # a well-known default password on a listening port.
        password = self.password if self.password is not None else secrets.token_hex(16)
        temp = self.temp_path
        lines = [
            "[LegalNotice]",
            "Accepted=true",
            "",
            "[Network]",
            "PortForwardingEnabled=false",
            "",
            "[BitTorrent]",
            f"Session\\Port={self.bt_port}",
            "Session\\Interface=lo",
            "Session\\InterfaceName=lo",
            "Session\\InterfaceAddress=127.0.0.1",
            "Session\\DHTEnabled=false",
            "Session\\PeXEnabled=false",
            "Session\\LSDEnabled=false",
            "Session\\MultiConnectionsPerIp=true",
            "Session\\BTProtocol=TCP",
            f"Session\\RefreshInterval={self.refresh_ms}",
            "Session\\QueueingSystemEnabled=false",
            f"Session\\DefaultSavePath={self.save_path}",
            f"Session\\TempPathEnabled={'true' if temp is not None else 'false'}",
            *([f"Session\\TempPath={temp}"] if temp is not None else []),
            f"Session\\AddExtensionToIncompleteFiles={'true' if self.incomplete_ext else 'false'}",
            "",
            "[Preferences]",
            "WebUI\\Enabled=true",
            "WebUI\\Address=127.0.0.1",
            f"WebUI\\Port={self.webui_port}",
            "WebUI\\UseUPnP=false",
            f"WebUI\\LocalHostAuth={'true' if self.password is not None else 'false'}",
            f"WebUI\\Username={QB_USERNAME}",
            f"WebUI\\Password_PBKDF2={qb_password_conf_value(password)}",
            *(
                [
                    "WebUI\\CSRFProtection=true",
                    "WebUI\\ClickjackingProtection=true",
                    "WebUI\\HostHeaderValidation=true",
                    "WebUI\\ServerDomains=127.0.0.1;localhost",
                ]
                if self.hardened
                else [
                    "WebUI\\MaxAuthenticationFailCount=1000",
                    "WebUI\\CSRFProtection=false",
                    "WebUI\\HostHeaderValidation=false",
                ]
            ),
            "Connection\\ResolvePeerCountries=false",
            "DynDNS\\Enabled=false",
            "",
        ]
        self.conf_path.parent.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text("\n".join(lines))

    def start(self) -> None:
        """Start and wait until the WebUI answers and the BitTorrent port listens.

        The first start picks fresh ports and retries with new ones if another process grabbed
        one in the meantime; a restart reuses the ports (peers and qbsync know them).
        """
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if self.webui_port:
            self._spawn_and_wait()
            return
        for attempt in range(3):
            self.webui_port, self.bt_port = free_port(), free_port()
            self._write_conf()
            try:
                self._spawn_and_wait()
                return
            except _PortInUse:
                self.stop()
                if attempt == 2:
                    raise

    def _spawn_and_wait(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._out = open(self.root / "stdout.log", "ab")  # noqa: SIM115  # closed in stop()
        # qBittorrent appends to its log across restarts; only look at this run's lines.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            [self.binary, f"--profile={self.profile}"],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=self.new_session,
        )
        self.api = qbittorrentapi.Client(
            host=self.url,
            FORCE_SCHEME_FROM_HOST=True,  # no HTTPS probing of a plain-HTTP WebUI
            username=self.username,
            password=self.password,
            REQUESTS_ARGS={"timeout": (2, 30)},
            DISABLE_LOGGING_DEBUG_OUTPUT=True,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"qbittorrent-nox {self.name} exited with {self.proc.returncode}; "
                    f"see {self.root / 'stdout.log'}"
                )
            if self._log_has("Web UI: Unable to bind") or self._log_has("Failed to listen"):
                raise _PortInUse(self.name)
            try:
                if self.password is not None:
                    self.api.auth_log_in()
                self.api.app_version()
                break
            except qbittorrentapi.APIConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"qbittorrent-nox {self.name} did not answer") from None
                time.sleep(0.05)
        # Wait for the BitTorrent listen socket too: a peer added before it exists is refused.
        wait_until(
            lambda: self._log_has(f"TCP/{self.bt_port}") or self._log_has("Failed to listen"),
            self.start_timeout,
            0.05,
            f"{self.name} listening on TCP/{self.bt_port}",
        )
        if self._log_has("Failed to listen"):
            raise _PortInUse(self.name)
        self._check_isolated()

    def _log_has(self, text: str) -> bool:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return text.encode() in fh.read()
        except FileNotFoundError:
            return False

    def _check_isolated(self) -> None:
        """Refuse to run a test against an instance that would talk beyond loopback."""
        prefs = self.api.app_preferences()
        bad = {
            k: prefs.get(k)
            for k, want in (
                ("dht", False),
                ("pex", False),
                ("lsd", False),
                ("upnp", False),
                ("web_ui_upnp", False),
                ("resolve_peer_countries", False),
                ("current_network_interface", "lo"),
                ("current_interface_address", "127.0.0.1"),
                ("enable_multi_connections_from_same_ip", True),
            )
            if prefs.get(k) != want
        }
        if bad:
            self.stop()
            raise RuntimeError(f"qbittorrent-nox {self.name} profile not applied: {bad}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM our own PID, wait, SIGKILL if needed. Idempotent. Returns the exit code."""
        code = None
        if self.proc is not None:
            code = stop_process(self.proc, timeout)
        if self._out is not None:
            self._out.close()
            self._out = None
        return code

    def restart(self) -> None:
        """Stop and start again on the same ports and profile (torrents and tags persist)."""
        self.stop()
        self.start()

    # -- small conveniences used by many tests -------------------------------------------

    def info(self, info_hash: str) -> Any | None:
        """``torrents_info`` for one hash, or None when the torrent is not listed."""
        found = self.api.torrents_info(torrent_hashes=info_hash)
        return found[0] if found else None

    def wait_seeding(self, info_hash: str, timeout: float = 60.0) -> Any:
        """Wait until the torrent is complete and seeding; return its info."""

        def seeding() -> Any:
            t = self.info(info_hash)
            return t if t is not None and t.progress == 1 and t.state in SEEDING_STATES else None

        return wait_until(seeding, timeout, 0.1, f"{self.name} seeding {info_hash}")

    def __repr__(self) -> str:
        return f"QBInstance({self.name!r}, url={self.url}, bt_port={self.bt_port}, pid={self.pid})"


class _PortInUse(RuntimeError):
    """qBittorrent could not bind a port we picked (someone took it meanwhile)."""
