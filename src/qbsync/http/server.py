"""The health/metrics HTTP server of both daemons: a small h11-on-Trio server.

Endpoints (``GET`` and ``HEAD`` only):

``/healthz``
    Always 200 ``{"status": "ok"}`` while the process serves HTTP at all.
``/livez``
    The event loop and every supervised loop are alive: each loop calls
    :meth:`Health.heartbeat` and a stale heartbeat fails the probe, as does any live check.
    It never depends on qBittorrent (the Go reference's liveness probe restarted healthy
    daemons whenever qBittorrent was slow; see
    docs/design-decisions.md#liveness-never-depends-on-qbittorrent).
``/readyz``
    503 ``{"status": "not ready"}`` until the runner calls :meth:`Health.mark_ready`; then
    every ready check (qBittorrent reachable, listener up, ...) must pass within its timeout.
``/metrics``
    Prometheus exposition of :mod:`qbsync.metrics` (``?name[]=NAME``, repeatable: only those
    series, so a tight poll of one counter stays cheap).
``/status``
    JSON from the runner's status provider (404 when none is set); schema in ``docs/status.md``.
``/``
    The same, as a small read-only HTML page rendered here (:func:`qbsync.http.status.render_html`):
    no script, no external asset, refreshing itself, readable on a phone.

``/livez`` and ``/readyz`` answer like the Go reference: ``{"status": "ok" | "unhealthy" |
"not ready", "checks": {name: "ok" | reason}}`` (``checks`` left out when there are none), with
200 when everything passes and 503 otherwise.

Why a hand-rolled server rather than a framework: it must share the daemon's Trio event loop
and nursery (a framework would bring its own loop or threads), it has five read-only routes,
and it must stay responsive to probes while a hostile or broken client misbehaves. So every
connection runs in its own task with a hard deadline per request, the number of concurrent
connections is capped (excess connections get an immediate 503), request heads and bodies
are size-limited, and a failure on one connection is logged and closes only that connection.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import h11
import trio

from .. import metrics
from ..log import kv
from ..wire.address import HostPort
from . import liveness

log = logging.getLogger("qbsync.http.server")

Check = Callable[[], Awaitable[None]]

LOOP_HEARTBEAT = "event-loop"


@attrs.define
class _Heartbeat:
    last: float
    stale_after: float
    waiting: int = 0  # dependency calls in progress (see qbsync.http.liveness)

    def begin_wait(self) -> None:
        self.waiting += 1

    def end_wait(self) -> None:
        self.waiting -= 1
        self.last = time.monotonic()

    def stale(self, now: float) -> bool:
        return self.waiting == 0 and now - self.last > self.stale_after


@attrs.frozen
class CheckResult:
    ok: bool
    checks: dict[str, str]  # check or heartbeat name -> "ok" or the failure reason

    @property
    def failed(self) -> dict[str, str]:
        return {name: text for name, text in self.checks.items() if text != "ok"}


class Health:
    """Liveness and readiness state shared by the runner, its loops and the HTTP server.

    ``stale_after`` is how long a heartbeat may go unrefreshed before ``/livez`` fails (a loop
    may pass its own, e.g. a monitor that sleeps ``--sleep`` seconds between rounds).
    ``check_timeout`` bounds every live/ready check so a hung dependency turns into a failing
    probe, not a hung one. Ready-check results are reused for ``min_check_interval`` seconds
    so a client hammering ``/readyz`` cannot hammer qBittorrent.
    """

    def __init__(
        self,
        *,
        stale_after: float = 120.0,
        check_timeout: float = 3.0,
        min_check_interval: float = 1.0,
    ) -> None:
        self.stale_after = stale_after
        self.check_timeout = check_timeout
        self.min_check_interval = min_check_interval
        self._live_checks: dict[str, Check] = {}
        self._ready_checks: dict[str, Check] = {}
        self._heartbeats: dict[str, _Heartbeat] = {}
        self._status_provider: Callable[[], dict[str, Any]] | None = None
        self._ready = False
        self._ready_cache: tuple[float, CheckResult] | None = None
        self._ready_lock: trio.Lock | None = None

    # -- registration (runner) -------------------------------------------------------------

    def add_live_check(self, name: str, check: Check) -> None:
        """A check that raising means "restart me". Never put qBittorrent in here."""
        self._live_checks[name] = check

    def add_ready_check(self, name: str, check: Check) -> None:
        """A check that raising means "do not send me traffic right now"."""
        self._ready_checks[name] = check
        self._ready_cache = None

    def set_status_provider(self, fn: Callable[[], dict[str, Any]]) -> None:
        self._status_provider = fn

    def mark_ready(self) -> None:
        self._ready = True
        self._ready_cache = None

    def mark_not_ready(self) -> None:
        self._ready = False
        self._ready_cache = None

    @property
    def ready(self) -> bool:
        return self._ready

    def heartbeat(self, name: str, stale_after: float | None = None) -> None:
        """Record that the supervised loop ``name`` made progress just now.

        Cheap; call it from the Trio thread (the heartbeat table is not locked). The first call
        registers the loop; from then on ``/livez`` fails if it is not called again within
        ``stale_after`` seconds.
        """
        now = time.monotonic()
        hb = self._heartbeats.get(name)
        if hb is None:
            hb = self._heartbeats[name] = _Heartbeat(now, stale_after or self.stale_after)
        else:
            hb.last = now
            if stale_after is not None:
                hb.stale_after = stale_after
        # Time this task then spends waiting on qBittorrent does not count as a stall.
        liveness.bind(hb)

    def forget_heartbeat(self, name: str) -> None:
        """Stop watching ``name`` (its loop ended on purpose, e.g. during shutdown)."""
        self._heartbeats.pop(name, None)

    # -- evaluation (HTTP handlers) ---------------------------------------------------------

    async def check_live(self) -> CheckResult:
        now = time.monotonic()
        checks = {
            name: (
                f"no heartbeat for {now - hb.last:.1f}s (limit {hb.stale_after:g}s)"
                if hb.stale(now)
                else "ok"
            )
            for name, hb in self._heartbeats.items()
        }
        checks.update(await self._run_checks(self._live_checks))
        return CheckResult(all(v == "ok" for v in checks.values()), checks)

    async def check_ready(self) -> CheckResult:
        if not self._ready:
            return CheckResult(False, {})
        if self._ready_lock is None:
            self._ready_lock = trio.Lock()
        async with self._ready_lock:  # concurrent probes share one run of the checks
            cached = self._ready_cache
            if cached is not None and time.monotonic() - cached[0] < self.min_check_interval:
                return cached[1]
            checks = await self._run_checks(self._ready_checks)
            result = CheckResult(self._ready and all(v == "ok" for v in checks.values()), checks)
            self._ready_cache = (time.monotonic(), result)
            return result

    def status(self) -> dict[str, Any] | None:
        return None if self._status_provider is None else self._status_provider()

    async def _run_checks(self, checks: dict[str, Check]) -> dict[str, str]:
        """Run ``checks`` concurrently, each under ``check_timeout``; name -> "ok" or reason."""
        results: dict[str, str] = {}

        async def run_one(name: str, check: Check) -> None:
            try:
                with trio.move_on_after(self.check_timeout) as scope:
                    await check()
                results[name] = (
                    f"timed out after {self.check_timeout:g}s" if scope.cancelled_caught else "ok"
                )
            except Exception as exc:  # a failing check is the answer, not an error
                results[name] = _reason(exc)

        async with trio.open_nursery() as nursery:
            for name, check in list(checks.items()):
                nursery.start_soon(run_one, name, check)
        return {name: results[name] for name in checks if name in results}


def _reason(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ").strip()
    name = type(exc).__name__
    return (f"{name}: {text}" if text else name)[:300]


# ---------------------------------------------------------------------------------------------
# HTTP plumbing.

ALLOWED_METHODS = (b"GET", b"HEAD")
ROUTES = ("/healthz", "/livez", "/readyz", "/metrics", "/status", "/")
JSON = "application/json"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@attrs.frozen
class ServerLimits:
    """Per-connection limits that keep one client from starving the probes."""

    # Concurrent connections. Over the cap, the connection that has waited longest for its
    # request to arrive is closed to make room (a probe sends its request at once; a slow or
    # half-open client is what waits); only when every connection is being answered does a
    # new one get an immediate 503.
    max_connections: int = 64
    request_timeout: float = 10.0  # a complete request (head and body) must arrive within this
    keepalive_timeout: float = 10.0  # idle time allowed between requests on one connection
    write_timeout: float = 10.0  # a client that does not read its response is dropped
    max_header_bytes: int = 8 * 1024
    max_body_bytes: int = 8 * 1024  # no endpoint takes a body; tolerate small ones
    max_requests_per_connection: int = 1000


@attrs.frozen
class _Response:
    status: int
    body: bytes
    content_type: str = JSON
    extra_headers: tuple[tuple[str, str], ...] = ()


def _json(status: int, payload: dict[str, Any]) -> _Response:
    return _Response(status, json.dumps(payload, sort_keys=True, default=str).encode() + b"\n")


async def _route(health: Health, method: bytes, target: bytes) -> _Response:
    path = target.split(b"?", 1)[0].decode("ascii", "replace")
    if path not in ROUTES:
        return _json(404, {"error": "not found", "path": path[:200]})
    if method not in ALLOWED_METHODS:
        return _Response(
            405,
            json.dumps({"error": "method not allowed"}).encode() + b"\n",
            extra_headers=(("Allow", "GET, HEAD"),),
        )
    if path == "/healthz":
        return _json(200, {"status": "ok"})
    if path == "/livez":
        live = await health.check_live()
        return _checks_response(live, "unhealthy")
    if path == "/readyz":
        ready = await health.check_ready()
        return _checks_response(ready, "not ready")
    if path == "/metrics":
        query = target.partition(b"?")[2].decode("ascii", "replace")
        names = urllib.parse.parse_qs(query).get("name[]", [])
        body, content_type = metrics.render(names)
        return _Response(200, body, content_type)
    if path == "/":
        from .status import CSP, render_html

        return _Response(
            200,
            render_html(health.status()).encode(),
            "text/html; charset=utf-8",
            extra_headers=(("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff")),
        )
    # /status
    status = health.status()
    if status is None:
        return _json(404, {"error": "no status available"})
    return _json(200, status)


def _checks_response(result: CheckResult, failing: str) -> _Response:
    """The Go reference's shape: ``{"status": ..., "checks": {name: "ok" | reason}}``, with
    ``checks`` left out when there are none."""
    body: dict[str, Any] = {"status": "ok" if result.ok else failing}
    if result.checks:
        body["checks"] = result.checks
    return _json(200 if result.ok else 503, body)


def _raw_response(status: int, payload: dict[str, Any]) -> bytes:
    """A complete ``Connection: close`` response, for paths where h11 cannot send one
    (a request head that never completed, or one h11 rejected)."""
    body = json.dumps(payload).encode() + b"\n"
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {JSON}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _ClientGone(Exception):
    pass


class _Server:
    def __init__(self, health: Health, limits: ServerLimits) -> None:
        self.health = health
        self.limits = limits
        self.active = 0
        # Connections waiting for (the rest of) a request, oldest first: the ones evicted to
        # make room. A connection being answered is never in here.
        self._waiting: dict[int, trio.CancelScope] = {}
        self._next_id = 0
        self._last_evict_log = -1e9

    def _admit(self, peer: str) -> bool:
        """Make room for a new connection: close the longest-waiting one when over the cap.
        False when every connection is busy being answered (then this one gets a 503)."""
        if self.active <= self.limits.max_connections:
            return True
        if not self._waiting:
            log.info("event=http_reject code=busy peer=%s active=%d", peer, self.active)
            return False
        oldest = next(iter(self._waiting))
        self._waiting.pop(oldest).cancel()
        now = trio.current_time()
        if now - self._last_evict_log >= 1.0:  # a flood must not flood the log too
            self._last_evict_log = now
            log.info("event=http_evicted code=busy reason=slowest_waiting active=%d", self.active)
        return True

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection. Whatever happens here stays here: the daemon must not die because a
        probe client misbehaved or a handler has a bug, so errors are logged and the connection
        is closed."""
        peer = _peer(stream)
        self.active += 1
        self._next_id += 1
        cid = self._next_id
        try:
            if not self._admit(peer):
                await self._send_raw(stream, 503, {"error": "too many connections"})
                return
            with trio.CancelScope() as scope:
                await self._serve(stream, peer, cid, scope)
        except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("event=http_error code=internal peer=%s", peer)
        finally:
            self._waiting.pop(cid, None)
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _send_raw(
        self, stream: trio.SocketStream, status: int, payload: dict[str, Any]
    ) -> None:
        with trio.move_on_after(self.limits.write_timeout):
            await stream.send_all(_raw_response(status, payload))

    async def _serve(
        self, stream: trio.SocketStream, peer: str, cid: int, evict: trio.CancelScope
    ) -> None:
        lim = self.limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=lim.max_header_bytes)
        for n in range(lim.max_requests_per_connection):
            timeout = lim.request_timeout if n == 0 else lim.keepalive_timeout
            self._waiting[cid] = evict
            with trio.move_on_after(timeout) as scope:
                try:
                    request = await self._read_request(stream, conn)
                except h11.RemoteProtocolError as exc:
                    log.info(
                        "event=http_bad_request code=bad-request peer=%s reason=%s",
                        peer,
                        kv(str(exc)[:200]),
                    )
                    await self._send_raw(stream, 400, {"error": "bad request"})
                    return
                except _TooLarge as exc:
                    log.info(
                        "event=http_bad_request code=bad-request peer=%s reason=%s",
                        peer,
                        kv(str(exc)),
                    )
                    await self._send_raw(stream, 400, {"error": str(exc)})
                    return
            if scope.cancelled_caught:
                # Idle keep-alive connections just close; a half-sent request gets a 408.
                if conn.their_state is not h11.IDLE or conn.trailing_data[0]:
                    log.info("event=http_timeout code=timeout peer=%s", peer)
                    await self._send_raw(stream, 408, {"error": "request timeout"})
                return
            self._waiting.pop(cid, None)  # being answered: never evicted
            if request is None:  # clean EOF between requests
                return
            response = await self._respond(request, peer)
            close = n == lim.max_requests_per_connection - 1
            await self._send(stream, conn, request, response, close=close)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # one side asked to close
            conn.start_next_cycle()

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> h11.Request | None:
        request: h11.Request | None = None
        body = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    raise _TooLarge("request bodies are not accepted")
                data = await stream.receive_some(65536)
                conn.receive_data(data)  # b"" = EOF; h11 turns it into ConnectionClosed or an error
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > self.limits.max_body_bytes:
                    raise _TooLarge("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed):
                if request is not None:
                    raise _ClientGone
                return None
            else:  # h11.PAUSED cannot happen before we respond
                raise h11.RemoteProtocolError(f"unexpected event {event!r}")

    async def _respond(self, request: h11.Request, peer: str) -> _Response:
        try:
            return await _route(self.health, request.method, request.target)
        except Exception:
            log.exception(
                "event=http_handler_error code=internal peer=%s target=%s",
                peer,
                kv(request.target[:200].decode("ascii", "replace")),
            )
            return _json(500, {"error": "internal error"})

    async def _send(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        request: h11.Request,
        response: _Response,
        *,
        close: bool,
    ) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            *response.extra_headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        reason = _REASONS.get(response.status, "").encode()
        with trio.move_on_after(self.limits.write_timeout) as scope:
            await stream.send_all(
                conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
            )
            if request.method != b"HEAD":
                await stream.send_all(conn.send(h11.Data(data=response.body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
        if scope.cancelled_caught:
            raise _ClientGone


class _TooLarge(Exception):
    pass


def _peer(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "unknown"
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)


async def _tick_event_loop(health: Health, interval: float) -> None:
    """The ``event-loop`` heartbeat: if this task cannot run, neither can anything else."""
    while True:
        health.heartbeat(LOOP_HEARTBEAT, stale_after=max(30.0, 10 * interval))
        await trio.sleep(interval)


async def serve_http(
    addr: HostPort,
    health: Health,
    *,
    limits: ServerLimits | None = None,
    loop_tick: float = 1.0,
    task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the health endpoints on ``addr`` until cancelled.

    ``addr.host == ""`` listens on all interfaces; ``addr.port == 0`` picks a free port.
    ``task_status.started`` receives the bound port(s). Binding errors (port in use) raise,
    so the runner fails at startup with a clear error instead of running without probes.
    """
    limits = limits or ServerLimits()
    listeners = await trio.open_tcp_listeners(addr.port, host=addr.host or None)
    ports = sorted({listener.socket.getsockname()[1] for listener in listeners})
    server = _Server(health, limits)
    log.info(
        "event=http_listen addr=%s ports=%s",
        kv(str(addr)),
        ",".join(str(p) for p in ports),
    )
    async with trio.open_nursery() as nursery:
        if math.isfinite(loop_tick) and loop_tick > 0:
            nursery.start_soon(_tick_event_loop, health, loop_tick)
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        task_status.started(ports)
