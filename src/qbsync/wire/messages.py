"""The typed messages of the qbsync protocol, and :data:`MESSAGE_TABLE`, the one list of them.

Control messages are attrs classes; the codec (:mod:`.codec`) turns them into bytes with one
cattrs converter, so adding a field here is the whole change. Piece payloads are *not* control
messages: :class:`Piece` has a fixed binary header and raw bytes (see :mod:`.frames`), so
multi-MiB data is never re-encoded.

:data:`MESSAGE_TABLE` gives each message its frame type code, who may send it, whether it
belongs to the handshake, and the largest body accepted. The codec's type codes, the
request/response pairing (from each request's :class:`RequestMessage` base) and the decoder's
per-state limits are all derived from it, so adding a request is: its two classes, one
``_request(...)`` line in the table, and a handler on the destination.

Conventions shared by both daemons:

* ``info_hash`` is the torrent hash as qBittorrent reports it: 40 lower-case hex characters
  (v1 or hybrid) or 64 (v2-only). Validated by :func:`valid_info_hash` on every message.
* Byte offsets are absolute offsets into the concatenated torrent content.
* Bitfields are BitTorrent-style: bit ``i`` is ``(field[i // 8] >> (7 - i % 8)) & 1``;
  see :mod:`qbsync.bitfield`.
* Every request gets exactly one response with the same request id: its ``*Result`` message
  or an :class:`Error`.
"""

from __future__ import annotations

import enum
import re
import typing
from typing import Any, Final, Generic, TypeVar

import attrs

from .errors import ErrorCode

PROTOCOL_VERSION = 2  # bump when a change is not backward compatible
# Version 1 had no peer identities and no frame tags: it is refused with ``upgrade-required``.
MIN_PROTOCOL_VERSION = 2

_HASH_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


def valid_info_hash(value: str) -> bool:
    return isinstance(value, str) and _HASH_RE.fullmatch(value) is not None


class Role(enum.StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"


class SyncStatus(enum.StrEnum):
    READY = "ready"  # stream the pieces in ``pieces_needed``
    COMPLETE = "complete"  # already in the destination qBittorrent, verified
    VERIFYING = "verifying"  # destination qBittorrent is checking: ask again later


R = TypeVar("R")


class RequestMessage(Generic[R]):
    """Base of every request the source sends; ``R`` is the result type that answers it.

    The typed request APIs (``ClientConnection.request``, ``ConnectionPool.request``) take a
    ``RequestMessage[R]`` and return ``R``, so the checker knows every result's type at its use.
    """

    __slots__ = ()


# --- handshake (only these are accepted before authentication succeeds) ---------------------


@attrs.frozen
class Hello:
    """First message from each side: versions, a fresh nonce, the sender's long-term identity
    key and a fresh ephemeral key. Both Hello bodies go into the transcript every proof covers.
    (Version 1 peers send no keys; they are refused with ``upgrade-required``.)"""

    role: Role
    min_version: int
    max_version: int
    nonce: bytes  # 32 random bytes
    software: str = "qbsync"
    auth_required: bool = True  # False when this side has no token configured
    identity: bytes = b""  # raw Ed25519 public key (32 bytes); required from version 2
    ephemeral: bytes = b""  # raw X25519 public key (32 bytes), fresh per connection
    # The sender's announced name (a source's --source-name): the destination keeps per-source
    # counts under it and lets one source at a time sync an info-hash. Covered by the Auth MACs
    # (they sign both Hello bodies), so nobody on the path can change it.
    instance: str = ""


@attrs.frozen
class Auth:
    """The sender's proofs over the transcript (``wire.keys``; the exact bytes are in
    docs/wire-protocol.md, "Handshake"): an Ed25519 signature with its identity key, and the
    HMAC-SHA256 of the shared token when both sides have one (empty otherwise)."""

    mac: bytes = b""
    signature: bytes = b""


@attrs.frozen
class AuthOk:
    """Sent by the destination once both proofs checked; carries the negotiated limits."""

    version: int
    max_frame: int  # largest frame body either side may send
    initial_credit: int  # piece bytes the source may send before the first CreditGrant


# --- connection management ------------------------------------------------------------------


@attrs.frozen
class CreditGrant:
    """Receiver allows ``nbytes`` more piece payload bytes on this connection."""

    nbytes: int


@attrs.frozen
class Ping:
    payload: int = 0


@attrs.frozen
class Pong:
    payload: int = 0


@attrs.frozen
class Error:
    """A failure. With request id 0 it is about the connection, which then closes."""

    code: ErrorCode
    message: str = ""


# --- torrent lifecycle ----------------------------------------------------------------------


@attrs.frozen
class FileEntry:
    """One file of the torrent, in torrent order, as the source qBittorrent lists it."""

    path: str  # torrent-relative, "/"-separated, includes the root folder if any
    size: int
    selected: bool = True  # qBittorrent priority > 0
    device: int = 0  # source st_dev, 0 = unknown (used to detect hardlinks)
    inode: int = 0  # source st_ino, 0 = unknown


@attrs.frozen
class InitTorrent(RequestMessage["InitResult"]):
    """Initialize or resume a torrent on the destination.

    With ``probe=True`` only the status is asked: nothing is created and ``files`` and
    ``torrent_file`` may be empty (the Go reference's "CheckTorrentStatus").
    """

    info_hash: str
    name: str = ""
    torrent_file: bytes = b""  # the raw .torrent; its info-hash must equal ``info_hash``
    files: tuple[FileEntry, ...] = ()
    piece_length: int = 0
    total_size: int = 0
    num_pieces: int = 0
    save_sub_path: str = ""  # sub-directory under the destination save path (category path)
    resync: bool = False  # file selection changed: drop prior state and start over
    probe: bool = False


@attrs.frozen
class InitResult:
    status: SyncStatus
    pieces_needed: bytes = b""  # bitfield over all pieces; empty when not READY
    pieces_needed_count: int = -1  # -1 = unknown (probe found no state)
    pieces_have_count: int = 0


# ``completed_ms_ago`` on Finalize and StartTorrent: how long ago, in milliseconds, the torrent
# finished downloading on the source, measured on the source's clock as it sends the request;
# this value when unknown (and from a source that predates the field: unknown keys are skipped
# and missing ones take their default). A duration rather than a time, so the two machines'
# clocks are never compared: the destination adds its own elapsed time to show "complete on
# the source -> seeding here" in its activity log.
COMPLETED_UNKNOWN = -1


@attrs.frozen
class Finalize(RequestMessage["FinalizeResult"]):
    """All pieces sent: verify, add to the destination qBittorrent, tag."""

    info_hash: str
    category: str = ""
    tags: tuple[str, ...] = ()  # the source torrent's tags, copied to the destination
    save_sub_path: str = ""
    completed_ms_ago: int = COMPLETED_UNKNOWN  # see COMPLETED_UNKNOWN


@attrs.frozen
class FinalizeResult:
    """``status`` VERIFYING means "still running in the background, ask again"."""

    status: SyncStatus
    message: str = ""


@attrs.frozen
class Abort(RequestMessage["AbortResult"]):
    info_hash: str
    delete_files: bool = True


@attrs.frozen
class AbortResult:
    existed: bool


@attrs.frozen
class StartTorrent(RequestMessage["StartResult"]):
    """Hand seeding over: resume the destination's copy and apply ``tag`` (if not empty)."""

    info_hash: str
    tag: str = ""
    completed_ms_ago: int = COMPLETED_UNKNOWN  # see COMPLETED_UNKNOWN


@attrs.frozen
class StartResult:
    started: bool


@attrs.frozen
class OpenConnection(RequestMessage["OpenConnectionResult"]):
    """Reverse dialing (the destination dialed this source's ``--listen``): the source's pool
    wants ``count`` more connections; the destination dials them. Its pool closes the extras
    itself, and the destination does not redial a connection the source closed while another
    one is up."""

    count: int = 1


@attrs.frozen
class OpenConnectionResult:
    accepted: int  # connections the destination is dialing now (fewer at its cap)


# --- data -----------------------------------------------------------------------------------


@attrs.frozen
class Piece:
    """One whole piece. ``data`` is a view into a receive buffer on the destination; it is only
    valid until the handler that received it returns."""

    info_hash: str
    index: int
    offset: int  # absolute offset of the piece in the torrent content
    data: bytes | bytearray | memoryview = attrs.field(eq=False, repr=False)


@attrs.frozen
class PieceAck:
    info_hash: str
    index: int
    code: ErrorCode = ErrorCode.OK
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == ErrorCode.OK


ControlMessage = (
    Hello
    | Auth
    | AuthOk
    | CreditGrant
    | Ping
    | Pong
    | Error
    | InitTorrent
    | InitResult
    | Finalize
    | FinalizeResult
    | Abort
    | AbortResult
    | StartTorrent
    | StartResult
    | OpenConnection
    | OpenConnectionResult
    | PieceAck
)
Message = ControlMessage | Piece
# The static view of the table's requests and their answers (the type checker cannot read a
# table); tests/wire/test_wire_frames.py checks these unions against MESSAGE_TABLE.
Request = InitTorrent | Finalize | Abort | StartTorrent | OpenConnection
Response = (
    InitResult
    | FinalizeResult
    | AbortResult
    | StartResult
    | OpenConnectionResult
    | PieceAck
    | Error
)


# --- the message table ----------------------------------------------------------------------

KiB: Final = 1024
MiB: Final = 1024 * KiB

# The largest InitTorrent accepted: it carries the raw .torrent plus the file list. Sized for a
# v1 torrent of about 1.4 million pieces (28 MiB of SHA-1 piece hashes: 11 TiB at 8 MiB pieces)
# or a hybrid v1+v2 torrent of about 560,000 pieces (52 bytes of hashes per piece: 8.5 TiB at
# 16 MiB pieces), with 4 MiB left for file names. See README "Limits".
MAX_INIT_TORRENT: Final = 32 * MiB
# Handshake frames and Error are small and fixed in shape (an Error's message is cut to 1000
# characters); before authentication nothing larger is buffered.
HANDSHAKE_MAX_FRAME: Final = 4 * KiB


@attrs.frozen
class MessageSpec:
    """One row of :data:`MESSAGE_TABLE`."""

    code: int  # the frame type byte; stable, part of the protocol
    cls: type[Any]
    sender: Role | None  # who may send it; None = either side
    max_body: int  # largest frame body accepted (Piece: negotiated in the handshake, 0 here)
    handshake: bool = False  # only before authentication completes
    answer: type[Any] | None = None  # requests (and Piece): the one result type answering it

    @property
    def is_request(self) -> bool:
        return self.answer is not None and self.cls is not Piece


def _request(code: int, cls: type[RequestMessage[Any]], max_body: int) -> MessageSpec:
    """A request row; its answer is the result type named in the class's base."""
    (base,) = (b for b in cls.__orig_bases__ if typing.get_origin(b) is RequestMessage)  # type: ignore[attr-defined]
    (answer,) = typing.get_args(base)
    if isinstance(answer, typing.ForwardRef):  # written as a string: defined further down
        answer = globals()[answer.__forward_arg__]
    return MessageSpec(code, cls, Role.SOURCE, max_body, answer=answer)


def _result(code: int, cls: type[Any], max_body: int) -> MessageSpec:
    return MessageSpec(code, cls, Role.DESTINATION, max_body)


MESSAGE_TABLE: Final[tuple[MessageSpec, ...]] = (
    # handshake
    MessageSpec(1, Hello, None, HANDSHAKE_MAX_FRAME, handshake=True),
    MessageSpec(2, Auth, None, HANDSHAKE_MAX_FRAME, handshake=True),
    MessageSpec(3, AuthOk, Role.DESTINATION, HANDSHAKE_MAX_FRAME, handshake=True),
    # connection management (Error is accepted in every state)
    MessageSpec(4, Error, None, HANDSHAKE_MAX_FRAME),
    MessageSpec(5, CreditGrant, Role.DESTINATION, 64),
    MessageSpec(6, Ping, None, 64),
    MessageSpec(7, Pong, None, 64),
    # requests and their results
    _request(16, InitTorrent, MAX_INIT_TORRENT),
    _result(17, InitResult, 1 * MiB),  # a bitfield: 1 MiB covers 8 million pieces
    _request(18, Finalize, 1 * MiB),  # the source torrent's tags and category
    _result(19, FinalizeResult, 64 * KiB),
    _request(20, Abort, 4 * KiB),
    _result(21, AbortResult, 4 * KiB),
    _request(22, StartTorrent, 64 * KiB),
    _result(23, StartResult, 4 * KiB),
    _request(24, OpenConnection, 64),
    _result(25, OpenConnectionResult, 64),
    # data: a binary body (see frames.py), never through the converter
    MessageSpec(32, Piece, Role.SOURCE, 0, answer=PieceAck),
    _result(33, PieceAck, 64 * KiB),
)

SPEC_BY_CLASS: Final[dict[type[Any], MessageSpec]] = {s.cls: s for s in MESSAGE_TABLE}
SPEC_BY_CODE: Final[dict[int, MessageSpec]] = {s.code: s for s in MESSAGE_TABLE}
REQUEST_TYPES: Final[tuple[type[Any], ...]] = tuple(s.cls for s in MESSAGE_TABLE if s.is_request)
# Request type -> the result type that answers it (an Error may answer any request).
RESPONSE_TYPE: Final[dict[type[Any], type[Any]]] = {
    s.cls: s.answer for s in MESSAGE_TABLE if s.answer is not None
}
MAX_CONTROL_FRAME: Final = max(s.max_body for s in MESSAGE_TABLE)
