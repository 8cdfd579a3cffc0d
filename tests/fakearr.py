"""A loopback Sonarr or Radarr (v3 API) that records requests, for contract tests.

Answers as the v3 API documents: ``X-Api-Key`` or 401; ``GET /api/v3/system/status`` with
``appName``; ``GET /api/v3/history`` paged (``page``, ``pageSize``, ``sortKey``,
``sortDirection``, ``totalRecords``, ``records``) and filtered by ``downloadId`` (stored upper
case, compared as given, like *arr's database lookup); ``POST /api/v3/command`` answering 201
with the queued command resource. Never a real instance.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs

from tests.httpfake import http_server, send_json


@attrs.define
class ArrRequest:
    method: str
    path: str
    query: dict[str, str]
    api_key: str
    body: Any
    status: int = 0


@attrs.define
class FakeArr:
    app: str  # "Sonarr" or "Radarr"
    api_key: str
    history: dict[str, list[str]] = attrs.field(factory=dict)  # DOWNLOADID -> event types
    requests: list[ArrRequest] = attrs.field(factory=list)
    port: int = 0
    next_id: int = 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def commands(self) -> list[Any]:
        return [r.body for r in self.requests if r.path == "/api/v3/command"]

    def handle(self, req: ArrRequest) -> tuple[int, Any]:
        if req.api_key != self.api_key:
            return 401, {"message": "Unauthorized"}
        if req.method == "GET" and req.path == "/api/v3/system/status":
            return 200, {"appName": self.app, "instanceName": self.app, "version": "4.0.0.0"}
        if req.method == "GET" and req.path == "/api/v3/history":
            did = req.query.get("downloadId")
            events = self.history.get(did or "", []) if did else []
            records: list[dict[str, Any]] = [
                {
                    "id": i + 1,
                    "eventType": e,
                    "downloadId": did,
                    "sourceTitle": "Some.Show.S01E01",
                    "date": f"2026-01-0{9 - i}T00:00:00Z",
                    "data": {},
                }
                for i, e in enumerate(events)
            ]
            return 200, {
                "page": int(req.query.get("page", "1")),
                "pageSize": int(req.query.get("pageSize", "10")),
                "sortKey": req.query.get("sortKey", "date"),
                "sortDirection": req.query.get("sortDirection", "descending"),
                "totalRecords": len(records),
                "records": records,
            }
        if req.method == "POST" and req.path == "/api/v3/command":
            body = dict(req.body or {})
            command = {
                "id": self.next_id,
                "name": body.get("name"),
                "commandName": body.get("name"),
                "body": body,
                "priority": "normal",
                "status": "queued",
                "queued": "2026-01-10T00:00:00Z",
                "trigger": "manual",
            }
            self.next_id += 1
            return 201, command
        return 404, {"message": "NotFound"}


@contextmanager
def serve_fake_arr(app: str, api_key: str = "arr-key") -> Iterator[FakeArr]:
    fake = FakeArr(app, api_key)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            req = ArrRequest(
                method=self.command,
                path=url.path,
                query=dict(parse_qsl(url.query)),
                api_key=self.headers.get("X-Api-Key", ""),
                body=json.loads(raw) if raw else None,
            )
            with lock:
                status, body = fake.handle(req)
                req.status = status
                fake.requests.append(req)
            send_json(self, status, body)

        do_GET = _serve
        do_POST = _serve

    with http_server(Handler) as port:
        fake.port = port
        yield fake
