"""A webhook receiver on 127.0.0.1 for the ``--notify-url`` tests.

It records every POST body and then answers with ``status`` -- or, with ``status=None``,
never answers (keeps the connection open until :meth:`close`), like a hung webhook.
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any


class Receiver:
    def __init__(self, status: int | None = 200) -> None:
        self.status = status
        self.bodies: list[bytes] = []
        self.heads: list[str] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._got = threading.Condition(self._lock)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/secret-path-token?key=webhook-secret"

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(b) for b in self.bodies]

    def wait_for(self, n: int, timeout: float) -> list[dict[str, Any]]:
        with self._got:
            self._got.wait_for(lambda: len(self.bodies) >= n, timeout)
        return self.events()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                body += chunk
            with self._got:
                self.heads.append(head.decode("latin-1"))
                self.bodies.append(body)
                self._got.notify_all()
            if self.status is None:
                with self._lock:
                    self._held.append(conn)  # never answered; closed in close()
                return
            reply = b'{"ok": true}'
            conn.sendall(
                f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(reply)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + reply
            )
            conn.close()
        except OSError:
            conn.close()

    def close(self) -> None:
        self._sock.close()
        with self._lock:
            for c in self._held:
                c.close()
            self._held.clear()
