"""A hypothesis state machine driving a source and a destination endpoint (sans-IO) through
handshake, requests, pieces, credit, pings and closes, with the bytes in flight delivered in
arbitrary chunk sizes and interleavings.

Invariants checked after every step:

* a well-behaved pair never raises a protocol error at each other; with mismatched tokens
  neither side ever reaches OPEN;
* every answer matches a request the source made, with the right type, exactly once;
* piece bytes arrive unchanged;
* credit: the source never has more than ``max(window, one piece)`` in flight, the
  destination never holds more than that, and the destination's view of the credit is never
  behind the source's (so it can police the source exactly);
* the source's ``inflight_bytes`` equals the sizes of its unanswered pieces.
"""

from __future__ import annotations

import hashlib
from typing import Any

import hypothesis
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from qbsync.wire import messages as m
from qbsync.wire.errors import ErrorCode, LocalProtocolError, WireError
from qbsync.wire.frames import END_OF_STREAM
from qbsync.wire.protocol import (
    CreditReceived,
    Endpoint,
    HandshakeComplete,
    PeerClosed,
    PingReceived,
    PongReceived,
    RequestReceived,
    ResponseReceived,
    State,
)

from .wire_helpers import PieceReceived, Receiver

H = "d" * 40
REQUESTS: dict[type, Any] = {
    m.InitTorrent: (m.InitTorrent(H, name="n", torrent_file=b"t" * 50), m.InitResult),
    m.Finalize: (m.Finalize(H, tags=("a",)), m.FinalizeResult),
    m.Abort: (m.Abort(H), m.AbortResult),
    m.StartTorrent: (m.StartTorrent(H, "synced"), m.StartResult),
    m.OpenConnection: (m.OpenConnection(1), m.OpenConnectionResult),
}
RESULTS: dict[type, Any] = {
    m.InitResult: m.InitResult(m.SyncStatus.READY, b"\x01\x02", 3),
    m.FinalizeResult: m.FinalizeResult(m.SyncStatus.COMPLETE),
    m.AbortResult: m.AbortResult(True),
    m.StartResult: m.StartResult(True),
    m.OpenConnectionResult: m.OpenConnectionResult(1),
}


def payload(rid: int, size: int) -> bytes:
    seed = hashlib.sha256(rid.to_bytes(8, "big")).digest()
    return (seed * (size // 32 + 1))[:size]


class WireMachine(RuleBasedStateMachine):
    @initialize(
        tokens=st.sampled_from(
            # matching pairs are the interesting majority; mismatches must fail cleanly
            [("t", "t"), ("t", "t"), (None, None), ("", None), ("t", "u"), ("t", None), (None, "t")]
        ),
        window=st.integers(min_value=1, max_value=6000),
        max_piece=st.integers(min_value=1, max_value=9000),
        pre_open=st.booleans(),
    )
    def setup(
        self,
        tokens: tuple[str | None, str | None],
        window: int,
        max_piece: int,
        pre_open: bool,
    ) -> None:
        self.client = Endpoint(m.Role.SOURCE, token=tokens[0])
        self.server = Endpoint(
            m.Role.DESTINATION, token=tokens[1], window=window, max_piece=max_piece
        )
        self.tokens_match = (tokens[0] or None) == (tokens[1] or None)
        self.window = window
        self.rx = {"c": Receiver(self.client), "s": Receiver(self.server)}
        self.wire = {"c": bytearray(), "s": bytearray()}  # bytes travelling *to* c / s
        self.wire["s"] += self.client.data_to_send()
        self.wire["c"] += self.server.data_to_send()
        self.eof_sent = {"c": False, "s": False}  # EOF travelling to c / s
        self.failures: dict[str, WireError] = {}
        self.peer_closed: dict[str, ErrorCode] = {}
        self.opened = {"c": False, "s": False}
        # model
        self.client_outstanding: dict[int, tuple[type, int]] = {}  # rid -> (expected, size)
        self.piece_data: dict[int, bytes] = {}
        self.server_requests: dict[int, Any] = {}
        self.server_pieces: dict[int, tuple[int, int]] = {}  # rid -> (length, index) held
        self.fatal_close_used = False
        self.next_index = 0
        if pre_open:  # start from a finished handshake half of the time (deeper runs)
            self.flush_network()

    # -- helpers ---------------------------------------------------------------------------

    def endpoint(self, side: str) -> Endpoint:
        return self.client if side == "c" else self.server

    def is_open(self, side: str) -> bool:
        return self.endpoint(side).state == State.OPEN

    def send(self, to: str, data: bytes) -> None:
        if not self.eof_sent[to]:
            self.wire[to] += data

    def receive(self, side: str, data: bytes) -> None:
        ep = self.endpoint(side)
        other = "s" if side == "c" else "c"
        try:
            events = self.rx[side].feed(data)
        except WireError as exc:
            assert not isinstance(exc, LocalProtocolError), exc
            self.failures[side] = exc
            self.send(other, ep.data_to_send())  # the Error frame telling the peer
            return
        self.send(other, ep.data_to_send())  # handshake flights
        for event in events:
            self.on_event(side, event)

    def on_event(self, side: str, event: Any) -> None:
        if isinstance(event, HandshakeComplete):
            assert self.tokens_match
            self.opened[side] = True
            hypothesis.event("handshake completed")
        elif isinstance(event, PeerClosed):
            self.peer_closed[side] = event.code
        elif event is END_OF_STREAM:
            pass
        elif isinstance(event, PingReceived):
            if self.is_open(side):
                self.send("s" if side == "c" else "c", self.endpoint(side).send_pong(event.payload))
        elif isinstance(event, PongReceived):
            pass
        elif side == "s" and isinstance(event, RequestReceived):
            assert event.request_id in self.client_outstanding
            self.server_requests[event.request_id] = event.message
        elif side == "s" and isinstance(event, PieceReceived):
            rid = event.start.request_id
            assert event.data == self.piece_data[rid]
            assert (event.start.info_hash, event.start.offset) == (H, event.start.index * 7)
            self.server_pieces[rid] = (event.start.length, event.start.index)
            held = sum(length for length, _ in self.server_pieces.values())
            hypothesis.event("piece received")
            if held > self.window:
                hypothesis.event("piece larger than the window received")
            assert held <= self.window or len(self.server_pieces) == 1
        elif side == "c" and isinstance(event, ResponseReceived):
            expected, _ = self.client_outstanding.pop(event.request_id)
            assert isinstance(event.message, (expected, m.Error))
            self.piece_data.pop(event.request_id, None)
        elif side == "c" and isinstance(event, CreditReceived):
            hypothesis.event("credit returned")
            assert event.available <= self.window
        else:  # pragma: no cover
            raise AssertionError(f"unexpected event {event!r} on {side}")

    # -- rules -----------------------------------------------------------------------------

    @rule(to=st.sampled_from(["c", "s"]), n=st.integers(min_value=1, max_value=12_000))
    def deliver(self, to: str, n: int) -> None:
        if to in self.failures or not self.wire[to]:
            return
        chunk = bytes(self.wire[to][:n])
        del self.wire[to][:n]
        self.receive(to, chunk)

    @rule()
    def flush_network(self) -> None:
        """Deliver everything in flight, both ways, until quiet."""
        while any(self.wire[to] and to not in self.failures for to in ("c", "s")):
            for to in ("c", "s"):
                if self.wire[to] and to not in self.failures:
                    chunk = bytes(self.wire[to])
                    self.wire[to].clear()
                    self.receive(to, chunk)

    @rule(to=st.sampled_from(["c", "s"]), dice=st.integers(0, 7))
    def deliver_all_then_eof(self, to: str, dice: int) -> None:
        """The other side closes its socket after everything it wrote arrived (rarely: a
        close ends the interesting part of a run)."""
        if dice or to in self.failures or self.eof_sent[to]:
            return
        while self.wire[to] and to not in self.failures:
            chunk = bytes(self.wire[to])
            self.wire[to].clear()
            self.receive(to, chunk)
        if to not in self.failures:
            self.eof_sent[to] = True
            self.receive(to, b"")

    @precondition(lambda self: self.client.state == State.OPEN)
    @rule(kind=st.sampled_from(sorted(REQUESTS, key=lambda t: t.__name__)))
    def client_request(self, kind: type) -> None:
        request, expected = REQUESTS[kind]
        rid, frame = self.client.send_request(request)
        self.client_outstanding[rid] = (expected, 0)
        self.send("s", frame)

    @precondition(lambda self: self.client.state == State.OPEN)
    @rule(data=st.data())
    def client_piece(self, data: Any) -> None:
        limit = self.client.max_frame - 48
        size = data.draw(st.integers(min_value=0, max_value=limit + 10), label="size")
        fits = self.client.piece_fits(size)
        available = self.client.available
        if size == 0 or size > limit or not fits:
            try:
                self.client.send_piece(H, 0, 0, size)
            except LocalProtocolError as exc:
                assert exc.code in (ErrorCode.FRAME_TOO_LARGE, ErrorCode.CREDIT_EXCEEDED)
                refused = exc.code.value
            else:  # pragma: no cover
                raise AssertionError("an illegal piece was accepted")
            assert self.client.available == available
            hypothesis.event(f"piece refused locally: {refused}")
            return
        index = self.next_index
        self.next_index += 1
        body = payload(self.client._last_request_id + 1, size)  # the id send_piece will use
        rid, frame = self.client.piece_frame(H, index, index * 7, body)
        self.piece_data[rid] = body
        self.client_outstanding[rid] = (m.PieceAck, size)
        self.send("s", frame)

    @precondition(lambda self: self.server.state == State.OPEN and self.server_requests)
    @rule(data=st.data(), fail=st.booleans())
    def server_answers(self, data: Any, fail: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.server_requests)))
        request = self.server_requests.pop(rid)
        result = RESULTS[m.RESPONSE_TYPE[type(request)]]
        if fail:
            result = m.Error(ErrorCode.BUSY, "later")
        self.send("c", self.server.send_response(rid, result))

    @precondition(lambda self: self.server.state == State.OPEN and self.server_pieces)
    @rule(data=st.data(), code=st.sampled_from([ErrorCode.OK, ErrorCode.HASH_MISMATCH]))
    def server_acks(self, data: Any, code: ErrorCode) -> None:
        rid = data.draw(st.sampled_from(sorted(self.server_pieces)))
        length, index = self.server_pieces.pop(rid)
        frame = self.server.send_response(rid, m.PieceAck(H, index, code))
        frame += self.server.grant_credit(length)
        self.send("c", frame)

    @precondition(lambda self: self.client.state == State.OPEN or self.server.state == State.OPEN)
    @rule(side=st.sampled_from(["c", "s"]), payload=st.integers(0, 2**63 - 1))
    def ping(self, side: str, payload: int) -> None:
        if self.is_open(side):
            self.send("s" if side == "c" else "c", self.endpoint(side).send_ping(payload))

    @rule(side=st.sampled_from(["c", "s"]), dice=st.integers(0, 7))
    def fatal_close(self, side: str, dice: int) -> None:
        if dice:
            return
        ep = self.endpoint(side)
        self.fatal_close_used = True
        was_closed = ep.state == State.CLOSED
        frame = ep.send_error(ErrorCode.SHUTTING_DOWN, "bye")
        assert (frame == b"") == was_closed
        self.send("s" if side == "c" else "c", frame)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def no_unexpected_failures(self) -> None:
        if self.tokens_match:
            assert not self.failures, self.failures
        else:
            assert not self.opened["c"] and not self.opened["s"]
            for exc in self.failures.values():
                assert exc.code == ErrorCode.AUTH_FAILED, exc
            if not self.fatal_close_used:
                for code in self.peer_closed.values():
                    assert code == ErrorCode.AUTH_FAILED

    @invariant()
    def credit_is_consistent(self) -> None:
        if not (self.opened["c"] and self.opened["s"]):
            return
        assert self.server.available >= self.client.available
        sizes = [size for _, size in self.client_outstanding.values()]
        assert self.client.inflight_bytes == sum(sizes)
        pieces_in_flight = sum(1 for s in sizes if s)
        assert self.client.inflight_bytes <= self.window or pieces_in_flight == 1
        assert self.client.available <= self.window


TestWireStateMachine = WireMachine.TestCase
