"""The health HTTP server over real loopback sockets."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import h11
import pytest
import trio

from qbsync.http.server import LOOP_HEARTBEAT, Health, ServerLimits, serve_http
from qbsync.wire.address import HostPort

LOCAL = HostPort("127.0.0.1", 0)


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def start(
    nursery: trio.Nursery, health: Health | None = None, **limits: Any
) -> tuple[int, Health]:
    health = health or Health(min_check_interval=0)
    ports = await nursery.start(partial(serve_http, LOCAL, health, limits=ServerLimits(**limits)))
    return ports[0], health


async def read_reply(stream: trio.SocketStream, conn: h11.Connection) -> Reply:
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return Reply(status, headers, body)
        else:
            raise AssertionError(f"unexpected {event!r}")


async def request(
    port: int, path: str, method: str = "GET", headers: list[tuple[str, str]] | None = None
) -> Reply:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            hdrs = [("Host", "localhost"), *(headers or [])]
            await stream.send_all(conn.send(h11.Request(method=method, target=path, headers=hdrs)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return await read_reply(stream, conn)


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(data)  # the server may close before reading everything
            return await read_until_closed(stream)


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    out = b""
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not chunk:
            break
        out += chunk
    return out


async def test_healthz_get_and_head(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery)
    r = await request(port, "/healthz")
    assert r.status == 200 and r.json() == {"status": "ok"}
    assert r.headers["content-type"] == "application/json"
    head = await request(port, "/healthz", "HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == str(len(r.body))
    # Query strings do not change the route.
    assert (await request(port, "/healthz?verbose=1")).status == 200


async def test_metrics(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery)
    r = await request(port, "/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert b"qbsync_pieces_sent_total" in r.body
    # ?name[]= (the Prometheus clients' convention) limits the answer to those series.
    one = await request(port, "/metrics?name[]=qbsync_bytes_received_total")
    assert one.status == 200
    assert b"qbsync_bytes_received_total " in one.body
    assert b"qbsync_pieces_sent_total" not in one.body


async def test_status_provider(nursery: trio.Nursery) -> None:
    port, health = await start(nursery)
    r = await request(port, "/status")
    assert r.status == 404
    health.set_status_provider(lambda: {"role": "source", "torrents": [{"hash": "ab", "n": 3}]})
    r = await request(port, "/status")
    assert r.status == 200
    assert r.json() == {"role": "source", "torrents": [{"hash": "ab", "n": 3}]}

    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    health.set_status_provider(broken)
    r = await request(port, "/status")
    assert r.status == 500 and r.json() == {"error": "internal error"}
    assert (await request(port, "/healthz")).status == 200


async def test_not_found_and_method_not_allowed(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery)
    for path in ("/nope", "/healthz/", "/HEALTHZ", "/../etc/passwd"):
        r = await request(port, path)
        assert r.status == 404, path
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        r = await request(port, "/readyz", method, [("Content-Length", "0")])
        assert r.status == 405, method
        assert r.headers["allow"] == "GET, HEAD"


async def test_malformed_request_is_400(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery)
    for junk in (
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",  # TLS hello
    ):
        out = await raw_exchange(port, junk)
        assert out.startswith(b"HTTP/1.1 400 "), (junk, out)
        assert b"Connection: close" in out
    assert (await request(port, "/healthz")).status == 200


async def test_oversized_header_is_400(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery)
    huge = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    out = await raw_exchange(port, huge)
    assert out.startswith(b"HTTP/1.1 400 ")
    # An endless header without a terminator is cut off the same way.
    endless = b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 5000
    out = await raw_exchange(port, endless)
    assert out.startswith(b"HTTP/1.1 400 ")
    assert (await request(port, "/healthz")).status == 200


async def test_oversized_body_is_400(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery, max_body_bytes=100)
    req = b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
    out = await raw_exchange(port, req)
    assert out.startswith(b"HTTP/1.1 400 ")
    # A small body is tolerated and ignored.
    r = await request(port, "/healthz", headers=[("Content-Length", "0")])
    assert r.status == 200


async def test_keepalive_serves_several_requests(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        for path in ("/healthz", "/livez", "/nope", "/metrics"):
            await stream.send_all(
                conn.send(h11.Request(method="GET", target=path, headers=[("Host", "a")]))
            )
            await stream.send_all(conn.send(h11.EndOfMessage()))
            r = await read_reply(stream, conn)
            assert r.status == (404 if path == "/nope" else 200)
            conn.start_next_cycle()


async def test_slowloris_does_not_block_others(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery, request_timeout=1.0)
    slow = await trio.open_tcp_stream("127.0.0.1", port)
    async with slow:
        await slow.send_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")  # head never finishes
        # Other clients are served while the slow one holds its connection.
        for _ in range(3):
            assert (await request(port, "/healthz")).status == 200
        # It keeps trickling header bytes; the deadline is per request, not per byte, so it
        # still gets a 408 and is closed.
        async with trio.open_nursery() as inner:

            async def trickle() -> None:
                try:
                    while True:
                        await slow.send_all(b"X-A: b\r\n")
                        await trio.sleep(0.05)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            inner.start_soon(trickle)
            with trio.fail_after(10):
                out = await read_until_closed(slow)
            inner.cancel_scope.cancel()
        assert out.startswith(b"HTTP/1.1 408 "), out


async def test_idle_connection_is_closed(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery, request_timeout=0.2)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        with trio.fail_after(10):
            assert await stream.receive_some(100) == b""  # closed without a word


async def test_connection_cap_evicts_the_longest_waiting(nursery: trio.Nursery) -> None:
    """Over the cap, the connection that has waited longest for its request is closed to make
    room: a probe is answered, not refused (it used to get 503 ``too many connections``)."""
    port, _ = await start(nursery, max_connections=2, request_timeout=30)
    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
    await trio.sleep(0.1)  # let the server accept both
    assert (await request(port, "/healthz")).status == 200
    with trio.fail_after(5):
        assert await idle[0].receive_some(100) == b""  # the oldest idle one was closed
    for s in idle:
        await s.aclose()


async def test_flood_of_half_open_clients_never_fails_a_probe(nursery: trio.Nursery) -> None:
    """300 clients that send half a request and stall: every /livez and /readyz probe in
    between is answered 200 (the shipped probes would otherwise restart the pod)."""
    port, health = await start(nursery, request_timeout=30)
    health.mark_ready()
    flood: list[trio.SocketStream] = []
    statuses: list[int] = []
    try:
        for i in range(300):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(b"GET /livez HTTP/1.1\r\nHost: a\r\n")  # never finished
            flood.append(s)
            if i % 30 == 29:
                for path in ("/livez", "/readyz"):
                    statuses.append((await request(port, path)).status)
    finally:
        for s in flood:
            await s.aclose()
    assert statuses == [200] * 20


async def test_many_concurrent_clients(nursery: trio.Nursery) -> None:
    port, _ = await start(nursery)
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await request(port, "/healthz")).status)

    async with trio.open_nursery() as inner:
        for _ in range(40):
            inner.start_soon(one)
    assert statuses == [200] * 40


async def test_readiness_transitions(nursery: trio.Nursery) -> None:
    port, health = await start(nursery, Health(check_timeout=0.2, min_check_interval=0))
    r = await request(port, "/readyz")
    assert r.status == 503 and r.json() == {"status": "not ready"}
    health.mark_ready()
    r = await request(port, "/readyz")
    assert r.status == 200 and r.json() == {"status": "ok"}

    qb_up = True

    async def qbittorrent() -> None:
        if not qb_up:
            raise ConnectionRefusedError("connection refused")

    health.add_ready_check("qbittorrent", qbittorrent)
    r = await request(port, "/readyz")
    assert r.status == 200 and r.json() == {"status": "ok", "checks": {"qbittorrent": "ok"}}
    qb_up = False
    r = await request(port, "/readyz")
    assert r.status == 503
    assert r.json() == {
        "status": "not ready",
        "checks": {"qbittorrent": "ConnectionRefusedError: connection refused"},
    }
    # Readiness never leaks into liveness.
    assert (await request(port, "/livez")).status == 200
    qb_up = True
    assert (await request(port, "/readyz")).status == 200
    health.mark_not_ready()
    assert (await request(port, "/readyz")).json() == {"status": "not ready"}


async def test_hung_ready_check_times_out(nursery: trio.Nursery) -> None:
    health = Health(check_timeout=0.1, min_check_interval=0)
    port, _ = await start(nursery, health)

    async def hangs() -> None:
        await trio.sleep_forever()

    async def fine() -> None:
        pass

    health.add_ready_check("listener", fine)
    health.add_ready_check("qbittorrent", hangs)
    health.mark_ready()
    r = await request(port, "/readyz")
    assert r.status == 503
    assert r.json()["checks"] == {"listener": "ok", "qbittorrent": "timed out after 0.1s"}


async def test_ready_checks_are_rate_limited(nursery: trio.Nursery) -> None:
    health = Health(min_check_interval=3600)
    port, _ = await start(nursery, health)
    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1

    health.add_ready_check("qb", counted)
    health.mark_ready()
    for _ in range(5):
        assert (await request(port, "/readyz")).status == 200
    assert calls == 1
    health.mark_not_ready()
    health.mark_ready()  # a transition invalidates the cached result
    assert (await request(port, "/readyz")).status == 200
    assert calls == 2


async def test_stale_heartbeat_fails_livez(nursery: trio.Nursery) -> None:
    port, health = await start(nursery)
    assert (await request(port, "/livez")).status == 200
    health.heartbeat("monitor", stale_after=0.05)
    assert (await request(port, "/livez")).status == 200
    await trio.sleep(0.2)
    r = await request(port, "/livez")
    assert r.status == 503
    body = r.json()
    assert body["status"] == "unhealthy"
    assert "no heartbeat" in body["checks"]["monitor"]
    assert body["checks"][LOOP_HEARTBEAT] == "ok"
    health.heartbeat("monitor")
    assert (await request(port, "/livez")).status == 200
    await trio.sleep(0.2)
    health.forget_heartbeat("monitor")
    assert (await request(port, "/livez")).status == 200
    # /healthz stays 200 whatever the loops do.
    assert (await request(port, "/healthz")).status == 200


async def test_live_check_and_event_loop_heartbeat(nursery: trio.Nursery) -> None:
    port, health = await start(nursery)
    assert LOOP_HEARTBEAT in health._heartbeats  # serve_http ticks the event loop

    async def writer_pool() -> None:
        raise RuntimeError("all writers dead")

    health.add_live_check("writers", writer_pool)
    r = await request(port, "/livez")
    assert r.status == 503
    assert r.json()["checks"] == {
        LOOP_HEARTBEAT: "ok",
        "writers": "RuntimeError: all writers dead",
    }


async def test_listen_on_all_interfaces(nursery: trio.Nursery) -> None:
    # "" = every interface; with port 0 each address family may get its own port.
    ports = await nursery.start(serve_http, HostPort("", 0), Health())
    statuses = []
    for port in ports:
        with contextlib.suppress(OSError):  # an IPv6 listener's port is not on 127.0.0.1
            statuses.append((await request(port, "/healthz")).status)
    assert statuses == [200]


async def test_port_in_use_fails_loudly(nursery: trio.Nursery) -> None:
    port, health = await start(nursery)
    with pytest.raises(OSError):
        await nursery.start(serve_http, HostPort("127.0.0.1", port), health)


async def eventually(pred: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``pred`` until true (the server notices closed connections asynchronously)."""
    with trio.fail_after(10):
        while True:
            if await pred():
                return
            await trio.sleep(0.05)
