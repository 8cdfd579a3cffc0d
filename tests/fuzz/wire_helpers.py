"""Sans-IO test helpers for the wire protocol (no sockets).

:class:`Receiver` plays the role of the Trio shell's receive loop: it feeds bytes to a
:class:`~qbsync.wire.frames.FrameDecoder` or :class:`~qbsync.wire.protocol.Endpoint` and
assembles piece bodies the way the shell does, through both paths the shell uses: already
buffered bytes via ``readinto_body`` and "direct" bytes (what ``recv_into`` would have written)
via ``body_received``.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import strategies as st

from qbsync.wire import codec
from qbsync.wire import messages as m
from qbsync.wire.errors import ErrorCode
from qbsync.wire.frames import END_OF_STREAM, NEED_DATA, FrameDecoder, PieceStart
from qbsync.wire.keys import TAG_SIZE
from qbsync.wire.protocol import Endpoint


@attrs.frozen
class PieceReceived:
    start: PieceStart
    data: bytes


class Receiver:
    """Feed bytes in any split; collect events, with pieces assembled into PieceReceived."""

    def __init__(self, target: FrameDecoder | Endpoint) -> None:
        self.target = target
        self.decoder = target.decoder if isinstance(target, Endpoint) else target
        self.start: PieceStart | None = None
        self.body = bytearray()
        self.got = 0
        self._want = 0  # body bytes of the current piece: payload, then its tag if tagged
        self.ended = False

    def feed(self, data: bytes | memoryview) -> list[Any]:
        events: list[Any] = []
        view = memoryview(data)
        if not len(view):
            self.target.receive_data(b"")
            return self._drain(events)
        # The direct path: nothing buffered, inside a body -> "recv_into" the piece buffer.
        if self.start is not None and self.decoder.buffered == 0:
            k = min(self._want - self.got, len(view))
            self.body[self.got : self.got + k] = view[:k]
            self.decoder.body_received(k)
            self.got += k
            view = view[k:]
            self._finish(events)
        if len(view):
            self.target.receive_data(view)
        return self._drain(events)

    def _finish(self, events: list[Any]) -> bool:
        assert self.start is not None
        if self.got < self._want:
            return False
        payload = bytes(self.body[: self.start.length])
        if isinstance(self.target, Endpoint) and self.start.header:
            # as the shell does: the tag (the 16 bytes after the payload) before any use
            self.target.check_piece(self.start, payload, bytes(self.body[self.start.length :]))
        events.append(PieceReceived(self.start, payload))
        self.start = None
        return True

    def _drain(self, events: list[Any]) -> list[Any]:
        while True:
            if self.start is not None:
                if self.got < self._want:
                    self.got += self.decoder.readinto_body(memoryview(self.body)[self.got :])
                if not self._finish(events):
                    if self.decoder.buffered == 0 and not self.decoder.at_eof:
                        return events
                    # EOF inside the body: let the decoder raise ConnectionClosed
                    self.target.next_event()
                    return events  # pragma: no cover - next_event raises
                continue
            event = self.target.next_event()
            if event is NEED_DATA:
                return events
            if event is END_OF_STREAM:
                self.ended = True
                events.append(event)
                return events
            if isinstance(event, PieceStart):
                self.start = event
                self._want = event.length + (TAG_SIZE if event.header else 0)
                self.body = bytearray(self._want)
                self.got = 0
                continue
            events.append(event)


def forge(sender: Endpoint, msg: m.ControlMessage, request_id: int = 0) -> bytes:
    """A frame as ``sender`` would send it (tagged with its keys and next counter): how tests
    inject frames an honest peer's protocol layer would never produce."""
    return sender._frame(msg, request_id)


def forge_piece_head(
    sender: Endpoint, request_id: int, info_hash: str, index: int, offset: int, length: int
) -> bytes:
    """A piece frame's head (frame and piece header) as ``sender`` would frame it, without
    consuming its credit: for tests of checks made at the header, before the tag."""
    from qbsync.wire.frames import encode_piece_header

    return encode_piece_header(request_id, info_hash, index, offset, length)


def all_types_decoder(limit: int = 1 << 20, *, expect_magic: bool = False) -> FrameDecoder:
    """A decoder accepting every known frame type up to ``limit`` bytes."""
    return FrameDecoder(dict.fromkeys(codec.KNOWN_TYPES, limit), expect_magic=expect_magic)


# --- strategies -----------------------------------------------------------------------------

info_hashes = st.one_of(
    st.binary(min_size=20, max_size=20).map(bytes.hex),
    st.binary(min_size=32, max_size=32).map(bytes.hex),
)
i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
small_text = st.text(max_size=40)
error_codes = st.sampled_from(list(ErrorCode))
file_entries = st.builds(
    m.FileEntry, path=small_text, size=i64, selected=st.booleans(), device=i64, inode=i64
)

MESSAGE_STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    m.Hello: st.builds(
        m.Hello,
        role=st.sampled_from(list(m.Role)),
        min_version=i64,
        max_version=i64,
        nonce=st.binary(max_size=40),
        software=small_text,
        auth_required=st.booleans(),
    ),
    m.Auth: st.builds(m.Auth, mac=st.binary(max_size=40)),
    m.AuthOk: st.builds(m.AuthOk, version=i64, max_frame=i64, initial_credit=i64),
    m.CreditGrant: st.builds(m.CreditGrant, nbytes=i64),
    m.Ping: st.builds(m.Ping, payload=i64),
    m.Pong: st.builds(m.Pong, payload=i64),
    m.Error: st.builds(m.Error, code=error_codes, message=small_text),
    m.InitTorrent: st.builds(
        m.InitTorrent,
        info_hash=st.one_of(info_hashes, small_text),
        name=small_text,
        torrent_file=st.binary(max_size=300),
        files=st.lists(file_entries, max_size=4).map(tuple),
        piece_length=i64,
        total_size=i64,
        num_pieces=i64,
        save_sub_path=small_text,
        resync=st.booleans(),
        probe=st.booleans(),
    ),
    m.InitResult: st.builds(
        m.InitResult,
        status=st.sampled_from(list(m.SyncStatus)),
        pieces_needed=st.binary(max_size=100),
        pieces_needed_count=i64,
        pieces_have_count=i64,
    ),
    m.Finalize: st.builds(
        m.Finalize,
        info_hash=info_hashes,
        category=small_text,
        tags=st.lists(small_text, max_size=5).map(tuple),
        save_sub_path=small_text,
    ),
    m.FinalizeResult: st.builds(
        m.FinalizeResult, status=st.sampled_from(list(m.SyncStatus)), message=small_text
    ),
    m.Abort: st.builds(m.Abort, info_hash=info_hashes, delete_files=st.booleans()),
    m.AbortResult: st.builds(m.AbortResult, existed=st.booleans()),
    m.StartTorrent: st.builds(m.StartTorrent, info_hash=info_hashes, tag=small_text),
    m.StartResult: st.builds(m.StartResult, started=st.booleans()),
    m.OpenConnection: st.builds(m.OpenConnection, count=i64),
    m.OpenConnectionResult: st.builds(m.OpenConnectionResult, accepted=i64),
    m.PieceAck: st.builds(
        m.PieceAck, info_hash=info_hashes, index=i64, code=error_codes, message=small_text
    ),
}
assert set(MESSAGE_STRATEGIES) == set(codec.MESSAGE_TYPES.values())

control_messages = st.one_of(*MESSAGE_STRATEGIES.values())


@attrs.frozen
class PieceSpec:
    request_id: int
    info_hash: str
    index: int
    offset: int
    data: bytes


pieces = st.builds(
    PieceSpec,
    request_id=st.integers(min_value=0, max_value=2**64 - 1),
    info_hash=info_hashes,
    index=u32,
    offset=st.integers(min_value=0, max_value=2**64 - 1),
    data=st.binary(min_size=0, max_size=3000),
)


def codec_trees(*, text: int, binary: int, key: int, max_leaves: int) -> st.SearchStrategy[Any]:
    """Trees of what the codec carries (None, bools, 64-bit ints, text, bytes, lists and maps
    of them), with strings of at most ``text``/``binary``/``key`` (map keys) long."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**63 - 1)
        | st.text(max_size=text)
        | st.binary(max_size=binary),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=key), children, max_size=4)
        ),
        max_leaves=max_leaves,
    )
