"""Property tests of the sans-IO wire core (hypothesis; ``HYPOTHESIS_PROFILE=ci`` = 500 examples).

The contract under test, copied from h11's fuzzing harness: whatever bytes arrive, the decoder
and the protocol endpoint either produce events or raise :class:`WireError` (never another
exception, never our own ``LocalProtocolError``), and memory stays bounded by the limits.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from qbsync.wire import codec
from qbsync.wire import messages as m
from qbsync.wire.errors import ConnectionClosed, ErrorCode, LocalProtocolError, WireError
from qbsync.wire.frames import (
    END_OF_STREAM,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    PIECE_HEADER_SIZE,
    ControlFrame,
    FrameDecoder,
    encode_control,
    encode_piece_header,
)
from qbsync.wire.protocol import Endpoint, HandshakeComplete, State

from .wire_helpers import (
    MESSAGE_STRATEGIES,
    PieceReceived,
    PieceSpec,
    Receiver,
    all_types_decoder,
    codec_trees,
    control_messages,
    forge,
    pieces,
)

request_ids = st.integers(min_value=0, max_value=2**64 - 1)

# A tree of what the converter produces: the codec must round-trip any of it.
trees = codec_trees(text=20, binary=40, key=8, max_leaves=25)


def frame_bytes(item: Any) -> bytes:
    if isinstance(item, PieceSpec):
        return (
            encode_piece_header(
                item.request_id, item.info_hash, item.index, item.offset, len(item.data)
            )
            + item.data
        )
    rid, msg = item
    return encode_control(msg, rid)


def expected_event(item: Any) -> Any:
    if isinstance(item, PieceSpec):
        return (item.request_id, item.info_hash, item.index, item.offset, item.data)
    rid, msg = item
    return (rid, msg)


def normalize(event: Any) -> Any:
    if isinstance(event, PieceReceived):
        s = event.start
        return (s.request_id, s.info_hash, s.index, s.offset, event.data)
    if isinstance(event, ControlFrame):
        return (event.request_id, event.message)
    return event


frame_items = st.lists(st.one_of(pieces, st.tuples(request_ids, control_messages)), max_size=8)


def decode_in_chunks(
    data: bytes, cuts: list[int], decoder: FrameDecoder | None = None
) -> list[Any]:
    receiver = Receiver(decoder or all_types_decoder())
    events: list[Any] = []
    prev = 0
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        if cut > prev:
            events += receiver.feed(data[prev:cut])
            prev = cut
    events += receiver.feed(b"")
    return [normalize(e) for e in events]


# --- codec ----------------------------------------------------------------------------------


MESSAGE_CLASSES = sorted(MESSAGE_STRATEGIES, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=[c.__name__ for c in MESSAGE_CLASSES])
@given(data=st.data(), request_id=request_ids)
def test_every_message_type_round_trips(cls: type, data: Any, request_id: int) -> None:
    """One property per message type, so each type gets the profile's full example count
    (drawn from ``one_of`` all types, each would get a sixteenth of it)."""
    msg = data.draw(MESSAGE_STRATEGIES[cls])
    code, body = codec.encode_message(msg)
    assert code == codec.TYPE_CODES[cls]
    assert codec.decode_message(code, body) == msg
    # ... and through the frame layer, as it travels.
    assert decode_in_chunks(encode_control(msg, request_id), []) == [
        (request_id, msg),
        END_OF_STREAM,
    ]


@given(trees)
def test_pack_round_trips_any_tree(tree: Any) -> None:
    assert codec.unpack(codec.pack(tree)) == tree


@given(st.binary(max_size=200))
def test_unpack_never_crashes(body: bytes) -> None:
    try:
        codec.unpack(body)
    except WireError as exc:
        assert exc.code == ErrorCode.PROTOCOL
        assert not isinstance(exc, LocalProtocolError)


@given(st.sampled_from(sorted(codec.MESSAGE_TYPES)), st.one_of(st.binary(max_size=200), trees))
def test_decode_message_never_crashes(code: int, body: Any) -> None:
    raw = body if isinstance(body, bytes) else codec.pack(body)
    try:
        msg = codec.decode_message(code, raw)
    except WireError as exc:
        assert exc.code == ErrorCode.PROTOCOL
    else:
        assert isinstance(msg, codec.MESSAGE_TYPES[code])


# --- framing --------------------------------------------------------------------------------


@given(frame_items, st.lists(st.integers(min_value=0, max_value=20_000), max_size=30))
def test_every_split_decodes_to_the_same_frames(items: list[Any], cuts: list[int]) -> None:
    data = b"".join(frame_bytes(i) for i in items)
    expected = [expected_event(i) for i in items] + [END_OF_STREAM]
    assert decode_in_chunks(data, []) == expected
    assert decode_in_chunks(data, cuts) == expected


@given(frame_items, st.data())
def test_every_truncation_is_a_prefix_or_a_clean_close(items: list[Any], data: Any) -> None:
    stream = b"".join(frame_bytes(i) for i in items)
    cut = data.draw(st.integers(min_value=0, max_value=len(stream)))
    full = [expected_event(i) for i in items]
    receiver = Receiver(all_types_decoder())
    events = [normalize(e) for e in receiver.feed(stream[:cut])] if cut else []
    try:
        events += [normalize(e) for e in receiver.feed(b"")]
    except ConnectionClosed:
        assert cut < len(stream)
    else:
        assert events[-1] is END_OF_STREAM
        events = events[:-1]
    assert events == full[: len(events)]


@given(st.binary(max_size=600), st.lists(st.integers(min_value=0, max_value=600), max_size=8))
def test_arbitrary_bytes_give_frames_or_wire_errors(junk: bytes, cuts: list[int]) -> None:
    for stream in (junk, MAGIC + junk):
        for decoder in (
            all_types_decoder(limit=300),
            all_types_decoder(limit=300, expect_magic=True),
            FrameDecoder({codec.PING: 20, codec.PIECE: 100}, expect_magic=False),
        ):
            try:
                decode_in_chunks(stream, cuts, decoder)
            except WireError as exc:
                assert not isinstance(exc, LocalProtocolError), exc
            assert decoder.buffered <= len(stream)


@given(frame_items, st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=4))
def test_corrupted_streams_give_frames_or_wire_errors(
    items: list[Any], flips: list[tuple[int, int]]
) -> None:
    stream = bytearray(b"".join(frame_bytes(i) for i in items))
    assume(stream)
    for pos, value in flips:
        stream[pos % len(stream)] = value
    try:
        decode_in_chunks(bytes(stream), [7, 100, 1000])
    except WireError as exc:
        assert not isinstance(exc, LocalProtocolError), exc


@given(
    st.integers(min_value=0, max_value=10_000),
    st.data(),
    st.sampled_from(sorted(codec.KNOWN_TYPES)),
)
def test_oversized_length_is_refused_before_any_body(limit: int, data: Any, type_code: int) -> None:
    length = data.draw(st.integers(min_value=limit + 1, max_value=2**32 - 1))
    decoder = FrameDecoder({type_code: limit}, expect_magic=False)
    decoder.receive_data(HEADER.pack(length, type_code, 0, 0, 1))
    try:
        decoder.next_event()
    except WireError as exc:
        assert exc.code == ErrorCode.FRAME_TOO_LARGE
    else:  # pragma: no cover - must not happen
        raise AssertionError("an oversized frame was accepted")
    assert decoder.buffered == HEADER_SIZE  # nothing allocated for the body


@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=0, max_value=255))
def test_header_validation_is_total(length: int, type_code: int) -> None:
    decoder = FrameDecoder(
        {codec.PING: 1 << 16, codec.PIECE: 1 << 20, codec.INIT_TORRENT: 1 << 20},
        expect_magic=False,
    )
    decoder.receive_data(HEADER.pack(length, type_code, 0, 0, 0))
    try:
        event = decoder.next_event()
    except WireError as exc:
        assert exc.code in (
            ErrorCode.UNKNOWN_TYPE,
            ErrorCode.PROTOCOL,
            ErrorCode.FRAME_TOO_LARGE,
        )
    else:
        # Accepted: waiting for a body within the limit, or an empty control body decoded.
        limit = {codec.PING: 1 << 16, codec.PIECE: 1 << 20, codec.INIT_TORRENT: 1 << 20}
        assert type_code in limit and length <= limit[type_code]
        if type_code == codec.PIECE:
            assert length >= PIECE_HEADER_SIZE
        del event


# --- the protocol endpoint ------------------------------------------------------------------


def open_pair(token: str | None) -> tuple[Endpoint, Endpoint]:
    client, server = Endpoint(m.Role.SOURCE, token=token), Endpoint(m.Role.DESTINATION, token=token)
    rx_c, rx_s = Receiver(client), Receiver(server)
    to_s, to_c = client.data_to_send(), server.data_to_send()
    while to_s or to_c:
        if to_s:
            rx_s.feed(to_s)
        if to_c:
            rx_c.feed(to_c)
        to_s, to_c = client.data_to_send(), server.data_to_send()
    assert client.state == server.state == State.OPEN
    return client, server


@given(
    st.sampled_from([m.Role.SOURCE, m.Role.DESTINATION]),
    st.sampled_from([None, "tok"]),
    st.booleans(),
    st.binary(max_size=400),
    st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_endpoint_survives_arbitrary_input(
    role: m.Role, token: str | None, authenticated: bool, junk: bytes, cuts: list[int]
) -> None:
    if authenticated:
        client, server = open_pair(token)
        ep = client if role == m.Role.SOURCE else server
    else:
        ep = Endpoint(role, token=token)
        ep.data_to_send()  # our own first flight
        junk = MAGIC + junk
    receiver = Receiver(ep)
    try:
        prev = 0
        for cut in [*sorted({min(c, len(junk)) for c in cuts}), len(junk)]:
            if cut > prev:
                for event in receiver.feed(junk[prev:cut]):
                    assert not isinstance(event, HandshakeComplete) or not authenticated
            prev = cut
        receiver.feed(b"")
    except WireError as exc:
        assert not isinstance(exc, LocalProtocolError), exc
        assert ep.state == State.CLOSED
        if not isinstance(exc, ConnectionClosed):
            fatal = ep.data_to_send()
            assert fatal  # the peer is told why
            tag = 16 if authenticated else 0  # after its Auth a side's frames end with a tag
            told = codec.decode_message(codec.ERROR, fatal[HEADER_SIZE : len(fatal) - tag])
            assert isinstance(told, m.Error) and told.code == exc.code


@given(st.lists(st.tuples(request_ids, control_messages), max_size=6), st.binary(max_size=64))
def test_endpoint_survives_well_framed_nonsense(frames: list[Any], tail: bytes) -> None:
    """Valid frames in any order (the decoder accepts them, the state machine must judge)."""
    for role in (m.Role.SOURCE, m.Role.DESTINATION):
        for authenticated in (False, True):
            if authenticated:
                client, server = open_pair(None)
                ep, peer = (client, server) if role == m.Role.SOURCE else (server, client)
                # tagged by the real peer, so the frames reach the state machine
                body = b"".join(forge(peer, msg, rid) for rid, msg in frames)
                stream = body + tail
            else:
                ep = Endpoint(role, token="tok")
                stream = MAGIC + b"".join(encode_control(msg, rid) for rid, msg in frames) + tail
            try:
                if stream:
                    Receiver(ep).feed(stream)
            except WireError as exc:
                assert not isinstance(exc, LocalProtocolError), exc
