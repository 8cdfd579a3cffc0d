"""``qbsync doctor`` against real qBittorrent and a real ``qbsync destination``: each check
passing, and failing the way a first run fails (wrong URL, wrong password, unwritable or
missing ``--data``, unreachable destination, token mismatch, port taken, loose state dir);
and its handshakes use the daemon's own key and pins without pinning anything anywhere (a
destination trusting on first use must pair with the real source, not with the doctor)."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qbsync.wire import fingerprint
from qbsync.wire.keys import raw_public
from tests.integration.conftest import QbFactory, QbsyncFactory
from tests.qbharness import QB_USERNAME, QBInstance, QbsyncProcess, free_port, make_self_signed

pytestmark = pytest.mark.integration

PASSWORD = "doctor-" + secrets.token_hex(8)


def new_key() -> tuple[str, str]:
    """A fresh identity key as ``--identity`` takes it (base64 of the raw 32 bytes) and its
    fingerprint."""
    key = Ed25519PrivateKey.generate()
    text = base64.b64encode(key.private_bytes_raw()).decode("ascii")
    return text, fingerprint(raw_public(key.public_key()))


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory`` with its size and mtime: "unchanged" is comparable."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
    }


@attrs.frozen
class Result:
    code: int
    out: str
    err: str

    def verdict(self, check: str) -> str:
        """The first verdict line of ``check`` ("PASS qbittorrent   reachable ...")."""
        for line in self.out.splitlines():
            parts = line.split(maxsplit=2)
            if len(parts) >= 2 and line[5:].startswith(check.ljust(13)):
                return line
        raise AssertionError(f"no {check!r} verdict in:\n{self.out}{self.err}")


def doctor(role: str, *args: str) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBSYNC_")}
    proc = subprocess.run(
        [sys.executable, "-m", "qbsync.cli", "doctor", role, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@attrs.define
class Setup:
    tmp: Path
    qb: QBInstance
    dest: QbsyncProcess
    dest_port: int
    token: str
    data: Path
    state: Path

    def source_args(self, *drop: str, **change: str) -> list[str]:
        opts = {
            "--data": str(self.data),
            "--qb-url": self.qb.url,
            "--qb-username": QB_USERNAME,
            "--qb-password": PASSWORD,
            "--destination-addr": f"127.0.0.1:{self.dest_port}",
            "--state-dir": str(self.state),
            "--auth-token": self.token,
            "--min-space": "0",
        }
        opts.update({f"--{k.replace('_', '-')}": v for k, v in change.items()})
        for name in drop:
            del opts[name]
        return [x for k, v in opts.items() for x in (k, v)]


@pytest.fixture
def setup(tmp_path: Path, qb_factory: QbFactory, qbsync_factory: QbsyncFactory) -> Setup:
    qb = qb_factory("doctor", password=PASSWORD)
    token = secrets.token_hex(16)
    port = free_port()
    dest_data = tmp_path / "dest-data"
    dest_data.mkdir()
    dest = qbsync_factory(
        "destination",
        [
            *("--data", str(dest_data), "--listen", f"127.0.0.1:{port}"),
            *("--auth-token", token, "--health-addr", f"127.0.0.1:{free_port()}"),
        ],
    )
    dest.wait_for_log("event=destination_ready", timeout=120)
    data = tmp_path / "src-data"
    data.mkdir()
    return Setup(tmp_path, qb, dest, port, token, data, tmp_path / "src-state")


def test_source_every_check_passes_and_nothing_is_changed(setup: Setup) -> None:
    r = doctor("source", *setup.source_args())
    assert r.code == 0, r.out + r.err
    assert r.verdict("qbittorrent").startswith("PASS")
    assert "login required" in r.verdict("qbittorrent")
    cred = r.verdict("credentials")
    assert cred.startswith("PASS") and f"user {QB_USERNAME!r}" in cred
    version = setup.qb.api.app_version()
    assert version in cred
    webapi = r.verdict("webapi")
    assert webapi.startswith("PASS") and setup.qb.api.app_web_api_version() in webapi
    assert "torrents/" in webapi  # what qbsync will use from that version
    assert r.verdict("data").startswith("PASS")
    assert r.verdict("filesystem").startswith("PASS") and " is on " in r.verdict("filesystem")
    assert r.verdict("free space").startswith("PASS")
    assert r.verdict("state dir").startswith("PASS") and "will be created" in r.out
    assert r.verdict("destination").startswith("PASS")
    # No key file yet: no handshake (a throwaway key would be pinned by the destination).
    hs = r.verdict("handshake")
    assert hs.startswith("SKIP") and "no identity key yet" in hs
    assert r.verdict("clock").startswith("SKIP")
    auth = r.verdict("auth")
    assert auth.startswith("PASS") and "token" in auth and "no identity key yet" in auth
    assert "0 peer keys pinned" in auth
    assert r.out.splitlines()[-1].startswith("OK: 0 failed")
    # It changed nothing: no probe file left in --data, no state directory created.
    assert list(setup.data.iterdir()) == []
    assert not setup.state.exists()


def test_source_wrong_url_and_wrong_password_fail_with_fixes(setup: Setup) -> None:
    closed = free_port()
    r = doctor("source", *setup.source_args(qb_url=f"http://127.0.0.1:{closed}"))
    assert r.code == 1
    line = r.verdict("qbittorrent")
    assert line.startswith("FAIL") and "Connection refused" in line
    assert "fix: " in line and "--qb-url / QBSYNC_SOURCE_QB_URL" in line
    assert "credentials" not in r.out  # nothing to log in to

    key, fp = new_key()
    r = doctor("source", *setup.source_args(qb_password="not-the-password", identity=key))
    assert r.code == 1
    assert r.verdict("qbittorrent").startswith("PASS")
    line = r.verdict("credentials")
    assert line.startswith("FAIL") and "login failed" in line and "--qb-password" in line
    hs = r.verdict("handshake")  # the other checks still ran, with the given key
    assert hs.startswith("PASS") and "with the token" in hs and f"as {fp}" in hs


def test_source_unreachable_destination_and_token_mismatch(setup: Setup) -> None:
    nobody = free_port()
    r = doctor("source", *setup.source_args(destination_addr=f"127.0.0.1:{nobody}"))
    assert r.code == 1
    line = r.verdict("destination")
    assert line.startswith("FAIL") and "Connection refused" in line and "fix: " in line
    assert "PASS handshake" not in r.out and "FAIL handshake" not in r.out

    key, _ = new_key()
    r = doctor("source", *setup.source_args(auth_token=secrets.token_hex(16), identity=key))
    assert r.code == 1
    assert r.verdict("destination").startswith("PASS")  # reached ...
    line = r.verdict("handshake")  # ... and the token mismatch is its own verdict
    assert line.startswith("FAIL") and "auth-failed" in line and "same token" in line
    assert "code=auth-failed" in setup.dest.log_text()  # the real destination refused it


def test_data_missing_or_unwritable_and_state_dir_mode(setup: Setup) -> None:
    missing = setup.tmp / "no-such-dir"
    r = doctor("source", *setup.source_args(data=str(missing)))
    assert r.code == 1
    line = r.verdict("data")
    assert line.startswith("FAIL") and "does not exist" in line and "mkdir -p" in line

    with _unwritable_dir(setup.tmp / "ro") as ro:
        r = doctor("source", *setup.source_args(data=str(ro)))
    assert r.code == 1
    line = r.verdict("data")
    assert line.startswith("FAIL") and "not writable" in line and "fix: " in line

    setup.state.mkdir(mode=0o700)
    setup.state.chmod(0o777)
    r = doctor("source", *setup.source_args())
    assert r.code == 1
    line = r.verdict("state dir")
    assert line.startswith("FAIL") and "mode 777" in line and "chmod go-w" in line
    setup.state.chmod(0o700)
    r = doctor("source", *setup.source_args())
    assert r.code == 0, r.out
    assert r.verdict("state dir").startswith("PASS") and "mode 700" in r.out


@contextlib.contextmanager
def _unwritable_dir(path: Path) -> Iterator[Path]:
    """A directory this process cannot create files in. As root, permissions do not stop
    writes, so it is a read-only tmpfs mount (unmounted after); skipped where mounting is not
    permitted."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot make an unwritable directory as root here: {mounted.stderr!r}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_destination_listen_port_free_in_use_by_qbsync_or_by_another_program(
    setup: Setup,
) -> None:
    base = ["--qb-url", setup.qb.url, "--qb-username", QB_USERNAME, "--qb-password", PASSWORD]
    data = setup.tmp / "dest2"
    data.mkdir()
    free = free_port()
    r = doctor("destination", "--data", str(data), "--listen", f"127.0.0.1:{free}", *base)
    assert r.code == 0, r.out + r.err
    assert r.verdict("listen").startswith("PASS") and "free to bind" in r.verdict("listen")
    assert r.verdict("credentials").startswith("PASS")
    assert r.verdict("auth").startswith("PASS") and "loopback only" in r.verdict("auth")
    assert not (data / ".qbsync").exists()  # "will be created": the doctor does not create it

    # The running destination's port, with its token: in use by qbsync, read from its Hello
    # without authenticating (the running one would pin this destination's key as a source).
    key, _ = new_key()
    r = doctor(
        "destination",
        *("--data", str(data), "--listen", f"127.0.0.1:{setup.dest_port}"),
        *("--auth-token", setup.token, "--identity", key, *base),
    )
    assert r.code == 0, r.out + r.err
    line = r.verdict("listen")
    assert line.startswith("PASS") and "running qbsync destination" in line
    assert "did not authenticate" in line and " key SHA256:" in line
    assert not any(line[5:].startswith("handshake") for line in r.out.splitlines())
    assert "event=peer_pinned" not in setup.dest.log_text()
    assert "event=wire_connection_open" not in setup.dest.log_text()

    # A port another program holds.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = doctor("destination", "--data", str(data), "--listen", f"127.0.0.1:{port}", *base)
    assert r.code == 1
    line = r.verdict("listen")
    assert line.startswith("FAIL") and "in use by another program" in line and "fix: " in line


def test_usage_errors_exit_2() -> None:
    assert doctor("source").code == 2  # --data and --qb-url are required
    r = doctor("elsewhere")
    assert r.code == 2
    r = doctor("destination", "--data", "/tmp", "--listen", "nonsense")
    assert r.code == 2 and "--listen" in r.err


def test_trust_on_first_use_destination_pairs_with_the_real_source_not_the_doctor(
    setup: Setup, qbsync_factory: QbsyncFactory
) -> None:
    port = free_port()
    dest_data = setup.tmp / "tofu-data"
    dest_data.mkdir()
    dest = qbsync_factory(
        "destination",
        [
            *("--data", str(dest_data), "--listen", f"127.0.0.1:{port}"),
            *("--health-addr", f"127.0.0.1:{free_port()}"),
        ],
    )
    dest.wait_for_log("event=destination_ready", timeout=120)
    peers = dest_data / ".qbsync" / "peers.json"
    args = setup.source_args("--auth-token", destination_addr=f"127.0.0.1:{port}")

    # Before the source ever ran: reachable, no handshake, nothing pinned on the destination.
    r = doctor("source", *args)
    assert r.code == 0, r.out + r.err
    assert r.verdict("destination").startswith("PASS")
    assert r.verdict("handshake").startswith("SKIP")
    auth = r.verdict("auth")
    assert auth.startswith("WARN") and "trust on first use" in auth
    assert not peers.exists()
    assert "event=peer_first_use" not in dest.log_text()
    assert not setup.state.exists()

    # The real source then pairs.
    source = qbsync_factory("source", [*args, "--health-addr", f"127.0.0.1:{free_port()}"])
    text = dest.wait_for_log("event=peer_first_use", timeout=120)
    source.wait_for_log("event=peer_first_use", timeout=60)  # it pinned the destination too
    own = (
        next(line for line in source.log_text().splitlines() if "event=identity" in line)
        .split("fingerprint=")[1]
        .split()[0]
    )
    assert f"peer_fingerprint={own}" in text
    paired = peers.read_bytes()

    # With the source's own key, after pairing: passes, and names both keys; changes nothing.
    before = snapshot(setup.state)
    assert (setup.state / "identity.key").exists()
    r = doctor("source", *args)
    assert r.code == 0, r.out + r.err
    hs = r.verdict("handshake")
    assert hs.startswith("PASS") and f"as {own}" in hs and "pinned by this source" in hs
    assert "1 peer key pinned" in r.verdict("auth") and own in r.verdict("auth")
    assert snapshot(setup.state) == before
    assert peers.read_bytes() == paired

    # Another key (a re-created source): the destination refuses it, with the way to re-pair.
    key, fp = new_key()
    other_state = setup.tmp / "other-state"
    r = doctor(
        "source",
        *setup.source_args(
            "--auth-token",
            destination_addr=f"127.0.0.1:{port}",
            identity=key,
            state_dir=str(other_state),
        ),
    )
    assert r.code == 1
    hs = r.verdict("handshake")
    assert hs.startswith("FAIL") and "unknown-peer" in hs and f"key {fp}" in hs
    assert "qbsync peers destination forget" in hs
    assert peers.read_bytes() == paired
    assert not other_state.exists()


def test_reverse_mode_destination_checks_the_listening_source(
    setup: Setup, qbsync_factory: QbsyncFactory
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    args = setup.source_args("--destination-addr")
    source = qbsync_factory(
        "source", [*args, "--listen", listen, "--health-addr", f"127.0.0.1:{free_port()}"]
    )
    source.wait_for_log("event=identity", timeout=60)
    data = setup.tmp / "rev-data"
    data.mkdir()
    base = ["--data", str(data), "--connect", listen]

    # No key yet: reachable, no handshake.
    r = doctor("destination", *base, "--auth-token", setup.token)
    assert r.verdict("source").startswith("PASS")
    assert r.verdict("handshake").startswith("SKIP")
    auth = r.verdict("auth")
    assert "only dials (--connect)" in auth and "no identity key yet" in auth
    assert not (data / ".qbsync").exists()

    # With a key and the token: the dialing handshake is accepted.
    key, fp = new_key()
    r = doctor("destination", *base, "--auth-token", setup.token, "--identity", key)
    hs = r.verdict("handshake")
    assert hs.startswith("PASS") and f"as {fp}" in hs, r.out + r.err
    assert not (data / ".qbsync").exists()

    # A wrong token: refused.
    r = doctor("destination", *base, "--auth-token", secrets.token_hex(16), "--identity", key)
    assert r.code == 1
    hs = r.verdict("handshake")
    assert hs.startswith("FAIL") and "auth-failed" in hs and "same token" in hs
    assert "token mismatch" in hs  # the source's own reason, from the wire's log line


def test_listen_recognises_a_running_tls_destination_without_authenticating(
    tmp_path: Path, qbsync_factory: QbsyncFactory
) -> None:
    cert, key = make_self_signed(tmp_path / "tls", "destination")
    port = free_port()
    data = tmp_path / "tls-data"
    data.mkdir()
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    dest = qbsync_factory(
        "destination",
        [
            *("--data", str(data), "--listen", f"127.0.0.1:{port}", *tls),
            *("--health-addr", f"127.0.0.1:{free_port()}"),
        ],
    )
    dest.wait_for_log("event=destination_ready", timeout=120)
    own = (
        next(line for line in dest.log_text().splitlines() if "event=identity" in line)
        .split("fingerprint=")[1]
        .split()[0]
    )
    other = tmp_path / "other-data"
    other.mkdir()
    r = doctor("destination", "--data", str(other), "--listen", f"127.0.0.1:{port}", *tls)
    line = r.verdict("listen")
    assert line.startswith("PASS") and "running qbsync destination" in line, r.out + r.err
    assert f"key {own}" in line  # read from its Hello, inside TLS
    assert "event=wire_connection_open" not in dest.log_text()
    assert not (data / ".qbsync" / "peers.json").exists()
