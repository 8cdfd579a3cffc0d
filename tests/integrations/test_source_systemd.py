"""sd_notify: datagrams reach the socket systemd names; no socket, no-op."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from qbsync.integrations.systemd import notify, watchdog_interval


def test_notify_sends_datagram(tmp_path: Path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        assert notify("READY=1\nSTATUS=streaming", env={"NOTIFY_SOCKET": path})
        assert server.recv(1024) == b"READY=1\nSTATUS=streaming"
    assert not notify("READY=1", env={})
    assert not notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "missing")})


def test_watchdog_interval():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}) is None
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": pid}) == 2.0
