"""The plumbing of the tests' fake HTTP servers (qBittorrent, *arr, the Kubernetes API, a
status endpoint): a threaded server on 127.0.0.1 run for the body of a ``with`` block, and a
JSON answer. Each fake keeps only its own request handling."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@contextmanager
def http_server(
    handler: type[BaseHTTPRequestHandler],
    *,
    port: int = 0,
    name: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> Iterator[int]:
    """Serve ``handler`` on 127.0.0.1 (``port`` 0: a free one), over ``tls`` when given;
    yields the port; shut down and closed when the block ends (threads are daemons)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def send_json(handler: BaseHTTPRequestHandler, status: int, body: Any) -> None:
    """Answer the request ``handler`` serves with ``status`` and ``body`` as JSON."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
