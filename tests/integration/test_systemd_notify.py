"""Both daemons speak sd_notify, so the systemd units can be ``Type=notify``.

A real ``qbsync destination`` process is started with ``NOTIFY_SOCKET`` pointing at a datagram
socket this test owns (as systemd would), with no qBittorrent (``--qb-url`` empty), and must
report READY=1 once it serves, WATCHDOG=1 while healthy, and STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests.qbharness import free_port

pytestmark = pytest.mark.integration


def _messages(sock: socket.socket, until: bytes, timeout: float) -> list[bytes]:
    sock.settimeout(timeout)
    seen: list[bytes] = []
    while not any(until in m for m in seen):
        seen.append(sock.recv(4096))
    return seen


def test_destination_reports_ready_watchdog_and_stopping(tmp_path: Path, qbsync_factory) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        proc = qbsync_factory(
            "destination",
            [
                "--data",
                str(tmp_path / "data"),
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--health-addr",
                f"127.0.0.1:{free_port()}",
            ],
            # Half of WATCHDOG_USEC is the ping interval: 0.5 s here.
            env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"},
        )
        ready = _messages(sock, b"READY=1", timeout=120)
        assert any(m.startswith(b"READY=1") for m in ready)
        assert any(b"WATCHDOG=1" in m for m in _messages(sock, b"WATCHDOG=1", timeout=120))
        proc.signal(signal.SIGTERM)
        assert any(b"STOPPING=1" in m for m in _messages(sock, b"STOPPING=1", timeout=120))
        assert proc.wait(120) == 0
