"""Sans-IO framing and the control-message codec: exhaustive small cases, no sockets."""

from __future__ import annotations

import struct
import typing
from typing import Any

import pytest

from qbsync.wire import codec
from qbsync.wire import messages as m
from qbsync.wire.errors import ConnectionClosed, ErrorCode, LocalProtocolError, WireError
from qbsync.wire.frames import (
    END_OF_STREAM,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    NEED_DATA,
    PIECE_HEADER,
    PIECE_HEADER_SIZE,
    ControlFrame,
    FrameDecoder,
    PieceStart,
    encode_control,
    encode_frame,
    encode_piece_header,
)
from tests.fuzz.wire_helpers import PieceReceived, Receiver, all_types_decoder

H1 = "0123456789abcdef0123456789abcdef01234567"
H2 = "ab" * 32


def code_of(fn: Any) -> ErrorCode:
    with pytest.raises(WireError) as err:
        fn()
    return err.value.code


# --- codec ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        1,
        -1,
        63,
        -64,
        64,
        2**63 - 1,
        -(2**63),
        "",
        "héllo ✓",
        b"",
        b"\x00\xff" * 100,
        [],
        [1, "a", b"b", None, [True]],
        {},
        {"a": {"b": {"c": [1, 2, {"d": b"x"}]}}},
    ],
)
def test_pack_round_trip(value: Any) -> None:
    assert codec.unpack(codec.pack(value)) == value


def test_pack_tuples_become_lists_and_bytes_like_become_bytes() -> None:
    assert codec.unpack(codec.pack((1, 2))) == [1, 2]
    assert codec.unpack(codec.pack(bytearray(b"ab"))) == b"ab"
    assert codec.unpack(codec.pack(memoryview(b"cd"))) == b"cd"


@pytest.mark.parametrize(
    ("value", "exc"),
    [
        (2**63, ValueError),
        (-(2**63) - 1, ValueError),
        (1.5, TypeError),
        ({1: 2}, TypeError),
        (object(), TypeError),
        ([[[[[[[[[[[]]]]]]]]]]], ValueError),
    ],
)
def test_pack_refuses_what_it_cannot_represent(value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        codec.pack(value)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "truncated"),
        (b"\x09", "unknown value tag"),
        (b"\x03", "truncated"),
        (b"\x03" + b"\xff" * 11, "varint too long"),
        (b"\x03" + b"\xff" * 9 + b"\x7f", "overflow"),
        (b"\x04\x02\xc3", "exceeds"),
        (b"\x04\x01\xff", "UTF-8"),
        (b"\x05\x80\x80\x80\x80\x10", "exceeds"),
        (b"\x06\xff\xff\xff\x0f", "cannot fit"),
        (b"\x07\xff\xff\xff\x0f", "cannot fit"),
        (b"\x07\x01\x03\x02\x00", "map key is not a string"),
        (b"\x07\x02\x04\x01a\x00\x04\x01a\x00", "duplicate key"),
        (b"\x00\x00", "trailing"),
        (b"\x06\x01" * 20 + b"\x00", "nesting too deep"),
    ],
)
def test_unpack_malformed(body: bytes, why: str) -> None:
    with pytest.raises(WireError) as err:
        codec.unpack(body)
    assert err.value.code == ErrorCode.PROTOCOL
    assert why in err.value.message


def test_every_message_type_round_trips_with_its_code() -> None:
    samples: list[m.ControlMessage] = [
        m.Hello(m.Role.SOURCE, 1, 2, b"n" * 32, "qbsync/test", False),
        m.Hello(m.Role.SOURCE, 2, 2, b"n" * 32, "qbsync/test", True, b"k" * 32, b"e" * 32),
        m.Auth(b"\x01" * 32),
        m.Auth(b"", b"\x02" * 64),
        m.AuthOk(1, 1 << 20, 1 << 26),
        m.Error(ErrorCode.HASH_MISMATCH, "x"),
        m.CreditGrant(5),
        m.Ping(7),
        m.Pong(7),
        m.InitTorrent(
            H1,
            "name",
            b"d4:infod...ee",
            (m.FileEntry("a/b.bin", 10, True, 1, 2), m.FileEntry("c", 0, False)),
            16384,
            10,
            1,
            "movies",
            True,
            False,
        ),
        m.InitResult(m.SyncStatus.READY, b"\x80", 1, 0),
        m.Finalize(H2, "cat", ("t1", "t2"), "sub"),
        m.FinalizeResult(m.SyncStatus.VERIFYING, "later"),
        m.Abort(H1, False),
        m.AbortResult(True),
        m.StartTorrent(H1, "synced"),
        m.StartResult(False),
        m.OpenConnection(2),
        m.OpenConnectionResult(1),
        m.PieceAck(H1, 3, ErrorCode.IO, "disk full"),
    ]
    assert {type(s) for s in samples} == set(codec.MESSAGE_TYPES.values())
    for msg in samples:
        code, body = codec.encode_message(msg)
        assert codec.MESSAGE_TYPES[code] is type(msg)
        assert codec.decode_message(code, body) == msg


def test_type_codes_are_stable() -> None:
    """Part of the protocol: changing a number breaks every deployed peer."""
    assert {codec.type_name(c): c for c in sorted(codec.KNOWN_TYPES)} == {
        "Hello": 1,
        "Auth": 2,
        "AuthOk": 3,
        "Error": 4,
        "CreditGrant": 5,
        "Ping": 6,
        "Pong": 7,
        "InitTorrent": 16,
        "InitResult": 17,
        "Finalize": 18,
        "FinalizeResult": 19,
        "Abort": 20,
        "AbortResult": 21,
        "StartTorrent": 22,
        "StartResult": 23,
        "OpenConnection": 24,
        "OpenConnectionResult": 25,
        "Piece": 32,
        "PieceAck": 33,
    }
    assert codec.type_name(99) == "type-99"


def test_piece_is_not_a_control_message() -> None:
    with pytest.raises(TypeError):
        codec.encode_message(m.Piece(H1, 0, 0, b"x"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "tree", "why"),
    [
        (codec.PING, [1], "not a map"),
        (codec.PING, {"payload": "1"}, "expected int"),
        (codec.PING, {"payload": True}, "expected int"),
        (codec.CREDIT_GRANT, {}, "nbytes"),
        (codec.ERROR, {"code": "no-such-code"}, "not a valid ErrorCode"),
        (codec.ERROR, {"code": 3}, "ErrorCode string"),
        (codec.FINALIZE, {"info_hash": H1, "tags": "abc"}, "expected a list"),
        (codec.FINALIZE, {"info_hash": H1, "tags": [1]}, "expected str"),
        (codec.AUTH, {"mac": "text"}, "expected bytes"),
        (codec.INIT_TORRENT, {"info_hash": H1, "files": [{"path": "a"}]}, "size"),
        (codec.HELLO, {"role": "neither"}, "Role"),
    ],
)
def test_decode_message_refuses_bad_trees(code: int, tree: Any, why: str) -> None:
    with pytest.raises(WireError) as err:
        codec.decode_message(code, codec.pack(tree))
    assert err.value.code == ErrorCode.PROTOCOL
    assert why in err.value.message


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    body = codec.pack({"payload": 4, "added_in_v2": [1, {"x": b""}]})
    assert codec.decode_message(codec.PING, body) == m.Ping(4)


@pytest.mark.parametrize(
    ("code", "msg"),
    [
        (codec.FINALIZE, m.Finalize(H1, completed_ms_ago=90_000)),
        (codec.START_TORRENT, m.StartTorrent(H1, tag="t", completed_ms_ago=0)),
    ],
)
def test_completed_ms_ago_round_trips_and_is_unknown_from_an_older_source(
    code: int, msg: m.ControlMessage
) -> None:
    """A source that predates ``completed_ms_ago`` sends no such key: it reads as unknown.
    (A destination that predates it skips the key, as above.)"""
    assert codec.encode_message(msg)[0] == code
    assert codec.decode_message(code, codec.encode_message(msg)[1]) == msg
    older = codec.decode_message(code, codec.pack({"info_hash": H1}))
    assert isinstance(older, (m.Finalize, m.StartTorrent))
    assert older.completed_ms_ago == m.COMPLETED_UNKNOWN


def test_decode_unknown_type_code() -> None:
    assert code_of(lambda: codec.decode_message(200, b"\x07\x00")) == ErrorCode.UNKNOWN_TYPE


# --- encoders -------------------------------------------------------------------------------


def test_header_and_piece_header_layout() -> None:
    header = encode_piece_header(7, H1, 5, 1 << 40, 1000)
    assert len(header) == HEADER_SIZE + PIECE_HEADER_SIZE == 64
    assert HEADER.unpack_from(header) == (PIECE_HEADER_SIZE + 1000, codec.PIECE, 0, 0, 7)
    hash_len, zero, raw, index, offset = PIECE_HEADER.unpack_from(header, HEADER_SIZE)
    assert (hash_len, zero, index, offset) == (20, b"\0\0\0", 5, 1 << 40)
    assert raw == bytes.fromhex(H1) + bytes(12)
    v2 = encode_piece_header(1, H2, 0, 0, 1)
    assert PIECE_HEADER.unpack_from(v2, HEADER_SIZE)[2] == bytes.fromhex(H2)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ((1, "xyz", 0, 0, 1), ErrorCode.BAD_REQUEST),
        ((1, H1.upper(), 0, 0, 1), ErrorCode.BAD_REQUEST),
        ((1, H1, -1, 0, 1), ErrorCode.BAD_REQUEST),
        ((1, H1, 2**32, 0, 1), ErrorCode.BAD_REQUEST),
        ((1, H1, 0, -1, 1), ErrorCode.BAD_REQUEST),
        ((1, H1, 0, 0, 2**32), ErrorCode.FRAME_TOO_LARGE),
        ((2**64, H1, 0, 0, 1), ErrorCode.PROTOCOL),
    ],
)
def test_piece_header_refuses_bad_values(args: tuple[Any, ...], code: ErrorCode) -> None:
    with pytest.raises(LocalProtocolError) as err:
        encode_piece_header(*args)
    assert err.value.code == code


def test_encode_frame_refuses_bad_request_id() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(codec.PING, -1, b"")


# --- decoder --------------------------------------------------------------------------------


def feed_all(data: bytes, decoder: FrameDecoder | None = None) -> list[Any]:
    receiver = Receiver(decoder or all_types_decoder())
    events = receiver.feed(data)
    return events + receiver.feed(b"")


def test_magic_then_frames() -> None:
    decoder = all_types_decoder(expect_magic=True)
    events = feed_all(MAGIC + encode_control(m.Ping(1)) + encode_control(m.Pong(2), 0), decoder)
    assert events == [ControlFrame(0, m.Ping(1)), ControlFrame(0, m.Pong(2)), END_OF_STREAM]


@pytest.mark.parametrize("bad", [b"G", b"\x89QBX", b"GET / HTTP/1.1\r\n\r\n", b"\x89QBSYNC\r"])
def test_bad_magic_is_detected_as_early_as_possible(bad: bytes) -> None:
    decoder = all_types_decoder(expect_magic=True)
    decoder.receive_data(bad)
    with pytest.raises(WireError) as err:
        decoder.next_event()
    assert err.value.code == ErrorCode.PROTOCOL and "magic" in err.value.message


def test_partial_magic_needs_data() -> None:
    decoder = all_types_decoder(expect_magic=True)
    decoder.receive_data(MAGIC[:3])
    assert decoder.next_event() is NEED_DATA
    assert decoder.bytes_wanted == len(MAGIC) - 3


def test_hello_frames_keep_their_raw_body() -> None:
    hello = m.Hello(m.Role.DESTINATION, 1, 1, b"n" * 32)
    events = feed_all(encode_control(hello) + encode_control(m.Ping()))
    assert events[0].raw == codec.encode_message(hello)[1]
    assert events[1].raw == b""


def test_pieces_and_control_frames_interleave() -> None:
    data = b"".join(
        [
            encode_control(m.Ping(1)),
            encode_piece_header(1, H1, 0, 0, 5) + b"hello",
            encode_piece_header(2, H2, 9, 99, 0),
            encode_control(m.InitTorrent(H1), 3),
            encode_piece_header(4, H1, 1, 5, 70_000) + bytes(range(256)) * 273 + bytes(112),
        ]
    )
    events = feed_all(data)
    assert events[0] == ControlFrame(0, m.Ping(1))
    assert events[1] == PieceReceived(PieceStart(1, H1, 0, 0, 5), b"hello")
    assert events[2] == PieceReceived(PieceStart(2, H2, 9, 99, 0), b"")
    assert events[3] == ControlFrame(3, m.InitTorrent(H1))
    assert events[4].start == PieceStart(4, H1, 1, 5, 70_000)
    assert events[4].data == bytes(range(256)) * 273 + bytes(112)
    assert events[5] is END_OF_STREAM


def test_byte_by_byte_equals_one_shot() -> None:
    data = (
        encode_control(m.Finalize(H1, tags=("a",)), 9)
        + encode_piece_header(10, H1, 2, 3, 300)
        + bytes(300)
    )
    receiver = Receiver(all_types_decoder())
    events: list[Any] = []
    for i in range(len(data)):
        events += receiver.feed(data[i : i + 1])
    assert events == feed_all(data)[:-1]


def test_length_is_checked_before_the_body_arrives() -> None:
    decoder = FrameDecoder({codec.PING: 10, codec.PIECE: 100}, expect_magic=False)
    decoder.receive_data(HEADER.pack(2**32 - 1, codec.PIECE, 0, 0, 1))  # header only
    with pytest.raises(WireError) as err:
        decoder.next_event()
    assert err.value.code == ErrorCode.FRAME_TOO_LARGE
    assert decoder.buffered == HEADER_SIZE  # nothing was allocated for the 4 GiB body
    decoder = FrameDecoder({codec.PING: 10}, expect_magic=False)
    decoder.receive_data(HEADER.pack(11, codec.PING, 0, 0, 0))
    assert code_of(decoder.next_event) == ErrorCode.FRAME_TOO_LARGE


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (HEADER.pack(0, 250, 0, 0, 0), ErrorCode.UNKNOWN_TYPE),
        (HEADER.pack(0, 0, 0, 0, 0), ErrorCode.UNKNOWN_TYPE),
        (HEADER.pack(0, codec.FINALIZE, 0, 0, 0), ErrorCode.PROTOCOL),  # known, not allowed
        (HEADER.pack(0, codec.PING, 1, 0, 0), ErrorCode.PROTOCOL),  # flags
        (HEADER.pack(0, codec.PING, 0, 1, 0), ErrorCode.PROTOCOL),  # reserved
        (HEADER.pack(47, codec.PIECE, 0, 0, 0), ErrorCode.PROTOCOL),  # shorter than piece hdr
    ],
)
def test_header_violations(header: bytes, code: ErrorCode) -> None:
    decoder = FrameDecoder({codec.PING: 100, codec.PIECE: 1000}, expect_magic=False)
    decoder.receive_data(header)
    assert code_of(decoder.next_event) == code


@pytest.mark.parametrize(
    "piece_header",
    [
        PIECE_HEADER.pack(21, b"\0\0\0", bytes(32), 0, 0),
        PIECE_HEADER.pack(20, b"\0\1\0", bytes(32), 0, 0),
        PIECE_HEADER.pack(20, b"\0\0\0", bytes(20) + b"\1" + bytes(11), 0, 0),
    ],
)
def test_malformed_piece_header(piece_header: bytes) -> None:
    decoder = all_types_decoder()
    decoder.receive_data(HEADER.pack(PIECE_HEADER_SIZE, codec.PIECE, 0, 0, 1) + piece_header)
    assert code_of(decoder.next_event) == ErrorCode.PROTOCOL


def test_errors_are_sticky() -> None:
    decoder = all_types_decoder()
    decoder.receive_data(HEADER.pack(0, 250, 0, 0, 0) + encode_control(m.Ping()))
    first = code_of(decoder.next_event)
    assert code_of(decoder.next_event) == first == ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize(
    "cut",
    [
        3,  # inside the header
        HEADER_SIZE + 2,  # inside a control body
    ],
)
def test_eof_mid_control_frame(cut: int) -> None:
    decoder = all_types_decoder()
    decoder.receive_data(encode_control(m.Finalize(H1))[:cut])
    decoder.receive_data(b"")
    with pytest.raises(ConnectionClosed):
        decoder.next_event()


@pytest.mark.parametrize("cut", [HEADER_SIZE + 10, 64, 64 + 50])
def test_eof_mid_piece(cut: int) -> None:
    data = encode_piece_header(1, H1, 0, 0, 100) + bytes(100)
    receiver = Receiver(all_types_decoder())
    receiver.feed(data[:cut])
    with pytest.raises(ConnectionClosed):
        receiver.feed(b"")


def test_eof_between_frames_is_clean() -> None:
    decoder = all_types_decoder(expect_magic=True)
    decoder.receive_data(b"")
    assert decoder.next_event() is END_OF_STREAM
    assert decoder.next_event() is END_OF_STREAM
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"more")


def test_piece_body_api_misuse_is_local() -> None:
    decoder = all_types_decoder()
    buf = memoryview(bytearray(10))
    with pytest.raises(LocalProtocolError):
        decoder.readinto_body(buf)
    with pytest.raises(LocalProtocolError):
        decoder.body_received(1)
    decoder.receive_data(encode_piece_header(1, H1, 0, 0, 10) + b"abc")
    start = decoder.next_event()
    assert isinstance(start, PieceStart)
    assert decoder.body_remaining == 10
    with pytest.raises(LocalProtocolError):
        decoder.next_event()  # body pending
    with pytest.raises(LocalProtocolError):
        decoder.body_received(1)  # 3 bytes still buffered: they come first
    assert decoder.readinto_body(buf) == 3
    assert decoder.body_remaining == 7 and decoder.bytes_wanted == 7
    with pytest.raises(LocalProtocolError):
        decoder.body_received(8)  # more than remains
    buf[3:10] = b"defghij"
    decoder.body_received(7)
    assert not decoder.in_piece_body
    assert bytes(buf) == b"abcdefghij"
    assert decoder.next_event() is NEED_DATA  # and a local error did not poison it


def test_receive_buffer_stays_linear_and_compact() -> None:
    """Thousands of frames in one chunk: each read is O(frame), and consumed bytes are freed."""
    frame = encode_control(m.Ping(1))
    count = 20_000
    decoder = all_types_decoder()
    decoder.receive_data(frame * count)
    seen = 0
    while decoder.next_event() is not NEED_DATA:
        seen += 1
    assert seen == count
    assert decoder.buffered == 0
    assert len(decoder._buf) == 0


def test_bytes_wanted_hints() -> None:
    decoder = all_types_decoder(expect_magic=True)
    assert decoder.bytes_wanted == len(MAGIC)
    decoder.receive_data(MAGIC + encode_control(m.Finalize(H1))[:5])
    assert decoder.next_event() is NEED_DATA
    assert decoder.bytes_wanted == HEADER_SIZE - 5
    decoder.receive_data(encode_control(m.Finalize(H1))[5:HEADER_SIZE])
    assert decoder.next_event() is NEED_DATA
    body_len = struct.unpack(">I", encode_control(m.Finalize(H1))[:4])[0]
    assert decoder.bytes_wanted == body_len


def test_request_unions_match_the_message_table() -> None:
    """The static ``Request``/``Response`` unions are the table's requests and answers."""
    requests = {s.cls for s in m.MESSAGE_TABLE if s.is_request}
    assert set(typing.get_args(m.Request)) == requests
    answers = {m.RESPONSE_TYPE[cls] for cls in requests} | {m.PieceAck, m.Error}
    assert set(typing.get_args(m.Response)) == answers
    # every request's generic base names the answer the table pairs it with
    assert m.RESPONSE_TYPE[m.InitTorrent] is m.InitResult
    assert m.RESPONSE_TYPE[m.Piece] is m.PieceAck


def test_every_control_message_has_a_small_limit_except_init_torrent() -> None:
    limits = {s.cls: s.max_body for s in m.MESSAGE_TABLE if s.cls is not m.Piece}
    assert limits.pop(m.InitTorrent) == m.MAX_INIT_TORRENT == m.MAX_CONTROL_FRAME
    assert max(limits.values()) <= 1024 * 1024
    assert m.MAX_CONTROL_FRAME < 64 * 1024 * 1024


# --- bounded decoding (issue 15, finding 4) -------------------------------------------------


def _bomb(n_maps: int) -> bytes:
    """An InitTorrent whose unknown key holds ``n_maps`` empty maps."""
    body = bytearray([codec._T_MAP, 2])  # two entries: info_hash and the bomb
    body += codec.pack("info_hash") + codec.pack(H1)
    body += codec.pack("bomb") + bytes([codec._T_LIST])
    codec._put_uvarint(body, n_maps)
    body += b"\x07\x00" * n_maps
    return bytes(body)


def test_unknown_key_bomb_is_skipped_without_building_objects() -> None:
    import tracemalloc

    body = _bomb(2_000_000)  # 4 MiB; the full decoder would build two million dicts
    tracemalloc.start()
    try:
        msg = codec.decode_message(codec.INIT_TORRENT, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert msg == m.InitTorrent(H1)
    assert peak < 1024 * 1024  # the body itself is not traced; no per-map objects


def test_values_built_per_message_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_ITEMS", 10)
    ok = m.Finalize(H1, tags=tuple(str(i) for i in range(5)))  # 5 map entries + 5 tags
    assert codec.decode_message(*codec.encode_message(ok)) == ok
    too_many = m.Finalize(H1, tags=tuple(str(i) for i in range(6)))
    with pytest.raises(WireError, match="more than 10 values"):
        codec.decode_message(*codec.encode_message(too_many))
    # skipped values are not charged
    body = codec.pack({"info_hash": H1, "later": list(range(100))})
    assert codec.decode_message(codec.FINALIZE, body) == m.Finalize(H1)


def test_a_container_where_a_scalar_belongs_is_refused_at_its_tag() -> None:
    body = codec.pack({"info_hash": H1, "name": [{}] * 1000})
    with pytest.raises(WireError, match="not a scalar"):
        codec.decode_message(codec.INIT_TORRENT, body)


def test_skipped_values_are_still_checked() -> None:
    for bad in (b"\x09", b"\x06\x05\x00", b"\x07\x01\x03\x00\x00", b"\x04\x7f"):
        body = codec.pack({"info_hash": H1})
        body = bytes([body[0], 2]) + body[2:] + codec.pack("x") + bad
        with pytest.raises(WireError) as err:
            codec.decode_message(codec.INIT_TORRENT, body)
        assert err.value.code == ErrorCode.PROTOCOL


def test_large_control_bodies_come_out_undecoded_when_asked() -> None:
    from qbsync.wire.frames import UndecodedControl

    msg = m.InitTorrent(H1, torrent_file=b"t" * 5000)
    dec = FrameDecoder({codec.INIT_TORRENT: 1 << 20}, expect_magic=False)
    dec.decode_inline_max = 4096
    dec.receive_data(encode_control(msg, 7) + encode_control(m.InitTorrent(H1), 8))
    big = dec.next_event()
    assert isinstance(big, UndecodedControl)
    assert big.decode() == ControlFrame(7, msg)
    small = dec.next_event()
    assert small == ControlFrame(8, m.InitTorrent(H1))
