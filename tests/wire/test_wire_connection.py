"""The Trio wire shell over real loopback sockets.

Every test talks TCP on 127.0.0.1 with port 0 (the kernel picks a free port) and is bounded by
``trio.fail_after`` so a hang fails instead of blocking the suite. Timeouts configured here are
*behavior* (a stalled peer must be dropped), never speed assertions.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from qbsync import metrics
from qbsync.wire import (
    Abort,
    AbortResult,
    ByteBudget,
    ClientConnection,
    ConnectionClosed,
    ErrorCode,
    Finalize,
    FinalizeResult,
    HostPort,
    InitResult,
    InitTorrent,
    Peer,
    Piece,
    PieceAck,
    Request,
    Response,
    StartTorrent,
    SyncStatus,
    WireError,
    client_ssl_context,
    codec,
    keys,
    open_connection,
    serve,
    server_ssl_context,
)
from qbsync.wire import messages as m
from qbsync.wire.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    NEED_DATA,
    ControlFrame,
    FrameDecoder,
    encode_control,
    encode_frame,
)
from qbsync.wire.protocol import Endpoint, HandshakeComplete, RequestReceived, State
from tests.fuzz.wire_helpers import forge_piece_head
from tests.qbharness import make_self_signed
from tests.wireserver import raw_peer, serving

H1 = "a" * 40
H2 = "b" * 64
LOCAL = "127.0.0.1"


def counter(metric: Any, code: str) -> float:
    value: float = metric.labels(code)._value.get()
    return value


class Handler:
    """A destination handler recording what it saw; behavior is tweakable per test."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.pieces: list[tuple[str, int, int, str]] = []
        self.piece_gate: trio.Event | None = None
        self.request_hook: Callable[[Request], Awaitable[Response]] | None = None
        self.held = 0  # piece bytes currently inside handle_piece
        self.max_held = 0
        self.peers: set[int] = set()

    async def handle_request(self, peer: Peer, request: Request) -> Response:
        self.peers.add(peer.conn_id)
        self.requests.append(request)
        if self.request_hook is not None:
            return await self.request_hook(request)
        if isinstance(request, InitTorrent):
            return InitResult(SyncStatus.READY, b"\xff", 8, 0)
        if isinstance(request, Finalize):
            return FinalizeResult(SyncStatus.COMPLETE)
        if isinstance(request, Abort):
            raise WireError(ErrorCode.NOT_FOUND, f"no torrent {request.info_hash}")
        raise RuntimeError("boom")  # StartTorrent: an unexpected handler bug

    async def handle_piece(self, peer: Peer, piece: Piece) -> PieceAck:
        n = len(piece.data)
        self.held += n
        self.max_held = max(self.max_held, self.held)
        try:
            if self.piece_gate is not None:
                await self.piece_gate.wait()
            await trio.lowlevel.checkpoint()
            digest = hashlib.sha1(piece.data).hexdigest()
            self.pieces.append((piece.info_hash, piece.index, piece.offset, digest))
            if piece.index == 666:
                return PieceAck(piece.info_hash, piece.index, ErrorCode.HASH_MISMATCH, "bad")
            return PieceAck(piece.info_hash, piece.index, message=digest)
        finally:
            self.held -= n


@asynccontextmanager
async def running_server(
    handler: Handler | None = None,
    *,
    token: str | None = "s3cret",
    budget: ByteBudget | None = None,
    ssl_context: ssl.SSLContext | None = None,
    **kwargs: Any,
) -> AsyncIterator[tuple[int, Handler, ByteBudget]]:
    handler = handler or Handler()
    budget = budget or ByteBudget(64 << 20)
    kwargs.setdefault("hooks", metrics.WIRE_METRICS)  # the tests below read the metrics
    async with serving(
        handler, token=token, ssl_context=ssl_context, budget=budget, **kwargs
    ) as port:
        yield port, handler, budget


def connect(port: int, token: str | None = "s3cret", **kwargs: Any) -> Any:
    kwargs.setdefault("hooks", metrics.WIRE_METRICS)
    return open_connection(HostPort(LOCAL, port), token=token, **kwargs)


async def wait_for(predicate: Callable[[], object]) -> None:
    """Poll a condition another task will make true (bounded by the test's fail_after)."""
    while not predicate():  # noqa: ASYNC110 - the condition has no event to wait on
        await trio.sleep(0.01)


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(65536):
        out += chunk
    return bytes(out)


def decode_all(data: bytes, *, expect_magic: bool = True) -> list[Any]:
    """Decode a server's byte stream into its control messages (pieces never come back).
    Without the magic it is the stream after the handshake, whose frames carry tags (read
    here, not checked: these tests are about what the server says, not about the tags)."""
    decoder = FrameDecoder(dict.fromkeys(codec.MESSAGE_TYPES, 1 << 20), expect_magic=expect_magic)
    decoder.tag_size = 0 if expect_magic else 16
    decoder.receive_data(data)
    decoder.receive_data(b"")
    events: list[Any] = []
    while True:
        event = decoder.next_event()
        if not isinstance(event, ControlFrame):
            return events
        events.append(event.message)


async def raw_handshake(stream: trio.SocketStream, token: str | None) -> Endpoint:
    """Handshake as a source with the sans-IO endpoint only (for misbehaving-client tests)."""
    ep = Endpoint(m.Role.SOURCE, token=token)
    while True:
        event = ep.next_event()
        out = ep.data_to_send()
        if out:
            await stream.send_all(out)
        if isinstance(event, HandshakeComplete):
            return ep
        data = await stream.receive_some(65536)
        ep.receive_data(data)


# --- requests -------------------------------------------------------------------------------


async def test_requests_results_and_errors_keep_the_connection_up() -> None:
    with trio.fail_after(20):
        async with running_server() as (port, handler, _), connect(port) as conn:
            assert conn.version == m.PROTOCOL_VERSION
            result = await conn.request(InitTorrent(H1, name="x"), timeout=5)
            assert result == InitResult(SyncStatus.READY, b"\xff", 8, 0)
            with pytest.raises(WireError) as err:
                await conn.request(Abort(H1), timeout=5)
            assert err.value.code == ErrorCode.NOT_FOUND
            assert H1 in err.value.message
            with pytest.raises(WireError) as err:
                await conn.request(StartTorrent(H1), timeout=5)
            assert err.value.code == ErrorCode.INTERNAL
            # still usable after both errors
            assert await conn.request(Finalize(H1), timeout=5) == FinalizeResult(
                SyncStatus.COMPLETE
            )
            assert not conn.closed
            assert [type(r) for r in handler.requests] == [
                InitTorrent,
                Abort,
                StartTorrent,
                Finalize,
            ]


async def test_concurrent_requests_are_matched_by_id_out_of_order() -> None:
    handler = Handler()
    release: dict[str, trio.Event] = {}

    async def hook(request: Request) -> Response:
        assert isinstance(request, Abort)
        release[request.info_hash] = event = trio.Event()
        await event.wait()
        return AbortResult(existed=request.info_hash.startswith("c"))

    handler.request_hook = hook
    hashes = [c * 40 for c in "cdef"]
    results: dict[str, bool] = {}
    with trio.fail_after(20):
        async with (
            running_server(handler) as (port, _, _),
            connect(port) as conn,
            trio.open_nursery() as nursery,
        ):
            for h in hashes:

                async def one(h: str = h) -> None:
                    results[h] = (await conn.request(Abort(h), timeout=10)).existed

                nursery.start_soon(one)
            await wait_for(lambda: len(release) == len(hashes))
            for h in reversed(hashes):  # answer in reverse order
                release[h].set()
                await trio.sleep(0.01)
    assert results == {h: h.startswith("c") for h in hashes}


async def test_request_timeout_then_late_answer_is_discarded() -> None:
    handler = Handler()
    gate = trio.Event()

    async def hook(request: Request) -> Response:
        if isinstance(request, Abort):
            await gate.wait()
            return AbortResult(True)
        return InitResult(SyncStatus.COMPLETE)

    handler.request_hook = hook
    with trio.fail_after(20):
        async with running_server(handler) as (port, _, _), connect(port) as conn:
            with pytest.raises(WireError) as err:
                await conn.request(Abort(H1), timeout=0.2)
            assert err.value.code == ErrorCode.TIMEOUT
            gate.set()  # the late AbortResult arrives now and must be dropped quietly
            result = await conn.request(InitTorrent(H1), timeout=5)
            assert result.status == SyncStatus.COMPLETE
            assert not conn.closed


# --- pieces and credit ----------------------------------------------------------------------


async def test_pieces_arrive_intact_in_parallel() -> None:
    payloads = {i: bytes([i]) * (256 * 1024 + i) for i in range(12)}
    with trio.fail_after(30):
        async with running_server() as (port, handler, budget), connect(port) as conn:
            acks: dict[int, PieceAck] = {}
            async with trio.open_nursery() as nursery:
                for i, data in payloads.items():

                    async def one(i: int = i, data: bytes = data) -> None:
                        acks[i] = await conn.send_piece(H2, i, i * 1000, memoryview(data))

                    nursery.start_soon(one)
            assert conn.inflight_bytes == 0
            bad = await conn.send_piece(H1, 666, 0, b"xyz")
        assert budget.used == 0
    assert all(a.ok for a in acks.values())
    for i, data in payloads.items():
        assert acks[i].message == hashlib.sha1(data).hexdigest()
    assert sorted(p[1] for p in handler.pieces if p[0] == H2) == list(payloads)
    assert {(p[1], p[2]) for p in handler.pieces if p[0] == H2} == {(i, i * 1000) for i in payloads}
    assert not bad.ok and bad.code == ErrorCode.HASH_MISMATCH


async def test_credit_window_is_never_exceeded() -> None:
    """With a slow handler, the destination never holds more than the window per connection
    and the budget peak never exceeds its limit, however many senders push."""
    window = 1 << 20
    piece = 192 * 1024
    handler = Handler()
    handler.piece_gate = trio.Event()
    budget = ByteBudget(8 << 20)
    with trio.fail_after(30):
        async with (
            running_server(handler, budget=budget, window=window) as (port, _, _),
            connect(port) as conn,
        ):
            assert conn.window == window and conn.credit == window
            observed: list[int] = []
            async with trio.open_nursery() as nursery:
                for i in range(20):

                    async def one(i: int = i) -> None:
                        ack = await conn.send_piece(H1, i, 0, bytes(piece))
                        assert ack.ok

                    nursery.start_soon(one)
                # Let the senders run into the window while the handler is blocked.
                for _ in range(50):
                    await trio.sleep(0.01)
                    observed.append(conn.inflight_bytes)
                stalled_at = handler.held
                handler.piece_gate.set()
            assert max(observed) <= window
            assert stalled_at <= window
            assert stalled_at >= window - piece  # the window was actually used
            assert handler.max_held <= window
            assert conn.credit == window and conn.inflight_bytes == 0
    assert budget.peak <= window


async def test_budget_bounds_memory_across_connections() -> None:
    """Two connections with 1 MiB windows share a 512 KiB budget: at most 512 KiB are held."""
    handler = Handler()
    handler.piece_gate = trio.Event()
    budget = ByteBudget(512 * 1024)
    piece = 128 * 1024
    with trio.fail_after(30):
        async with (
            running_server(handler, budget=budget, window=1 << 20) as (port, _, _),
            connect(port) as c1,
            connect(port) as c2,
            trio.open_nursery() as nursery,
        ):
            for conn in (c1, c2):
                for i in range(8):

                    async def one(conn: ClientConnection = conn, i: int = i) -> None:
                        assert (await conn.send_piece(H1, i, 0, bytes(piece))).ok

                    nursery.start_soon(one)
            await wait_for(lambda: budget.used == budget.limit)
            for _ in range(20):  # give the receive loops every chance to overrun
                await trio.sleep(0.01)
            assert handler.held == budget.limit
            handler.piece_gate.set()
    assert budget.peak == budget.limit
    assert budget.used == 0
    assert len(handler.pieces) == 16


async def test_piece_larger_than_window_and_budget_still_goes_through() -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    with trio.fail_after(30):
        async with (
            running_server(budget=ByteBudget(1 << 20), window=512 * 1024) as (port, _, budget),
            connect(port) as conn,
        ):
            ack = await conn.send_piece(H1, 1, 0, data)
            assert ack.ok and ack.message == hashlib.sha1(data).hexdigest()
            assert conn.credit == 512 * 1024
            assert budget.peak == budget.limit


async def test_piece_over_the_maximum_is_refused_locally() -> None:
    with trio.fail_after(20):
        async with running_server(max_piece=1024) as (port, handler, _), connect(port) as conn:
            assert conn.max_piece_size == 1024
            with pytest.raises(WireError) as err:
                await conn.send_piece(H1, 0, 0, bytes(1025))
            assert err.value.code == ErrorCode.FRAME_TOO_LARGE
            with pytest.raises(WireError) as err:
                await conn.send_piece("not-a-hash", 0, 0, b"x")
            assert err.value.code == ErrorCode.BAD_REQUEST
            assert (await conn.send_piece(H1, 0, 0, bytes(1024))).ok
            assert len(handler.pieces) == 1


async def test_cancel_while_waiting_for_the_ack() -> None:
    handler = Handler()
    handler.piece_gate = trio.Event()
    with trio.fail_after(20):
        async with running_server(handler) as (port, _, budget), connect(port) as conn:
            with trio.move_on_after(0.2) as cs:
                await conn.send_piece(H1, 1, 0, bytes(1000))
            assert cs.cancelled_caught
            assert conn.inflight_bytes == 1000  # still in flight on the destination
            handler.piece_gate.set()
            # The late ack is dropped; credit comes back; the connection keeps working.
            ack = await conn.send_piece(H1, 2, 0, bytes(10))
            assert ack.ok
            result = await conn.request(InitTorrent(H1), timeout=5)
            assert result.status == SyncStatus.READY
            await wait_for(lambda: conn.credit == conn.window)
            assert conn.inflight_bytes == 0
            assert budget.used == 0


async def test_cancel_while_waiting_for_credit_leaks_nothing() -> None:
    handler = Handler()
    handler.piece_gate = trio.Event()
    with trio.fail_after(20):
        async with running_server(handler, window=1000) as (port, _, _), connect(port) as conn:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.send_piece, H1, 1, 0, bytes(1000))
                await wait_for(lambda: conn.credit == 0)
                with trio.move_on_after(0.2) as cs:
                    await conn.send_piece(H1, 2, 0, bytes(10))  # no credit: waits
                assert cs.cancelled_caught
                assert conn.inflight_bytes == 1000
                handler.piece_gate.set()
            assert (await conn.send_piece(H1, 3, 0, bytes(1000))).ok
            assert [p[1] for p in handler.pieces] == [1, 3]


# --- authentication -------------------------------------------------------------------------


async def test_wrong_token_fails_on_both_sides(caplog: pytest.LogCaptureFixture) -> None:
    before = counter(metrics.wire_handshake_failures, "auth-failed")
    with trio.fail_after(20):
        async with running_server(token="right") as (port, handler, _):
            with caplog.at_level(logging.WARNING, logger="qbsync.wire"):
                with pytest.raises(WireError) as err:
                    async with connect(port, token="wrong"):
                        pytest.fail("connected with a wrong token")
                # the server logs asynchronously: wait for its line
                await wait_for(lambda: "code=auth-failed" in caplog.text)
            assert err.value.code == ErrorCode.AUTH_FAILED
            assert "token" in err.value.message
            assert handler.requests == []
            async with connect(port, token="right") as conn:  # the server still serves
                await conn.request(InitTorrent(H1), timeout=5)
    assert counter(metrics.wire_handshake_failures, "auth-failed") >= before + 1
    assert "wrong" not in caplog.text and "right" not in caplog.text  # never log the token


async def test_no_token_on_either_side_works() -> None:
    with trio.fail_after(20):
        async with running_server(token=None) as (port, _, _), connect(port, token=None) as conn:
            assert (await conn.request(InitTorrent(H1), timeout=5)).status == SyncStatus.READY
        async with running_server(token="") as (port, _, _), connect(port, token="") as conn:
            assert (await conn.send_piece(H1, 0, 0, b"abc")).ok


@pytest.mark.parametrize(
    ("server_token", "client_token", "client_says"),
    [
        ("s3cret", None, "the destination requires an auth token but this source has none"),
        (None, "s3cret", "this source has an auth token but the destination has none"),
    ],
)
async def test_token_on_one_side_only_fails_clearly_on_both(
    server_token: str | None,
    client_token: str | None,
    client_says: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(20), caplog.at_level(logging.WARNING, logger="qbsync.wire"):
        async with running_server(token=server_token) as (port, handler, _):
            with pytest.raises(WireError) as err:
                async with connect(port, token=client_token):
                    pytest.fail("connected with mismatched tokens")
            assert err.value.code == ErrorCode.AUTH_FAILED
            assert client_says in err.value.message
            await wait_for(lambda: "code=auth-failed" in caplog.text)
            assert handler.requests == []
    assert "set the same --auth-token on both sides" in caplog.text


async def test_replayed_auth_is_rejected() -> None:
    """A recorded source flight (Hello + Auth) is worthless on a new connection: the
    destination picks a fresh nonce, so the old proof no longer matches."""
    with trio.fail_after(20):
        async with running_server(token="s3cret") as (port, handler, _):
            stream = await trio.open_tcp_stream(LOCAL, port)
            recorder = await raw_handshake(stream, "s3cret")  # a genuine handshake
            await stream.aclose()
            old_hello, th = recorder._my_hello, recorder._transcript
            old_auth = m.Auth(
                keys.token_mac(b"s3cret", m.Role.SOURCE, 2, th),
                keys.sign(recorder._identity, m.Role.SOURCE, 2, th),
            )

            stream = await trio.open_tcp_stream(LOCAL, port)
            await stream.send_all(MAGIC + encode_frame(codec.HELLO, 0, old_hello))
            await stream.send_all(encode_control(old_auth))
            replies = decode_all(await read_until_eof(stream))
            assert isinstance(replies[0], m.Hello)
            assert replies[-1] == m.Error(
                ErrorCode.AUTH_FAILED,
                "the source's signature does not verify with the key it presented",
            )
            assert handler.requests == []


async def test_reflected_proof_is_rejected() -> None:
    """A fake destination that does not know the token cannot pass the source's own proof off
    as its own: the sender's role is inside the MAC."""

    async def fake_destination(stream: trio.SocketStream) -> None:
        ep = Endpoint(m.Role.DESTINATION, token="unknown-to-the-fake")
        await stream.send_all(ep.data_to_send())
        decoder = FrameDecoder(dict.fromkeys((codec.HELLO, codec.AUTH), 4096))
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            decoder.receive_data(data)
            while isinstance(event := decoder.next_event(), ControlFrame):
                if isinstance(event.message, m.Auth):  # reflect it, then claim success
                    await stream.send_all(encode_control(event.message))
                    await stream.send_all(
                        encode_control(m.AuthOk(version=1, max_frame=1 << 20, initial_credit=1))
                    )
                    await trio.sleep_forever()

    with trio.fail_after(20):
        async with raw_peer(fake_destination) as port:
            with pytest.raises(WireError) as err:
                async with connect(port, token="s3cret"):
                    pytest.fail("accepted a reflected proof")
            assert err.value.code == ErrorCode.AUTH_FAILED
            # the signature fails first; the token MAC inside is the reflected one too
            assert "signature does not verify" in err.value.message


# --- misbehaving peers ----------------------------------------------------------------------


async def test_garbage_bytes_get_an_error_frame_and_the_server_keeps_serving() -> None:
    before = counter(metrics.wire_handshake_failures, "protocol")
    with trio.fail_after(20):
        async with (
            running_server() as (port, _, _),
            connect(port) as good,  # a healthy connection, open throughout
        ):
            stream = await trio.open_tcp_stream(LOCAL, port)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            replies = decode_all(await read_until_eof(stream))
            assert isinstance(replies[0], m.Hello)
            assert isinstance(replies[-1], m.Error)
            assert replies[-1].code == ErrorCode.PROTOCOL
            assert "magic" in replies[-1].message
            assert (await good.request(InitTorrent(H1), timeout=5)).status == SyncStatus.READY
    assert counter(metrics.wire_handshake_failures, "protocol") >= before + 1


async def test_protocol_violation_after_auth_is_reported_and_contained() -> None:
    before = counter(metrics.wire_protocol_errors, "unknown-type")
    with trio.fail_after(20):
        async with running_server() as (port, handler, _):
            stream = await trio.open_tcp_stream(LOCAL, port)
            await raw_handshake(stream, "s3cret")
            await stream.send_all(encode_frame(250, 0, bytes(16)))  # a type nobody knows
            replies = decode_all(await read_until_eof(stream), expect_magic=False)
            assert replies[-1].code == ErrorCode.UNKNOWN_TYPE
            async with connect(port) as conn:
                assert (await conn.send_piece(H1, 0, 0, b"ok")).ok
            assert handler.requests == []
    assert counter(metrics.wire_protocol_errors, "unknown-type") >= before + 1


async def test_an_altered_piece_is_refused_and_never_handled() -> None:
    """An attacker on the path flips one payload byte of an authenticated source's piece: the
    tag fails, the destination answers ``bad-tag`` and closes, the handler never sees it, and
    the piece's budget charge is returned."""
    with trio.fail_after(20):
        async with running_server() as (port, handler, budget):
            stream = await trio.open_tcp_stream(LOCAL, port)
            ep = await raw_handshake(stream, "s3cret")
            _, frame = ep.piece_frame(H1, 0, 0, bytes(300_000))
            altered = bytearray(frame)
            altered[100_000] ^= 0x40
            await stream.send_all(altered)
            replies = decode_all(await read_until_eof(stream), expect_magic=False)
            assert replies[-1].code == ErrorCode.BAD_TAG
            assert handler.pieces == []
            await wait_for(lambda: budget.used == 0)


async def test_credit_violation_is_refused_before_the_body() -> None:
    with trio.fail_after(20):
        async with running_server(window=1000) as (port, _, budget):
            stream = await trio.open_tcp_stream(LOCAL, port)
            ep = await raw_handshake(stream, "s3cret")
            # Legal: a first piece when all credit is available. Then one more piece with the
            # credit still consumed: a violation, refused at its header.
            rid, frame = ep.piece_frame(H1, 0, 0, bytes(900))
            await stream.send_all(frame)
            await stream.send_all(forge_piece_head(ep, rid + 1, H1, 1, 0, 500))
            replies = decode_all(await read_until_eof(stream), expect_magic=False)
            assert replies[-1].code == ErrorCode.CREDIT_EXCEEDED
            assert budget.used == 0


async def test_unauthenticated_connections_hold_no_bulk_buffers() -> None:
    """Before authentication a peer can make us buffer only handshake-sized data (frames.py):
    a pile of half-open handshakes must not pin a bulk read buffer each."""
    n = 16
    streams: list[trio.SocketStream] = []
    with trio.fail_after(20):
        async with running_server(handshake_timeout=60) as (port, _, _):
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for _ in range(n):
                    stream = await trio.open_tcp_stream(LOCAL, port)
                    streams.append(stream)
                    await stream.send_all(MAGIC)
                    # The server's first flight proves its per-connection state exists.
                    got = b""
                    while len(got) < len(MAGIC) + HEADER_SIZE:
                        got += await stream.receive_some(65536)
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
                for stream in streams:
                    await stream.aclose()
    assert held < n * 64 * 1024, f"{held / n / 1024:.0f} KiB per unauthenticated connection"


async def test_oversized_length_prefix_costs_nothing() -> None:
    with trio.fail_after(20):
        async with running_server() as (port, _, budget):
            stream = await trio.open_tcp_stream(LOCAL, port)
            await raw_handshake(stream, "s3cret")
            await stream.send_all(HEADER.pack(2**32 - 1, codec.PIECE, 0, 0, 1) + bytes(16))
            replies = decode_all(await read_until_eof(stream), expect_magic=False)
            assert replies[-1].code == ErrorCode.FRAME_TOO_LARGE
            assert budget.peak == 0


async def test_stalled_client_is_dropped_at_the_handshake_timeout() -> None:
    before = counter(metrics.wire_handshake_failures, "timeout")
    with trio.fail_after(20):
        async with running_server(handshake_timeout=0.3) as (port, _, _):
            stream = await trio.open_tcp_stream(LOCAL, port)
            replies = decode_all(await read_until_eof(stream))  # we never send a byte
            assert isinstance(replies[0], m.Hello)
            assert replies[-1].code == ErrorCode.TIMEOUT
    assert counter(metrics.wire_handshake_failures, "timeout") >= before + 1


async def test_stalled_server_times_out_the_client() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with raw_peer(silent) as port:
            with pytest.raises(WireError) as err:
                async with connect(port, connect_timeout=0.3):
                    pytest.fail("handshake with a silent server")
            assert err.value.code == ErrorCode.TIMEOUT


async def test_client_that_closes_mid_piece_leaves_the_server_intact() -> None:
    with trio.fail_after(20):
        async with running_server() as (port, handler, budget):
            stream = await trio.open_tcp_stream(LOCAL, port)
            ep = await raw_handshake(stream, "s3cret")
            _, header, _ = ep.send_piece(H1, 0, 0, 100_000)
            await stream.send_all(header + bytes(30_000))
            await stream.aclose()
            async with connect(port) as conn:
                assert (await conn.send_piece(H1, 1, 0, b"fine")).ok
            await wait_for(lambda: budget.used == 0)
            assert [p[1] for p in handler.pieces] == [1]


async def test_server_that_closes_mid_frame_fails_pending_calls() -> None:
    async def half_answer(stream: trio.SocketStream) -> None:
        ep = Endpoint(m.Role.DESTINATION, token=None)
        while True:
            event = ep.next_event()
            if out := ep.data_to_send():
                await stream.send_all(out)
            if isinstance(event, RequestReceived):
                frame = ep.send_response(event.request_id, AbortResult(True))
                await stream.send_all(frame[:-3])  # all but the last 3 bytes, then EOF
                await stream.aclose()
                return
            if event is NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                ep.receive_data(data)

    with trio.fail_after(20):
        async with raw_peer(half_answer) as port, connect(port, token=None) as conn:
            with pytest.raises(ConnectionClosed) as err:
                await conn.request(Abort(H1), timeout=5)
            assert "middle of a frame" in err.value.message
            assert conn.closed
            with pytest.raises(ConnectionClosed):
                await conn.send_piece(H1, 0, 0, b"x")


async def test_silent_peer_after_auth_hits_the_idle_timeout() -> None:
    with trio.fail_after(20):
        async with running_server(ping_interval=0.05, idle_timeout=0.3) as (port, _, _):
            # A well-behaved client answers pings itself; it stays up well past idle_timeout.
            async with connect(port, ping_interval=0.05) as conn:
                await trio.sleep(0.9)
                assert not conn.closed
                assert (await conn.request(InitTorrent(H1), timeout=5)).status
            # A raw peer that never reads nor writes after the handshake is dropped.
            stream = await trio.open_tcp_stream(LOCAL, port)
            await raw_handshake(stream, "s3cret")
            replies = decode_all(await read_until_eof(stream), expect_magic=False)
            assert isinstance(replies[-1], m.Error)
            assert replies[-1].code == ErrorCode.TIMEOUT


async def test_a_slow_destination_handler_does_not_idle_out_a_live_source() -> None:
    """While every request slot is busy the destination deliberately stops reading; the
    source's pings then sit unread, which is *our* slowness, not the source's silence."""
    gate = trio.Event()
    handler = Handler()

    async def slow(request: Request) -> Response:
        await gate.wait()
        return InitResult(SyncStatus.READY, b"\xff", 8, 0)

    handler.request_hook = slow
    with trio.fail_after(20):
        async with (
            running_server(
                handler, ping_interval=0.05, idle_timeout=0.3, max_concurrent_requests=1
            ) as (port, _, _),
            connect(port, ping_interval=0.05) as conn,
        ):
            results: list[Response] = []

            async def ask() -> None:
                results.append(await conn.request(InitTorrent(H1), timeout=10))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                nursery.start_soon(ask)  # waits for the one slot: reading stops
                await wait_for(lambda: len(handler.requests) == 1)
                await trio.sleep(1.0)  # > 3 idle timeouts with the source pinging away
                gate.set()
            assert len(results) == 2
            assert not conn.closed


async def test_server_shutdown_tells_clients() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            budget = ByteBudget(1 << 20)
            server_scope = trio.CancelScope()

            async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                with server_scope:
                    await serve(
                        HostPort(LOCAL, 0),
                        Handler(),
                        token=None,
                        ssl_context=None,
                        budget=budget,
                        task_status=task_status,
                    )

            ports = await outer.start(run)
            async with connect(ports[0], token=None) as conn:
                await conn.request(InitTorrent(H1), timeout=5)
                server_scope.cancel()
                reason = await conn.wait_closed()
                assert reason.code == ErrorCode.SHUTTING_DOWN
                with pytest.raises(ConnectionClosed) as err:
                    await conn.request(InitTorrent(H1), timeout=5)
                assert err.value.code == ErrorCode.SHUTTING_DOWN


async def test_connection_refused_is_an_oserror() -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOCAL)
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with pytest.raises(OSError):
        async with connect(port):
            pytest.fail("connected to a closed port")


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed(tmp_path_factory.mktemp("tls"), "qbsync-test")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_self_signed(tmp_path_factory.mktemp("tls-other"), "other")[0]


async def test_tls_round_trip(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    data = bytes(range(256)) * 4096  # 1 MiB
    with trio.fail_after(30):
        async with (
            running_server(ssl_context=server_ssl_context(cert, key)) as (port, _, _),
            connect(port, ssl_context=client_ssl_context(cert)) as conn,
        ):
            assert (await conn.request(InitTorrent(H1), timeout=5)).status == SyncStatus.READY
            acks = []
            async with trio.open_nursery() as nursery:
                for i in range(4):

                    async def one(i: int = i) -> None:
                        acks.append(await conn.send_piece(H1, i, 0, data))

                    nursery.start_soon(one)
            assert all(a.message == hashlib.sha1(data).hexdigest() for a in acks)


async def test_tls_client_rejects_an_unknown_certificate(
    tls_files: tuple[Path, Path], other_ca: Path
) -> None:
    cert, key = tls_files
    with trio.fail_after(20):
        async with running_server(ssl_context=server_ssl_context(cert, key)) as (port, h, _):
            with pytest.raises(WireError) as err:
                async with connect(port, ssl_context=client_ssl_context(other_ca)):
                    pytest.fail("trusted an unknown certificate")
            assert err.value.code == ErrorCode.AUTH_FAILED
            assert "TLS" in err.value.message
            # a plaintext client against the TLS server fails cleanly too
            with pytest.raises((WireError, OSError)):
                async with connect(port, connect_timeout=2):
                    pytest.fail("plaintext handshake against a TLS server")
            # and the server still serves a proper client
            async with connect(port, ssl_context=client_ssl_context(cert)) as conn:
                await conn.request(InitTorrent(H1), timeout=5)
            assert len(h.requests) == 1


async def test_tls_client_against_a_plaintext_server_fails_cleanly(
    tls_files: tuple[Path, Path],
) -> None:
    cert, _ = tls_files
    with trio.fail_after(20):
        async with running_server() as (port, handler, _):
            with pytest.raises(WireError) as err:
                async with connect(port, ssl_context=client_ssl_context(cert)):
                    pytest.fail("TLS handshake with a plaintext server")
            assert err.value.code == ErrorCode.AUTH_FAILED
            assert "TLS" in err.value.message
            async with connect(port) as conn:  # unaffected
                await conn.request(InitTorrent(H1), timeout=5)
            assert len(handler.requests) == 1


async def test_connection_gauges_return_to_baseline() -> None:
    gauge = metrics.wire_connections
    before = (gauge.labels("source")._value.get(), gauge.labels("destination")._value.get())
    with trio.fail_after(20):
        async with running_server() as (port, _, _):
            async with connect(port) as c1, connect(port) as c2:
                await c1.request(InitTorrent(H1), timeout=5)
                await c2.request(InitTorrent(H1), timeout=5)
                assert gauge.labels("source")._value.get() == before[0] + 2
                assert gauge.labels("destination")._value.get() == before[1] + 2
            await wait_for(lambda: gauge.labels("destination")._value.get() == before[1])
    assert gauge.labels("source")._value.get() == before[0]


async def test_half_open_flood_makes_room_by_closing_the_oldest() -> None:
    before = counter(metrics.wire_handshake_failures, "busy")
    with trio.fail_after(20):
        async with running_server(max_pending_handshakes=3, handshake_timeout=5) as (port, _, _):
            silent = [await trio.open_tcp_stream(LOCAL, port) for _ in range(3)]
            # The three silent clients hold every handshake slot: a fourth connection closes
            # the oldest of them (which sees the server's Hello, then end of stream) and counts
            # it as busy; the newcomer itself is admitted.
            extra = await trio.open_tcp_stream(LOCAL, port)
            oldest = await read_until_eof(silent[0])
            assert [type(msg) for msg in decode_all(oldest)] == [m.Hello]
            assert counter(metrics.wire_handshake_failures, "busy") == before + 1
            # A real source gets through at once, without anyone closing anything first.
            async with connect(port) as conn:
                result = await conn.request(InitTorrent(H1, probe=True), timeout=5)
                assert result.status == SyncStatus.READY
            for stream in [*silent, extra]:
                await stream.aclose()


async def test_300_half_open_connections_do_not_stop_a_real_source() -> None:
    """A flood of silent sockets from the source's own address (all of loopback is one host
    here) never holds more than the per-address cap, and a real source still authenticates."""
    with trio.fail_after(60):
        async with running_server(handshake_timeout=30) as (port, handler, _):
            flood = [await trio.open_tcp_stream(LOCAL, port) for _ in range(300)]
            async with connect(port) as conn:
                result = await conn.request(InitTorrent(H1, probe=True), timeout=10)
                assert result.status == SyncStatus.READY
            assert len(handler.requests) == 1
            # The server closed all but the newest DEFAULT_MAX_PENDING_PER_ADDRESS of them.
            closed = 0
            for stream in flood[:100]:
                with trio.move_on_after(5):
                    await read_until_eof(stream)
                    closed += 1
            assert closed == 100
            for stream in flood:
                await stream.aclose()


async def test_oversized_control_frame_is_refused_at_its_header() -> None:
    """An authenticated source announcing a 64 MiB InitTorrent is refused (frame-too-large)
    before the server reads the body; other connections are served meanwhile."""
    with trio.fail_after(20):
        async with running_server() as (port, _, budget), connect(port) as good:
            raw = await trio.open_tcp_stream(LOCAL, port)
            client = Endpoint(m.Role.SOURCE, token="s3cret")
            await raw.send_all(client.data_to_send())
            while client.state != State.OPEN:
                client.receive_data(await raw.receive_some(65536))
                while client.next_event() is not NEED_DATA:
                    pass
                await raw.send_all(client.data_to_send())
            await raw.send_all(
                HEADER.pack(64 * 1024 * 1024, codec.INIT_TORRENT, 0, 0, 1) + bytes(16)
            )
            # The server answers with a fatal Error and closes; we never sent a body byte.
            answer = decode_all(await read_until_eof(raw), expect_magic=False)
            assert answer == [m.Error(ErrorCode.FRAME_TOO_LARGE, answer[0].message)]
            assert "InitTorrent frame of 67108864 bytes exceeds the limit" in answer[0].message
            assert budget.used == 0
            result = await good.request(InitTorrent(H1, probe=True), timeout=5)
            assert result.status == SyncStatus.READY
            await raw.aclose()


async def test_large_control_frames_are_charged_to_the_byte_budget() -> None:
    """An InitTorrent carrying a big .torrent holds its size in the shared budget from before
    its body is read until its request is answered."""
    handler = Handler()
    entered, release = trio.Event(), trio.Event()

    async def slow_init(request: Request) -> Response:
        entered.set()
        await release.wait()
        return InitResult(SyncStatus.READY, b"\xff", 8, 0)

    handler.request_hook = slow_init
    torrent = bytes(300 * 1024)
    with trio.fail_after(20):
        async with (
            running_server(handler, budget=ByteBudget(4 << 20)) as (port, _, budget),
            connect(port) as conn,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(
                lambda: conn.request(InitTorrent(H1, torrent_file=torrent), timeout=10)
            )
            await entered.wait()
            assert budget.used >= len(torrent)
            release.set()
            await wait_for(lambda: budget.used == 0)
            # a small request is not charged at all
            entered, release = trio.Event(), trio.Event()
            release.set()
            await conn.request(InitTorrent(H1, probe=True), timeout=5)
            assert budget.used == 0
