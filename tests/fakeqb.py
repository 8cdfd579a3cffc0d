"""A loopback qBittorrent WebUI that answers as 5.0, 5.2 or 5.3 do, for contract tests.

Only qBittorrent 4.5.2 is installable here (Debian 12), so the 5.x behaviour qbsync depends on
is reproduced from qBittorrent's WebAPI changelog and qbittorrent-api's version handling:

* Web API version: 5.0.x = 2.11.2, 5.2.x = 2.15.1, 5.3.0 = 2.16.2 (qbittorrent-api's
  ``_version_support.py``).
* 5.0: ``torrents/pause``/``resume`` are gone (404), ``torrents/stop``/``start`` replace them;
  the add parameter ``paused`` became ``stopped`` (the old name is ignored); states
  ``pausedUP``/``pausedDL`` became ``stoppedUP``/``stoppedDL``.
* 5.2: ``auth/login`` answers 204 with a ``QBT_SID_<port>`` cookie, 401 on bad credentials;
  API keys as ``Authorization: Bearer``; a response without data is 204; ``torrents/add``
  answers JSON with the added ids.
* 5.3: the add parameter ``skip_checking`` became ``seedMode`` (the old name is ignored).
* Every version: mutating endpoints are POST-only (405 on GET); without a session, 403.

It records every request (method, path, form/query fields) so tests assert the exact names a
client sent, and keeps just enough torrent state (add, files, priorities, recheck, stop/start,
tags, delete) for the destination finalizer and the source hand-off to run through it.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs

from qbsync.torrent import parse_metainfo
from tests.httpfake import http_server

PROFILES: dict[str, tuple[str, str]] = {  # qBittorrent -> (app version, Web API version)
    "4.6": ("v4.6.7", "2.9.3"),
    "5.0": ("v5.0.5", "2.11.2"),
    "5.2": ("v5.2.3", "2.15.1"),
    "5.3": ("v5.3.0", "2.16.2"),
}

READ_ONLY = {
    "app/version",
    "app/webapiVersion",
    "app/preferences",
    "torrents/info",
    "torrents/files",
    "torrents/properties",
    "torrents/pieceStates",
    "torrents/categories",
    "sync/maindata",
}


@attrs.define
class Request:
    method: str
    path: str  # without /api/v2/
    fields: dict[str, str]
    files: list[str]
    authorization: str
    cookie: str
    status: int = 0


@attrs.define
class Torrent:
    hash: str
    name: str
    files: list[tuple[str, int]]
    num_pieces: int
    save_path: str
    category: str
    tags: set[str]
    stopped: bool
    progress: float = 0.0
    checks_left: int = 0  # info polls still answering a checking state after a recheck
    priorities: dict[int, int] = attrs.field(factory=dict)

    def state(self, v5: bool) -> str:
        if self.checks_left:
            self.checks_left -= 1
            return "checkingUP"
        done = self.progress >= 1.0
        if self.stopped:
            return ("stopped" if v5 else "paused") + ("UP" if done else "DL")
        return "stalledUP" if done else "downloading"


class FakeQB:
    """One fake qBittorrent on 127.0.0.1. Use :func:`serve_fake_qb`."""

    def __init__(self, profile: str, *, username: str = "", password: str = "", api_key: str = ""):
        self.profile = profile
        self.app_version, self.api_version = PROFILES[profile]
        self.v = tuple(int(p) for p in self.api_version.split("."))
        self.username, self.password, self.api_key = username, password, api_key
        self.requests: list[Request] = []
        self.torrents: dict[str, Torrent] = {}
        self.categories: set[str] = set()
        self.sessions: set[str] = set()
        self.lock = threading.Lock()
        self.port = 0

    # -- what tests look at -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cookie_name(self) -> str:
        return f"QBT_SID_{self.port}" if self.v >= (2, 15, 0) else "SID"

    def calls(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    # -- request handling (server threads) ---------------------------------------------------

    def _authorized(self, req: Request) -> bool:
        if not (self.username or self.api_key):
            return True  # authentication bypass (e.g. localhost whitelisting)
        if self.api_key and self.v >= (2, 15, 0) and req.authorization == f"Bearer {self.api_key}":
            return True
        for part in req.cookie.split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie_name and value in self.sessions:
                return True
        return False

    def handle(self, req: Request) -> tuple[int, bytes, dict[str, str]]:
        v5, v52 = self.v >= (2, 11, 0), self.v >= (2, 15, 0)
        empty: tuple[int, bytes, dict[str, str]] = (204 if v52 else 200), b"", {}
        if req.path == "auth/login":
            if req.method != "POST":
                return 405, b"Method Not Allowed", {}
            ok = (
                req.fields.get("username") == self.username
                and req.fields.get("password") == self.password
            )
            if not ok:
                return (401, b"Unauthorized", {}) if v52 else (200, b"Fails.", {})
            sid = secrets.token_hex(16)
            self.sessions.add(sid)
            cookie = {"Set-Cookie": f"{self.cookie_name}={sid}; HttpOnly; SameSite=Strict; path=/"}
            return (204, b"", cookie) if v52 else (200, b"Ok.", cookie)
        if not self._authorized(req):
            return 403, b"Forbidden", {}
        if req.method == "GET" and req.path not in READ_ONLY:
            return 405, b"Method Not Allowed", {}
        f = req.fields
        hashes = [h for h in f.get("hashes", f.get("hash", "")).split("|") if h]
        if req.path == "app/version":
            return 200, self.app_version.encode(), {}
        if req.path == "app/webapiVersion":
            return 200, self.api_version.encode(), {}
        if req.path == "app/preferences":
            return _json({"refresh_interval": 50, "save_path": "/downloads", "temp_path": ""})
        if req.path == "torrents/info":
            rows = [
                self._info(t, v5) for t in self.torrents.values() if not hashes or t.hash in hashes
            ]
            return _json(rows)
        if req.path == "torrents/add":
            return self._add(req, v52)
        t = self.torrents.get(hashes[0]) if hashes else None
        if req.path in ("torrents/files", "torrents/pieceStates", "torrents/properties"):
            if t is None:
                return 404, b"Not Found", {}
            if req.path == "torrents/pieceStates":
                return _json([2 if t.progress >= 1.0 else 0] * t.num_pieces)
            if req.path == "torrents/properties":
                return _json({"save_path": t.save_path, "piece_size": 0})
            return _json(
                [
                    {"index": i, "name": n, "size": s, "priority": t.priorities.get(i, 1)}
                    for i, (n, s) in enumerate(t.files)
                ]
            )
        stop_start = {"stop": True, "start": False} if v5 else {"pause": True, "resume": False}
        name = req.path.removeprefix("torrents/")
        if name in stop_start:
            for h in hashes:
                if h in self.torrents:
                    self.torrents[h].stopped = stop_start[name]
            return empty
        if req.path == "torrents/recheck":
            for h in hashes:
                if h in self.torrents:
                    self.torrents[h].progress = 1.0  # the test's data is complete on disk
                    self.torrents[h].checks_left = 1
            return empty
        if req.path == "torrents/filePrio":
            if t is None:
                return 404, b"Not Found", {}
            for i in f.get("id", "").split("|"):
                t.priorities[int(i)] = int(f["priority"])
            return empty
        if req.path in ("torrents/addTags", "torrents/removeTags"):
            for h in hashes:
                tags = self.torrents[h].tags if h in self.torrents else set()
                new = {x.strip() for x in f.get("tags", "").split(",") if x.strip()}
                if req.path.endswith("addTags"):
                    tags |= new
                else:
                    tags -= new
            return empty
        if req.path == "torrents/categories":
            return _json({c: {"name": c, "savePath": ""} for c in sorted(self.categories)})
        if req.path == "torrents/createCategory":
            self.categories.add(f.get("category", ""))
            return empty
        if req.path == "torrents/delete":
            for h in hashes:
                self.torrents.pop(h, None)
            return empty
        return 404, b"Not Found", {}

    def _info(self, t: Torrent, v5: bool) -> dict[str, Any]:
        return {
            "hash": t.hash,
            "name": t.name,
            "state": t.state(v5),
            "progress": t.progress,
            "save_path": t.save_path,
            "content_path": f"{t.save_path}/{t.name}",
            "category": t.category,
            "tags": ", ".join(sorted(t.tags)),
            "size": sum(s for _, s in t.files),
            "seeding_time": 0,
            "num_complete": 0,
            "num_incomplete": 0,
        }

    def _add(self, req: Request, v52: bool) -> tuple[int, bytes, dict[str, str]]:
        f = req.fields
        # The names this version reads; the other name of each pair is ignored, like qB does.
        stopped_name = "stopped" if self.v >= (2, 11, 0) else "paused"
        seed_name = "seedMode" if self.v >= (2, 16, 0) else "skip_checking"
        added: list[str] = []
        for raw in self._uploads:
            meta = parse_metainfo(raw)
            if meta.info_hash in self.torrents:
                continue
            seed = f.get(seed_name, "false").lower() == "true"
            self.torrents[meta.info_hash] = Torrent(
                hash=meta.info_hash,
                name=meta.name,
                files=[(tf.path, tf.size) for tf in meta.geometry.files],
                num_pieces=meta.geometry.num_pieces,
                save_path=f.get("savepath", ""),
                category=f.get("category", ""),
                tags={x.strip() for x in f.get("tags", "").split(",") if x.strip()},
                stopped=f.get(stopped_name, "false").lower() == "true",
                progress=1.0 if seed else 0.0,
            )
            added.append(meta.info_hash)
        if v52:
            n = len(self._uploads)
            body = {
                "success_count": len(added),
                "failure_count": n - len(added),
                "pending_count": 0,
                "added_torrent_ids": added,
            }
            return _json(body)
        return 200, b"Ok." if added else b"Fails.", {}

    _uploads: list[bytes] = []


def _json(value: Any) -> tuple[int, bytes, dict[str, str]]:
    return 200, json.dumps(value).encode(), {"Content-Type": "application/json"}


def _parse_body(content_type: str, body: bytes) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    if content_type.startswith("multipart/form-data"):
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        fields: dict[str, str] = {}
        files: list[tuple[str, bytes]] = []
        for part in msg.iter_parts():
            name = str(part.get_param("name", header="content-disposition") or "")
            filename = part.get_filename()
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            if filename is not None:
                files.append((filename, data))
            else:
                fields[name] = data.decode()
        return fields, files
    return dict(parse_qsl(body.decode(), keep_blank_values=True)), []


@contextmanager
def serve_fake_qb(profile: str, port: int = 0, **kwargs: str) -> Iterator[FakeQB]:
    fake = FakeQB(profile, **kwargs)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            fields = dict(parse_qsl(url.query, keep_blank_values=True))
            form, uploads = _parse_body(self.headers.get("Content-Type", ""), body)
            fields.update(form)
            req = Request(
                method=self.command,
                path=url.path.removeprefix("/api/v2/"),
                fields=fields,
                files=[name for name, _ in uploads],
                authorization=self.headers.get("Authorization", ""),
                cookie=self.headers.get("Cookie", ""),
            )
            with fake.lock:
                fake._uploads = [data for _, data in uploads]
                status, out, headers = fake.handle(req)
                req.status = status
                fake.requests.append(req)
            self.send_response(status)
            # One request per connection: a stopped fake must look stopped to kept-alive
            # clients too (qBittorrent restarts close its sockets).
            self.send_header("Connection", "close")
            self.close_connection = True
            for k, val in headers.items():
                self.send_header(k, val)
            if status != 204:
                self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            if status != 204:
                self.wfile.write(out)

        do_GET = _serve
        do_POST = _serve

    with http_server(Handler, port=port, name=f"fakeqb-{profile}") as port:
        fake.port = port
        yield fake
