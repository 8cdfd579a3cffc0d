"""The typed messages of the qbsync protocol.

Control messages are attrs classes; the frame codec (``frames.py``) turns them into bytes with
one cattrs converter, so adding a field here is the whole change. Piece payloads are *not*
control messages: :class:`Piece` has a fixed binary header and raw bytes (see ``frames.py``),
so multi-MiB data is never re-encoded.

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

import attrs

from .errors import ErrorCode

PROTOCOL_VERSION = 1  # bump when a change is not backward compatible
MIN_PROTOCOL_VERSION = 1

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


# --- handshake (only these are accepted before authentication succeeds) ---------------------


@attrs.frozen
class Hello:
    """First message from each side. Carries the nonce the *other* side must sign."""

    role: Role
    min_version: int
    max_version: int
    nonce: bytes  # 32 random bytes
    software: str = "qbsync"
    auth_required: bool = True  # False when this side has no token configured


@attrs.frozen
class Auth:
    """HMAC-SHA256(token, b"qbsync-auth" + role + own_nonce + peer_nonce + version)."""

    mac: bytes


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
class InitTorrent:
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


@attrs.frozen
class Finalize:
    """All pieces sent: verify, add to the destination qBittorrent, tag."""

    info_hash: str
    category: str = ""
    tags: tuple[str, ...] = ()  # the source torrent's tags, copied to the destination
    save_sub_path: str = ""


@attrs.frozen
class FinalizeResult:
    """``status`` VERIFYING means "still running in the background, ask again"."""

    status: SyncStatus
    message: str = ""


@attrs.frozen
class Abort:
    info_hash: str
    delete_files: bool = True


@attrs.frozen
class AbortResult:
    existed: bool


@attrs.frozen
class StartTorrent:
    """Hand seeding over: resume the destination's copy and apply ``tag`` (if not empty)."""

    info_hash: str
    tag: str = ""


@attrs.frozen
class StartResult:
    started: bool


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
    | PieceAck
)
Message = ControlMessage | Piece

# Request type -> the result type that answers it (an Error may answer any request).
RESPONSE_TYPE: dict[type, type] = {
    InitTorrent: InitResult,
    Finalize: FinalizeResult,
    Abort: AbortResult,
    StartTorrent: StartResult,
    Piece: PieceAck,
}
