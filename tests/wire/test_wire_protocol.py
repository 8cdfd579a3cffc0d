"""The sans-IO protocol endpoint: handshake, authentication, request ids, credit. No sockets."""

from __future__ import annotations

import os
from typing import Any

import attrs
import pytest

from qbsync.wire import codec, keys
from qbsync.wire import messages as m
from qbsync.wire.errors import ConnectionClosed, ErrorCode, LocalProtocolError, WireError
from qbsync.wire.frames import (
    END_OF_STREAM,
    HEADER,
    MAGIC,
    NEED_DATA,
    encode_control,
    encode_frame,
    encode_piece_header,
)
from qbsync.wire.protocol import (
    HANDSHAKE_MAX_FRAME,
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
from tests.fuzz.wire_helpers import PieceReceived, Receiver, forge, forge_piece_head

H1 = "c" * 40
SRC, DST = m.Role.SOURCE, m.Role.DESTINATION


class Pair:
    """A source and a destination endpoint joined by an in-memory link."""

    def __init__(
        self,
        client_token: str | None = "tok",
        server_token: str | None = "tok",
        *,
        window: int = 1000,
        max_piece: int = 5000,
        client_versions: tuple[int, int] = (2, 2),
        server_versions: tuple[int, int] = (2, 2),
    ) -> None:
        self.client = Endpoint(
            SRC,
            token=client_token,
            min_version=client_versions[0],
            max_version=client_versions[1],
        )
        self.server = Endpoint(
            DST,
            token=server_token,
            window=window,
            max_piece=max_piece,
            min_version=server_versions[0],
            max_version=server_versions[1],
        )
        self.to_server = bytearray(self.client.data_to_send())
        self.to_client = bytearray(self.server.data_to_send())
        self.rx_client = Receiver(self.client)
        self.rx_server = Receiver(self.server)
        self.client_events: list[Any] = []
        self.server_events: list[Any] = []

    def pump(self) -> None:
        """Deliver everything in flight, in both directions, until quiet."""
        while self.to_server or self.to_client:
            if self.to_server:
                data, self.to_server[:] = bytes(self.to_server), b""
                self.server_events += self.rx_server.feed(data)
                self.to_client += self.server.data_to_send()
            if self.to_client:
                data, self.to_client[:] = bytes(self.to_client), b""
                self.client_events += self.rx_client.feed(data)
                self.to_server += self.client.data_to_send()

    def open(self) -> Pair:
        self.pump()
        assert self.client.state == State.OPEN and self.server.state == State.OPEN
        return self


def handshake_failure(pair: Pair) -> tuple[WireError, list[Any]]:
    """Pump until one side raises; return that error and the other side's events."""
    with pytest.raises(WireError) as err:
        pair.pump()
    # deliver whatever the failing side queued (its Error frame) to the other side
    pending_to_client = bytes(pair.to_client) + pair.server.data_to_send()
    pending_to_server = bytes(pair.to_server) + pair.client.data_to_send()
    other: list[Any] = []
    for rx, data in ((pair.rx_client, pending_to_client), (pair.rx_server, pending_to_server)):
        try:
            other += rx.feed(data)
        except WireError as exc:
            other.append(exc)
    return err.value, other


# --- handshake ------------------------------------------------------------------------------


@pytest.mark.parametrize(("ctok", "stok"), [("tok", "tok"), (None, None), ("", ""), (None, "")])
def test_handshake_succeeds(ctok: str | None, stok: str | None) -> None:
    pair = Pair(ctok, stok, window=777, max_piece=4000).open()
    client_done = [e for e in pair.client_events if isinstance(e, HandshakeComplete)]
    server_done = [e for e in pair.server_events if isinstance(e, HandshakeComplete)]
    assert client_done == [HandshakeComplete(2, 4048, 777, "qbsync", pair.server.fingerprint)]
    assert server_done == [HandshakeComplete(2, 4048, 777, "qbsync", pair.client.fingerprint)]
    assert pair.client.available == pair.client.window == 777


def test_first_flight_is_magic_and_hello() -> None:
    out = Endpoint(SRC, token=None).data_to_send()
    assert out.startswith(MAGIC)
    length, type_code, *_ = HEADER.unpack_from(out, len(MAGIC))
    assert type_code == codec.HELLO and length <= HANDSHAKE_MAX_FRAME


def test_token_never_crosses_the_wire() -> None:
    token = "correct horse battery staple"
    pair = Pair(token, token)
    seen = bytes(pair.to_server) + bytes(pair.to_client)
    pair.open()
    assert token.encode() not in seen


def test_wrong_token_fails_on_both_sides() -> None:
    pair = Pair("alpha", "beta")
    err, client_events = handshake_failure(pair)
    assert err.code == ErrorCode.AUTH_FAILED  # raised by the destination
    assert pair.server.state == State.CLOSED
    assert [e for e in client_events if e is not END_OF_STREAM][-1] == PeerClosed(
        ErrorCode.AUTH_FAILED,
        "auth token mismatch: the source's proof does not match this destination's token",
    )


@pytest.mark.parametrize(
    ("ctok", "stok", "client_msg", "server_msg"),
    [
        (
            "tok",
            None,
            "this source has an auth token but the destination has none configured",
            "the source requires an auth token but this destination has none configured",
        ),
        (
            None,
            "tok",
            "the destination requires an auth token but this source has none configured",
            "this destination has an auth token but the source has none configured",
        ),
    ],
)
def test_token_on_one_side_only(
    ctok: str | None, stok: str | None, client_msg: str, server_msg: str
) -> None:
    """Both sides detect it from the Hellos alone and say which side lacks the token."""
    client, server = Endpoint(SRC, token=ctok), Endpoint(DST, token=stok)
    c_out, s_out = client.data_to_send(), server.data_to_send()
    server.receive_data(c_out)
    with pytest.raises(WireError) as s_err:
        server.next_event()
    client.receive_data(s_out)
    with pytest.raises(WireError) as c_err:
        client.next_event()
    assert s_err.value.code == c_err.value.code == ErrorCode.AUTH_FAILED
    assert client_msg in c_err.value.message
    assert server_msg in s_err.value.message
    # each queued an Error frame telling the other side
    assert encode_control(m.Error(ErrorCode.AUTH_FAILED, s_err.value.message)) in (
        server.data_to_send()
    )


def test_proofs_bind_role_version_and_transcript() -> None:
    th = keys.transcript_hash(b"hello-s", b"hello-d")
    base = keys.token_mac(b"tok", SRC, 2, th)
    assert len(base) == 32
    variants = [
        keys.token_mac(b"tok2", SRC, 2, th),
        keys.token_mac(b"tok", DST, 2, th),
        keys.token_mac(b"tok", SRC, 3, th),
        keys.token_mac(b"tok", SRC, 2, keys.transcript_hash(b"hello-X", b"hello-d")),
        keys.token_mac(b"tok", SRC, 2, keys.transcript_hash(b"hello-s", b"hello-X")),
        # the split between the Hellos matters too
        keys.token_mac(b"tok", SRC, 2, keys.transcript_hash(b"hello-sh", b"ello-d")),
    ]
    assert base not in variants and len(set(variants)) == len(variants)
    signed = {
        keys.signed_bytes(SRC, 2, th),
        keys.signed_bytes(DST, 2, th),
        keys.signed_bytes(SRC, 3, th),
        keys.signed_bytes(SRC, 2, keys.transcript_hash(b"hello-sh", b"ello-d")),
    }
    assert len(signed) == 4


def test_tampered_hello_breaks_authentication() -> None:
    """An on-path attacker rewriting the source's Hello (e.g. its version range) is caught."""
    client, server = Endpoint(SRC, token="tok"), Endpoint(DST, token="tok")
    flight = client.data_to_send()
    hello = codec.decode_message(codec.HELLO, flight[len(MAGIC) + 16 :])
    assert isinstance(hello, m.Hello)
    forged = attrs.evolve(hello, software="evil")
    server.receive_data(MAGIC + encode_control(forged))
    assert server.next_event() is NEED_DATA
    client.receive_data(server.data_to_send())
    assert client.next_event() is NEED_DATA
    server.receive_data(client.data_to_send())  # the source's Auth over the genuine Hello
    with pytest.raises(WireError) as err:
        server.next_event()
    assert err.value.code == ErrorCode.AUTH_FAILED


def test_version_negotiation_picks_the_highest_common_version() -> None:
    pair = Pair(client_versions=(2, 3), server_versions=(2, 5))
    pair.pump()
    assert pair.client.version == pair.server.version == 3


def test_version_mismatch_fails_on_both_sides() -> None:
    client = Endpoint(SRC, token=None, min_version=3, max_version=4)
    server = Endpoint(DST, token=None, min_version=1, max_version=2)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    for ep in (client, server):
        with pytest.raises(WireError) as err:
            ep.next_event()
        assert err.value.code == ErrorCode.UNSUPPORTED_VERSION
        assert "upgrade the older side" in err.value.message


@pytest.mark.parametrize(
    ("hello", "why"),
    [
        (m.Hello(SRC, 1, 1, b"n" * 32, auth_required=False), "expected a destination"),
        (m.Hello(DST, 1, 1, b"n" * 31, auth_required=False), "nonce"),
        (m.Hello(DST, 2, 1, b"n" * 32, auth_required=False), "version range"),
        (m.Hello(DST, 0, 1, b"n" * 32, auth_required=False), "version range"),
    ],
)
def test_bad_hello(hello: m.Hello, why: str) -> None:
    client = Endpoint(SRC, token=None)
    client.receive_data(MAGIC + encode_control(hello))
    with pytest.raises(WireError) as err:
        client.next_event()
    assert err.value.code == ErrorCode.PROTOCOL and why in err.value.message


@pytest.mark.parametrize(
    "frame",
    [
        encode_control(m.InitTorrent(H1), 1),  # a request before authentication
        encode_control(m.Ping()),
        encode_piece_header(1, H1, 0, 0, 10) + bytes(10),
        encode_control(m.AuthOk(1, 100, 100)),  # the destination never receives AuthOk
        encode_frame(codec.HELLO, 0, bytes(HANDSHAKE_MAX_FRAME + 1)),  # oversized hello
    ],
)
def test_nothing_but_the_handshake_before_authentication(frame: bytes) -> None:
    server = Endpoint(DST, token="tok")
    server.receive_data(MAGIC + frame)
    with pytest.raises(WireError) as err:
        server.next_event()
    assert err.value.code in (ErrorCode.PROTOCOL, ErrorCode.FRAME_TOO_LARGE)
    assert server.state == State.CLOSED


def test_auth_out_of_phase_and_malformed() -> None:
    pair = Pair("tok", "tok")
    pair.server.receive_data(bytes(pair.to_server))  # client hello
    pair.to_server.clear()
    assert pair.server.next_event() is NEED_DATA
    pair.server.receive_data(encode_control(m.Auth(b"short")))
    with pytest.raises(WireError) as err:
        pair.server.next_event()
    assert err.value.code == ErrorCode.PROTOCOL
    server = Endpoint(DST, token="tok")
    server.receive_data(MAGIC + encode_control(m.Auth(b"x" * 32)))  # Auth before Hello
    with pytest.raises(WireError):
        server.next_event()


@pytest.mark.parametrize(
    ("auth_ok", "code"),
    [
        (m.AuthOk(3, 1000, 1000), ErrorCode.UNSUPPORTED_VERSION),
        (m.AuthOk(2, 48, 1000), ErrorCode.PROTOCOL),
        (m.AuthOk(2, 2**32, 1000), ErrorCode.PROTOCOL),
        (m.AuthOk(2, 1000, 0), ErrorCode.PROTOCOL),
    ],
)
def test_bad_auth_ok(auth_ok: m.AuthOk, code: ErrorCode) -> None:
    client = Endpoint(SRC, token=None)
    server = Endpoint(DST, token=None)
    server.receive_data(client.data_to_send())
    assert server.next_event() is NEED_DATA
    client.receive_data(server.data_to_send())  # magic + Hello
    assert client.next_event() is NEED_DATA
    server.receive_data(client.data_to_send())  # the source's Auth
    assert isinstance(server.next_event(), HandshakeComplete)
    flight = server.data_to_send()  # Auth + AuthOk; the real AuthOk is replaced
    auth_len = HEADER.size + HEADER.unpack_from(flight)[0]
    server._send_counter = 0  # the forged AuthOk takes the real one's place in the stream
    client.receive_data(flight[:auth_len] + forge(server, auth_ok))
    with pytest.raises(WireError) as err:
        while client.next_event() is not NEED_DATA:
            pass
    assert err.value.code == code


def test_handshake_frame_with_request_id_is_refused() -> None:
    server = Endpoint(DST, token=None)
    hello = m.Hello(SRC, 1, 1, b"n" * 32, auth_required=False)
    server.receive_data(MAGIC + encode_control(hello, 5))
    with pytest.raises(WireError):
        server.next_event()


def test_peer_error_during_handshake_is_an_event() -> None:
    client = Endpoint(SRC, token=None)
    client.receive_data(MAGIC + encode_control(m.Error(ErrorCode.SHUTTING_DOWN, "bye")))
    assert client.next_event() == PeerClosed(ErrorCode.SHUTTING_DOWN, "bye")
    assert client.state == State.CLOSED
    assert client.next_event() is END_OF_STREAM


def test_eof_during_handshake() -> None:
    client = Endpoint(SRC, token=None)
    client.receive_data(MAGIC[:4])
    client.receive_data(b"")
    with pytest.raises(ConnectionClosed):
        client.next_event()
    client = Endpoint(SRC, token=None)
    client.receive_data(b"")
    assert client.next_event() is END_OF_STREAM


# --- requests, pieces, credit ---------------------------------------------------------------


def test_requests_and_responses_are_matched() -> None:
    pair = Pair().open()
    r1, f1 = pair.client.send_request(m.InitTorrent(H1))
    r2, f2 = pair.client.send_request(m.Abort(H1))
    assert (r1, r2) == (1, 2)
    pair.to_server += f1 + f2
    pair.pump()
    assert pair.server_events[-2:] == [
        RequestReceived(1, m.InitTorrent(H1)),
        RequestReceived(2, m.Abort(H1)),
    ]
    assert pair.server.outstanding == 2
    pair.to_client += pair.server.send_response(2, m.Error(ErrorCode.NOT_FOUND, "x"))
    pair.to_client += pair.server.send_response(1, m.InitResult(m.SyncStatus.COMPLETE))
    pair.pump()
    assert pair.client_events[-2:] == [
        ResponseReceived(2, m.Error(ErrorCode.NOT_FOUND, "x")),
        ResponseReceived(1, m.InitResult(m.SyncStatus.COMPLETE)),
    ]
    assert pair.client.outstanding == pair.server.outstanding == 0


def test_server_refuses_wrong_answers_locally() -> None:
    pair = Pair().open()
    rid, frame = pair.client.send_request(m.Finalize(H1))
    pair.to_server += frame
    pair.pump()
    with pytest.raises(LocalProtocolError):
        pair.server.send_response(rid, m.AbortResult(True))  # wrong type
    with pytest.raises(LocalProtocolError):
        pair.server.send_response(rid + 1, m.FinalizeResult(m.SyncStatus.READY))  # unknown id
    long = pair.server.send_response(rid, m.Error(ErrorCode.INTERNAL, "x" * 5000))
    assert len(long) < 1100  # error messages are truncated
    with pytest.raises(LocalProtocolError):
        pair.server.send_response(rid, m.FinalizeResult(m.SyncStatus.READY))  # answered twice


def test_pieces_consume_and_return_credit() -> None:
    pair = Pair(window=1000).open()
    rid, frame = pair.client.piece_frame(H1, 7, 70, b"p" * 600)
    assert pair.client.available == 400 and pair.client.inflight_bytes == 600
    assert not pair.client.piece_fits(401) and pair.client.piece_fits(400)
    pair.to_server += frame
    pair.pump()
    assert pair.server_events[-1] == PieceReceived(pair.server_events[-1].start, b"p" * 600)
    assert pair.server.available == 400
    pair.to_client += pair.server.send_response(rid, m.PieceAck(H1, 7))
    assert pair.client.inflight_bytes == 600  # acked but credit not yet returned
    pair.to_client += pair.server.grant_credit(600)
    pair.pump()
    assert pair.client_events[-2:] == [
        ResponseReceived(rid, m.PieceAck(H1, 7)),
        CreditReceived(600, 1000),
    ]
    assert pair.client.available == 1000 and pair.client.inflight_bytes == 0


def test_piece_larger_than_the_window_needs_an_empty_pipe() -> None:
    pair = Pair(window=1000, max_piece=5000).open()
    assert pair.client.piece_fits(5000)  # nothing in flight: allowed
    rid, frame = pair.client.piece_frame(H1, 0, 0, bytes(3000))
    assert pair.client.available == -2000 and not pair.client.piece_fits(1)
    pair.to_server += frame
    pair.pump()
    assert pair.server.available == -2000
    pair.to_client += pair.server.send_response(rid, m.PieceAck(H1, 0))
    pair.to_client += pair.server.grant_credit(3000)
    pair.pump()
    assert pair.client.available == 1000


def test_credit_violation_is_detected_at_the_header() -> None:
    pair = Pair(window=1000).open()
    rid, frame = pair.client.piece_frame(H1, 0, 0, bytes(900))
    pair.to_server += frame
    pair.pump()
    pair.server.receive_data(forge_piece_head(pair.client, rid + 1, H1, 1, 0, 101))
    with pytest.raises(WireError) as err:
        pair.server.next_event()
    assert err.value.code == ErrorCode.CREDIT_EXCEEDED
    assert pair.server.decoder.buffered == 0  # the body was never waited for


def test_local_credit_and_size_checks() -> None:
    pair = Pair(window=1000, max_piece=2000).open()
    with pytest.raises(LocalProtocolError) as err:
        pair.client.send_piece(H1, 0, 0, 2001)
    assert err.value.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(LocalProtocolError):
        pair.client.send_piece(H1, 0, 0, 0)
    pair.client.send_piece(H1, 0, 0, 800)
    with pytest.raises(LocalProtocolError) as err:
        pair.client.send_piece(H1, 1, 0, 201)
    assert err.value.code == ErrorCode.CREDIT_EXCEEDED
    with pytest.raises(LocalProtocolError):
        pair.client.send_piece("bad", 1, 0, 1)
    assert pair.client.available == 200  # a refused piece consumes nothing


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (lambda c: forge_piece_head(c, 1, H1, 0, 0, 0), ErrorCode.PROTOCOL),  # empty piece
        (lambda c: forge(c, m.Abort(H1), 0), ErrorCode.PROTOCOL),  # request id 0
        (
            lambda c: forge(c, m.Abort(H1), 5) + forge(c, m.Abort(H1), 5),
            ErrorCode.PROTOCOL,  # ids must increase
        ),
        (
            lambda c: forge(c, m.Abort(H1), 5) + forge(c, m.Abort(H1), 4),
            ErrorCode.PROTOCOL,
        ),
        (lambda c: forge(c, m.Ping(), 3), ErrorCode.PROTOCOL),  # ping with an id
        (lambda c: forge(c, m.Error(ErrorCode.IO), 3), ErrorCode.PROTOCOL),
        (lambda c: forge(c, m.CreditGrant(1)), ErrorCode.PROTOCOL),  # sources never grant
        (lambda c: forge(c, m.PieceAck(H1, 0), 1), ErrorCode.PROTOCOL),
        (lambda c: encode_frame(99, 0, bytes(16)), ErrorCode.UNKNOWN_TYPE),
        (lambda c: forge_piece_head(c, 1, H1, 0, 0, 5001), ErrorCode.FRAME_TOO_LARGE),
        (lambda c: encode_control(m.Abort(H1), 1) + bytes(16), ErrorCode.BAD_TAG),  # untagged
        (lambda c: forge(c, m.Ping()) + forge(c, m.Ping())[:-1] + b"!", ErrorCode.BAD_TAG),
    ],
)
def test_destination_refuses_violations(frames: Any, code: ErrorCode) -> None:
    pair = Pair(window=10_000, max_piece=5000).open()
    pair.server.receive_data(frames(pair.client))
    with pytest.raises(WireError) as err:
        while True:
            event = pair.server.next_event()
            if event is NEED_DATA:
                break
            if hasattr(event, "length"):
                pair.server.decoder.body_received(event.length)
    assert err.value.code == code
    assert pair.server.state == State.CLOSED
    fatal = pair.server.data_to_send()  # the Error frame telling the source why
    # (tagged: the destination has sent its Auth)
    assert codec.decode_message(codec.ERROR, fatal[16:-16]) == m.Error(code, str(err.value.message))


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (lambda d: forge(d, m.InitResult(m.SyncStatus.READY), 9), "unknown request id"),
        (lambda d: forge(d, m.AbortResult(True), 1), "answers a InitTorrent"),
        (lambda d: forge(d, m.PieceAck(H1, 0), 1), "answers a InitTorrent"),
        (lambda d: forge(d, m.PieceAck(H1, 9), 2), "wrong piece"),
        (lambda d: forge(d, m.CreditGrant(11)), "exceed the window"),  # 10 bytes are in flight
        (lambda d: forge(d, m.CreditGrant(0)), "exceed the window"),
        (lambda d: forge(d, m.CreditGrant(-5)), "exceed the window"),
        (lambda d: forge(d, m.Pong(), 1), "with a request id"),
        (lambda d: forge(d, m.Abort(H1), 3), "not allowed"),
        (lambda d: encode_control(m.StartResult(True), 1) + bytes(16), "tag check"),
    ],
)
def test_source_refuses_violations(frame: Any, why: str) -> None:
    pair = Pair(window=1000).open()
    pair.client.send_request(m.InitTorrent(H1))
    pair.client.send_piece(H1, 0, 0, 10)
    pair.client.receive_data(frame(pair.server))
    with pytest.raises(WireError) as err:
        pair.client.next_event()
    assert why in err.value.message


def test_ping_pong_and_connection_error() -> None:
    pair = Pair().open()
    pair.to_server += pair.client.send_ping(42)
    pair.pump()
    assert pair.server_events[-1] == PingReceived(42)
    pair.to_client += pair.server.send_pong(42)
    pair.to_client += pair.server.send_error(ErrorCode.SHUTTING_DOWN, "bye")
    assert pair.server.state == State.CLOSED
    assert pair.server.send_error(ErrorCode.IO) == b""  # only one fatal error
    pair.pump()
    assert pair.client_events[-3:] == [
        PongReceived(42),
        PeerClosed(ErrorCode.SHUTTING_DOWN, "bye"),
        END_OF_STREAM,
    ]
    with pytest.raises(LocalProtocolError):
        pair.client.send_request(m.Abort(H1))
    with pytest.raises(LocalProtocolError):
        pair.client.send_ping()


def test_role_misuse_is_local() -> None:
    pair = Pair().open()
    with pytest.raises(LocalProtocolError):
        pair.server.send_request(m.Abort(H1))
    with pytest.raises(LocalProtocolError):
        pair.server.send_piece(H1, 0, 0, 1)
    with pytest.raises(LocalProtocolError):
        pair.client.send_response(1, m.AbortResult(True))
    with pytest.raises(LocalProtocolError):
        pair.client.grant_credit(1)
    with pytest.raises(LocalProtocolError):
        pair.server.grant_credit(1)  # nothing consumed: would exceed the window
    with pytest.raises(LocalProtocolError):
        pair.client.send_request(m.AbortResult(True))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Endpoint(SRC, token=None, nonce=b"short")
    with pytest.raises(ValueError):
        Endpoint(DST, token=None, window=0)


def test_trailing_bytes_after_close_are_ignored() -> None:
    pair = Pair().open()
    pair.client.receive_data(forge(pair.server, m.Error(ErrorCode.SHUTTING_DOWN)))
    assert isinstance(pair.client.next_event(), PeerClosed)
    pair.client.receive_data(b"garbage after the end")
    assert pair.client.next_event() is END_OF_STREAM


@pytest.mark.parametrize(
    ("type_code", "length"),
    [
        (codec.INIT_TORRENT, 64 * 1024 * 1024),  # the old single limit: now far too big
        (codec.INIT_TORRENT, m.MAX_INIT_TORRENT + 1),
        (codec.ABORT, 4097),
        (codec.PING, 65),
        (codec.FINALIZE, 1024 * 1024 + 1),
    ],
)
def test_control_frames_are_limited_per_type_at_the_header(type_code: int, length: int) -> None:
    """Each type has its own limit from the message table, checked before any of the body is
    buffered: a 64 MiB InitTorrent costs the destination 16 bytes, not 64 MiB."""
    pair = Pair().open()
    pair.server.receive_data(HEADER.pack(length, type_code, 0, 0, 7) + bytes(16))
    with pytest.raises(WireError) as err:
        pair.server.next_event()
    assert err.value.code == ErrorCode.FRAME_TOO_LARGE
    assert pair.server.decoder.buffered <= HEADER.size + 16  # the header and tag, nothing more
    assert pair.server.state == State.CLOSED


@pytest.mark.parametrize("flip", [64, 64 + 300, -1])  # a piece-header byte, payload, tag
def test_an_altered_piece_is_refused_before_use(flip: int) -> None:
    pair = Pair(window=1000).open()
    _, frame = pair.client.piece_frame(H1, 3, 30, os.urandom(600))
    altered = bytearray(frame)
    altered[flip] ^= 1
    pair.to_server += altered
    with pytest.raises(WireError) as err:
        pair.pump()
    assert err.value.code in (ErrorCode.BAD_TAG, ErrorCode.PROTOCOL)
    assert not [e for e in pair.server_events if isinstance(e, PieceReceived)]
    if flip != 64:  # (the first piece-header byte is the hash length: refused at the header)
        assert err.value.code == ErrorCode.BAD_TAG
