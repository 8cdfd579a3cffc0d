"""Ctrl-C ends ``qbsync status --watch`` while a request is in flight, and no request is made
after it: asserted as an order of events, not a time.

A real ``qbsync status`` process polls a loopback HTTP server that records every request and
holds one of them open; the signal is sent while that request is held. The process is started
both with the default SIGINT disposition and with SIGINT ignored, which is how a shell without
job control (a CI script's background job) starts it: the bug this guards against.
"""

from __future__ import annotations

import http.server
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.httpfake import http_server, send_json

DOC = {
    "schema": 1,
    "role": "source",
    "version": "test",
    "time": 0,
    "daemon": {"state": "running", "uptime_seconds": 1, "connections": 0, "peer": ""},
    "torrents": [],
}


WATCH = [sys.executable, "-m", "qbsync.cli", "status", "--watch", "--interval", "0.2", "--url"]


class Recorder:
    """The server's view, in order: one ``("request", n)`` per request that arrived, and the
    test's own ``("signal", 0)`` when it sent SIGINT."""

    def __init__(self, hold_at: int) -> None:
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.hold_at = hold_at
        self.held = threading.Event()
        self.release = threading.Event()

    def add(self, kind: str) -> int:
        with self.lock:
            n = sum(1 for k, _ in self.events if k == "request") + 1
            self.events.append((kind, n if kind == "request" else 0))
            return n


@pytest.fixture
def server() -> Iterator[tuple[int, Recorder]]:
    rec = Recorder(hold_at=3)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            n = rec.add("request")
            if n == rec.hold_at:
                rec.held.set()
                rec.release.wait(120)  # held until the test has signalled and seen the exit
                return  # the client is gone by then; send nothing
            send_json(self, 200, DOC)

        def log_message(self, *args: object) -> None:
            pass

    with http_server(Handler) as port:
        try:
            yield port, rec
        finally:
            rec.release.set()  # a held request ends before the shutdown


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_during_a_request_ends_watch_and_no_request_follows(
    server: tuple[int, Recorder], inherited: str
) -> None:
    port, rec = server
    preexec: Callable[[], None] | None = _ignore_sigint if inherited == "ignored" else None
    proc = subprocess.Popen(
        [*WATCH, f"http://127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,  # the CI condition: SIGINT inherited ignored
    )
    try:
        assert rec.held.wait(120), "the third request never arrived"
        # The process is now inside its third request (the server holds it): Ctrl-C lands there.
        rec.add("signal")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    # The process has exited, so the record is complete: nothing after the signal.
    assert rec.events[-1] == ("signal", 0), rec.events
    assert [n for k, n in rec.events if k == "request"] == [1, 2, 3]


def test_watch_prints_no_error_after_ctrl_c(server: tuple[int, Recorder]) -> None:
    """The issue's symptom: "cannot read … Connection refused" lines after Ctrl-C. The held
    request is cut off by the signal, not reported as a failed read."""
    port, rec = server
    proc = subprocess.Popen(
        [*WATCH, f"http://127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint,
    )
    assert rec.held.wait(120)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert "cannot read" not in err, err
