"""Sans-IO framing: the frame header, encoders, and the incremental decoder.

Nothing here touches a socket (h11/wsproto style): bytes go in through
:meth:`FrameDecoder.receive_data`, typed events come out of :meth:`FrameDecoder.next_event`,
and the encoders return bytes for the caller to write.

Wire layout
-----------

After a side's ``Auth`` every frame it sends is followed by a 16-byte tag (not counted in
``length``; see :mod:`.keys` and :attr:`FrameDecoder.tag_size`).

Each side first sends the 8-byte :data:`MAGIC` (PNG-style: a high-bit byte, so 7-bit
channels, ``\\r\\n`` translation and HTTP clients are caught on the very first read). Then
frames::

    header (16 bytes, big-endian)           body (``length`` bytes)
    u32 length | u8 type | u8 flags | u16 reserved | u64 request_id

``flags`` and ``reserved`` must be zero in protocol version 1 (they exist so a later version
can use them after negotiating). The header layout and the ``Hello`` message are frozen
forever: they are what two different versions use to agree on a version.

Control bodies are attrs messages encoded by :mod:`qbsync.wire.codec`. A piece body is a fixed
48-byte binary header followed by the raw piece bytes, which are never re-encoded::

    u8 hash_len (20 | 32) | 3 zero bytes | 32 bytes info-hash (zero-padded) | u32 index | u64 offset

The piece length is the frame length minus 48.

Decoder design (why it looks like this)
---------------------------------------

* **Length before allocation.** A header is checked against the per-type limit the protocol
  layer sets (:meth:`FrameDecoder.set_limits`) *before* any of its body is buffered, so a
  4 GiB length prefix costs 16 bytes of memory and raises ``frame-too-large``. A type the
  current state does not allow is refused at the header too, so before authentication no peer
  can make us buffer more than the handshake limit.
* **Piece bodies bypass the buffer.** For a piece the decoder stops after the 48-byte piece
  header and reports :class:`PieceStart`. The I/O shell then allocates (or reuses) one buffer of
  exactly the piece size, takes whatever body bytes were already buffered with
  :meth:`FrameDecoder.readinto_body` (at most one read chunk), and lets the kernel write the
  rest straight into that buffer (``readv`` on plain TCP), reporting it with
  :meth:`FrameDecoder.body_received`. A multi-MiB piece is therefore copied once, by the
  kernel, and never re-sliced.
* **O(bytes) buffering.** Consumed bytes are dropped by moving a read offset; the buffer is
  compacted only when the dead prefix is both large and more than half of it, so reading many
  small frames out of a large chunk stays linear (the DoS concern h11's ``_receivebuffer``
  documents, and that h2's ``self.data = self.data[n:]`` re-slicing gets wrong).
* **Typed failures only.** Malformed input raises :class:`~qbsync.wire.errors.WireError` with
  a stable code (``protocol``, ``unknown-type``, ``frame-too-large``); once raised, the decoder
  stays failed and raises the same error again.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Final

import attrs

from . import codec
from . import messages as m
from .errors import ConnectionClosed, ErrorCode, LocalProtocolError, WireError

MAGIC: Final = b"\x89QBSYNC\n"
HEADER: Final = struct.Struct(">IBBHQ")
HEADER_SIZE: Final = HEADER.size  # 16
PIECE_HEADER: Final = struct.Struct(">B3s32sIQ")
PIECE_HEADER_SIZE: Final = PIECE_HEADER.size  # 48
MAX_REQUEST_ID: Final = 2**64 - 1
MAX_FRAME_LENGTH: Final = 2**32 - 1

_ZERO3 = b"\0\0\0"


# --- events ---------------------------------------------------------------------------------


class Sentinel:
    """The type of :data:`NEED_DATA` and :data:`END_OF_STREAM` (compare them with ``is``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = Sentinel("NEED_DATA")
"""No complete event yet: feed more bytes."""
END_OF_STREAM: Final = Sentinel("END_OF_STREAM")
"""The peer closed the stream cleanly, between frames."""


@attrs.frozen
class ControlFrame:
    """A complete control frame. ``raw`` is the body as received, kept for ``Hello`` frames
    (the handshake proofs cover both Hellos verbatim) and for tagged frames (the tag, which
    follows the body on the wire, covers ``header`` and the body; the decoder has checked it
    through ``check_tag`` before decoding). ``tag`` is empty for frames sent before the
    sender's Auth."""

    request_id: int
    message: m.ControlMessage
    raw: bytes = b""
    header: bytes = b""
    tag: bytes = b""


@attrs.frozen
class UndecodedControl:
    """A complete control frame whose body is larger than the decoder's
    :attr:`FrameDecoder.decode_inline_max`. The caller decodes it with :meth:`decode` (the I/O
    shell does so on a worker thread, so that a large or hostile body does not stall the event
    loop) and hands the result to :meth:`~qbsync.wire.protocol.Endpoint.deliver`."""

    request_id: int
    type_code: int
    body: bytes | bytearray = attrs.field(repr=False)

    def decode(self) -> ControlFrame:
        """The decoded frame; raises :class:`WireError` like the inline path."""
        return ControlFrame(self.request_id, codec.decode_message(self.type_code, self.body))


@attrs.frozen
class PieceStart:
    """A piece frame's header: ``length`` body bytes follow and must be taken with
    :meth:`FrameDecoder.readinto_body` / :meth:`FrameDecoder.body_received` before the next
    :meth:`FrameDecoder.next_event`."""

    request_id: int
    info_hash: str
    index: int
    offset: int
    length: int
    # Tagged connections: the 16-byte frame header plus the 48-byte piece header (the first
    # bytes the tag covers; the payload follows, then the 16-byte tag, which the shell reads
    # after the payload), and the frame counter the protocol layer assigned (see
    # ``Endpoint.piece_mac``).
    header: bytes = b""
    counter: int = 0


Event = ControlFrame | UndecodedControl | PieceStart | Sentinel


# --- encoders -------------------------------------------------------------------------------


def frame_header(type_code: int, request_id: int, length: int) -> bytes:
    """The 16-byte header of a frame with a ``length``-byte body."""
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise LocalProtocolError(ErrorCode.PROTOCOL, f"request id {request_id} out of range")
    if length > MAX_FRAME_LENGTH:
        raise LocalProtocolError(ErrorCode.FRAME_TOO_LARGE, f"body of {length} bytes")
    return HEADER.pack(length, type_code, 0, 0, request_id)


def encode_frame(type_code: int, request_id: int, body: bytes) -> bytes:
    """Header plus body in one ``bytes`` (for control frames, which are small)."""
    return frame_header(type_code, request_id, len(body)) + body


def encode_control(msg: m.ControlMessage, request_id: int = 0) -> bytes:
    """A complete control frame for ``msg``."""
    type_code, body = codec.encode_message(msg)
    return encode_frame(type_code, request_id, body)


def info_hash_bytes(info_hash: str) -> bytes:
    """The raw 20- or 32-byte form of a hex info-hash (validated)."""
    if not m.valid_info_hash(info_hash):
        raise LocalProtocolError(ErrorCode.BAD_REQUEST, f"invalid info-hash {info_hash!r}")
    return bytes.fromhex(info_hash)


def encode_piece_header(
    request_id: int, info_hash: str, index: int, offset: int, length: int
) -> bytes:
    """Frame header plus piece header (64 bytes). The caller writes ``length`` payload bytes
    right after it, as a separate write: the payload is never concatenated or copied."""
    raw = info_hash_bytes(info_hash)
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise LocalProtocolError(ErrorCode.PROTOCOL, f"request id {request_id} out of range")
    if not 0 <= index < 2**32 or not 0 <= offset < 2**64:
        raise LocalProtocolError(ErrorCode.BAD_REQUEST, "piece index or offset out of range")
    if not 0 <= length <= MAX_FRAME_LENGTH - PIECE_HEADER_SIZE:
        raise LocalProtocolError(ErrorCode.FRAME_TOO_LARGE, f"piece of {length} bytes")
    return HEADER.pack(
        PIECE_HEADER_SIZE + length, codec.PIECE, 0, 0, request_id
    ) + PIECE_HEADER.pack(len(raw), _ZERO3, raw.ljust(32, b"\0"), index, offset)


# --- decoder --------------------------------------------------------------------------------

_MAGIC_STATE = 0
_HEADER_STATE = 1
_CONTROL_BODY = 2
_PIECE_HEADER_STATE = 3
_PIECE_BODY = 4
_DONE = 5

# Compact the receive buffer only when the consumed prefix is at least this big *and* more
# than half the buffer: amortized O(1) per byte, and small frames never trigger a memmove.
_COMPACT_MIN = 64 * 1024


class FrameDecoder:
    """Incremental decoder for one direction of a connection.

    ``limits`` maps each frame type code the current protocol state accepts to its maximum body
    length; every other type is refused at its header (``unknown-type`` if this version does
    not know it, ``protocol`` if it is merely not allowed now). For piece frames the limit
    includes the 48-byte piece header.
    """

    def __init__(self, limits: Mapping[int, int], *, expect_magic: bool = True) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: WireError | None = None
        self._state = _MAGIC_STATE if expect_magic else _HEADER_STATE
        self._limits: dict[int, int] = dict(limits)
        # Control bodies above this many bytes come out as UndecodedControl for the caller to
        # decode off the event loop; None decodes every body inline (sans-IO users, tests).
        self.decode_inline_max: int | None = None
        # Bytes of tag after each frame's body (0 until the peer's Auth, then 16);
        # set by the protocol layer at a frame boundary, like the limits.
        self.tag_size = 0
        # Verifies a control frame's tag before its body is decoded (nothing an attacker on
        # the path injects is ever parsed); raises WireError. Pieces are checked by the shell
        # once their payload is in (``Endpoint.check_piece``).
        self.check_tag: Callable[[bytes, bytes | bytearray, bytes], None] | None = None
        self._header = b""
        # current frame
        self._type = 0
        self._request_id = 0
        self._length = 0
        self._remaining = 0  # piece body bytes still to come

    # -- configuration ---------------------------------------------------------------------

    def set_limits(self, limits: Mapping[int, int]) -> None:
        """Replace the accepted types and their limits (applies from the next header)."""
        self._limits = dict(limits)

    # -- input -----------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; an empty ``data`` means end of stream."""
        if self._eof:
            if data:
                raise LocalProtocolError(ErrorCode.PROTOCOL, "data received after end of stream")
            return
        if not data:
            self._eof = True
            return
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed."""
        return len(self._buf) - self._pos

    @property
    def at_eof(self) -> bool:
        """The peer's end of stream has been fed (``receive_data(b"")``)."""
        return self._eof

    @property
    def in_piece_body(self) -> bool:
        return self._state == _PIECE_BODY

    @property
    def control_body_length(self) -> int:
        """The body length of the control frame being buffered (0 between frames and in
        pieces): the shell charges it to its memory budget before reading the body."""
        return self._length if self._state == _CONTROL_BODY else 0

    @property
    def body_remaining(self) -> int:
        """Piece body bytes still expected (0 outside a piece body)."""
        return self._remaining if self._state == _PIECE_BODY else 0

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes complete the current step (a read-size hint for the shell)."""
        need = {
            _MAGIC_STATE: len(MAGIC),
            _HEADER_STATE: HEADER_SIZE,
            _CONTROL_BODY: self._length + self.tag_size,
            _PIECE_HEADER_STATE: PIECE_HEADER_SIZE,
        }.get(self._state)
        if need is None:
            return self._remaining if self._state == _PIECE_BODY else 0
        return max(need - self.buffered, 1)

    # -- piece bodies ------------------------------------------------------------------------

    def readinto_body(self, dest: memoryview) -> int:
        """Move already-buffered piece body bytes into ``dest``; returns how many (possibly
        0). Call repeatedly while the body is incomplete; once :attr:`buffered` is 0, let the
        transport write into ``dest`` directly and report it with :meth:`body_received`."""
        if self._state != _PIECE_BODY:
            raise LocalProtocolError(ErrorCode.PROTOCOL, "not inside a piece body")
        n = min(len(dest), self._remaining, len(self._buf) - self._pos)
        if n:
            with memoryview(self._buf) as view:
                dest[:n] = view[self._pos : self._pos + n]
            self._consume(n)
            self._body_progress(n)
        return n

    def body_received(self, n: int) -> None:
        """The transport wrote ``n`` piece body bytes directly into the caller's buffer."""
        if self._state != _PIECE_BODY:
            raise LocalProtocolError(ErrorCode.PROTOCOL, "not inside a piece body")
        if self.buffered:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL, "buffered body bytes must be taken with readinto_body first"
            )
        if not 0 <= n <= self._remaining:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL, f"{n} body bytes reported, {self._remaining} expected"
            )
        self._body_progress(n)

    def _body_progress(self, n: int) -> None:
        self._remaining -= n
        if self._remaining == 0:
            self._state = _HEADER_STATE

    # -- events ------------------------------------------------------------------------------

    def next_event(self) -> Event:
        """The next complete event, :data:`NEED_DATA`, or :data:`END_OF_STREAM`.

        Raises :class:`WireError` for malformed input (sticky) and :class:`ConnectionClosed`
        when the stream ends in the middle of a frame.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except LocalProtocolError:
            raise  # our own misuse: not the peer's fault, the stream is still intact
        except WireError as exc:
            self._error = exc
            self._state = _DONE
            raise

    def _next_event(self) -> Event:
        while True:
            state = self._state
            avail = len(self._buf) - self._pos
            if state == _PIECE_BODY:
                if self._eof and not avail:
                    raise ConnectionClosed("peer closed the connection in the middle of a piece")
                raise LocalProtocolError(
                    ErrorCode.PROTOCOL, "piece body pending: use readinto_body/body_received"
                )
            if state == _DONE:
                return END_OF_STREAM
            if state == _MAGIC_STATE:
                if avail < len(MAGIC):
                    if avail and bytes(self._buf[self._pos :]) != MAGIC[:avail]:
                        raise self._bad_magic()
                    return self._need(avail)
                if bytes(self._buf[self._pos : self._pos + len(MAGIC)]) != MAGIC:
                    raise self._bad_magic()
                self._consume(len(MAGIC))
                self._state = _HEADER_STATE
                continue
            if state == _HEADER_STATE:
                if avail < HEADER_SIZE:
                    return self._need(avail)
                length, type_code, flags, reserved, request_id = HEADER.unpack_from(
                    self._buf, self._pos
                )
                self._check_header(length, type_code, flags, reserved)
                if self.tag_size:
                    self._header = bytes(self._buf[self._pos : self._pos + HEADER_SIZE])
                self._consume(HEADER_SIZE)
                self._type, self._length, self._request_id = type_code, length, request_id
                self._state = _PIECE_HEADER_STATE if type_code == codec.PIECE else _CONTROL_BODY
                continue
            if state == _CONTROL_BODY:
                tagged = self._length + self.tag_size  # a tagged frame's tag follows its body
                if avail < tagged:
                    return self._need(avail)
                body, tag = self._take_control_body()
                self._state = _HEADER_STATE
                # The tag is checked here, in stream order and before any decoding (inline or
                # on a worker thread): nothing an attacker on the path injects is ever parsed.
                if self.tag_size and self.check_tag is not None:
                    self.check_tag(self._header, body, tag)
                inline_max = self.decode_inline_max
                if inline_max is not None and self._length > inline_max:
                    return UndecodedControl(self._request_id, self._type, body)
                msg = codec.decode_message(self._type, body)
                if self.tag_size:
                    return ControlFrame(self._request_id, msg, b"", self._header, tag)
                raw = bytes(body) if self._type == codec.HELLO else b""
                return ControlFrame(self._request_id, msg, raw)
            # _PIECE_HEADER_STATE
            if avail < PIECE_HEADER_SIZE:
                return self._need(avail)
            hash_len, zero, raw_hash, index, offset = PIECE_HEADER.unpack_from(self._buf, self._pos)
            if hash_len not in (20, 32) or zero != _ZERO3 or any(raw_hash[hash_len:]):
                raise WireError(ErrorCode.PROTOCOL, "malformed piece header")
            covered = b""
            if self.tag_size:
                covered = self._header + bytes(self._buf[self._pos : self._pos + PIECE_HEADER_SIZE])
            self._consume(PIECE_HEADER_SIZE)
            payload = self._length - PIECE_HEADER_SIZE
            # The "body" the shell takes is the payload and then, on a tagged connection, the
            # 16-byte tag that follows it (PieceStart.length counts the payload only).
            self._remaining = payload + self.tag_size
            self._state = _PIECE_BODY if self._remaining else _HEADER_STATE
            return PieceStart(
                self._request_id, raw_hash[:hash_len].hex(), index, offset, payload, covered
            )

    def _check_header(self, length: int, type_code: int, flags: int, reserved: int) -> None:
        limit = self._limits.get(type_code)
        if limit is None:
            if type_code not in codec.KNOWN_TYPES:
                raise WireError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {type_code}")
            raise WireError(
                ErrorCode.PROTOCOL, f"{codec.type_name(type_code)} frame not allowed here"
            )
        if flags or reserved:
            raise WireError(ErrorCode.PROTOCOL, "non-zero flags or reserved header bits")
        if length > limit:
            raise WireError(
                ErrorCode.FRAME_TOO_LARGE,
                f"{codec.type_name(type_code)} frame of {length} bytes exceeds the limit {limit}",
            )
        if type_code == codec.PIECE and length < PIECE_HEADER_SIZE:
            raise WireError(ErrorCode.PROTOCOL, f"piece frame of {length} bytes is too short")

    def _take_control_body(self) -> tuple[bytes | bytearray, bytes]:
        """The current control body and the tag after it (empty on an untagged connection),
        consumed. A large body that ends the buffer (the usual case: the peer sent nothing
        after it yet) is handed over as the buffer itself instead of copied, so a 32 MiB frame
        costs 32 MiB, not twice that, while it is decoded."""
        end = self._pos + self._length
        tagged = end + self.tag_size
        if self._length >= _COMPACT_MIN and tagged == len(self._buf):
            body = self._buf
            tag = bytes(body[end:tagged])
            del body[end:]  # dropping a suffix does not move the rest
            del body[: self._pos]  # O(1): bytearray drops a prefix by moving its start
            self._buf = bytearray()
            self._pos = 0
            return body, tag
        copied = bytes(self._buf[self._pos : end])
        tag = bytes(self._buf[end:tagged])
        self._consume(tagged - self._pos)
        return copied, tag

    def _need(self, avail: int) -> Sentinel:
        if not self._eof:
            return NEED_DATA
        if avail == 0 and self._state in (_HEADER_STATE, _MAGIC_STATE):
            self._state = _DONE
            return END_OF_STREAM
        raise ConnectionClosed("peer closed the connection in the middle of a frame")

    def _bad_magic(self) -> WireError:
        return WireError(
            ErrorCode.PROTOCOL, "bad magic: the peer does not speak the qbsync protocol"
        )

    def _consume(self, n: int) -> None:
        self._pos += n
        if self._pos >= len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_MIN and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
