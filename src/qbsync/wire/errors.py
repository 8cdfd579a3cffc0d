"""Typed protocol errors with stable codes.

The code strings are part of the protocol and of the logs (``code=hash-mismatch``): users grep
for them and the source maps them to retry decisions, so never rename one.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    # Piece acks and request results.
    OK = "ok"
    IO = "io"  # destination could not write (disk full, permissions): retry later
    HASH_MISMATCH = "hash-mismatch"  # SHA-1 differs from the torrent's: re-read and resend
    NOT_INITIALIZED = "not-initialized"  # destination has no state: send InitTorrent again
    FINALIZING = "finalizing"  # torrent is being finalized: retry later
    BAD_REQUEST = "bad-request"  # request failed validation (index, offset, geometry, ...)
    UNSAFE_PATH = "unsafe-path"  # a file path would escape --data
    CONFLICT = "conflict"  # a wanted name holds a file qbsync did not create and cannot adopt
    NOT_FOUND = "not-found"  # finalize/abort/start for a torrent the destination does not have
    INCOMPLETE = "incomplete"  # finalize with pieces still missing: resync
    BUSY = "busy"  # a concurrent operation on the same torrent: retry later
    QB_ERROR = "qb-error"  # the destination's qBittorrent failed or is unreachable
    VERIFY_FAILED = "verify-failed"  # qBittorrent's recheck did not reach 100 %
    INTERNAL = "internal"  # a bug: logged with a traceback on the side that raised it
    # Another source (Hello.instance) is syncing this info-hash right now: wait, never a
    # second copy. The source retries later and finds it complete once that sync finished.
    OWNED_BY_OTHER_SOURCE = "owned-by-other-source"
    # Connection-level failures (sent in an Error frame, then the connection closes).
    PROTOCOL = "protocol"  # malformed frame or message, or a message out of order
    UNSUPPORTED_VERSION = "unsupported-version"
    UNKNOWN_TYPE = "unknown-type"
    FRAME_TOO_LARGE = "frame-too-large"
    AUTH_FAILED = "auth-failed"
    CREDIT_EXCEEDED = "credit-exceeded"  # peer sent more piece bytes than it was granted
    TIMEOUT = "timeout"  # handshake or keepalive deadline passed
    SHUTTING_DOWN = "shutting-down"
    # The peer speaks the old, unauthenticated handshake (protocol 1): upgrade it.
    UPGRADE_REQUIRED = "upgrade-required"
    # The peer proved its key, but the key is not admitted: not pinned (another key is), not
    # in --peer-fingerprint, or no token proved it where first use is not trusted.
    UNKNOWN_PEER = "unknown-peer"
    # A frame after the handshake whose tag does not verify (injected or altered on the path).
    BAD_TAG = "bad-tag"


# Codes after which the same request may succeed if simply retried later.
RETRYABLE: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.IO,
        ErrorCode.FINALIZING,
        ErrorCode.BUSY,
        ErrorCode.QB_ERROR,
        ErrorCode.TIMEOUT,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.OWNED_BY_OTHER_SOURCE,
    }
)


class WireError(Exception):
    """A protocol-level failure with a stable code.

    Raised by the sans-IO core on malformed input and by the connection when the peer reports
    an error. ``str(err)`` is a one-line message suitable for ``key=value`` logs.
    """

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(f"{code.value}: {message}" if message else code.value)
        self.code = code
        self.message = message


class ConnectionClosed(WireError):
    """The peer went away (EOF, reset, or our own close). Not a protocol violation.

    ``code`` says why when it is known: the code of the peer's connection-level ``Error`` frame
    (for example ``shutting-down``, which is worth a quick reconnect) or of the violation that
    made us close; plain EOF keeps the historical default ``protocol``.
    """

    def __init__(
        self, message: str = "connection closed", code: ErrorCode = ErrorCode.PROTOCOL
    ) -> None:
        super().__init__(code, message)


class LocalProtocolError(WireError):
    """*We* tried to do something the protocol forbids (a bug or API misuse on this side).

    Distinct from a plain :class:`WireError`, which the sans-IO core raises when the *peer*
    broke the protocol (h11 makes the same Local/Remote split): a local error must never be
    blamed on, or reported to, the peer.
    """


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, groups flattened depth-first, in order (``[exc]`` for a
    plain exception). Trio nurseries wrap even one failure in a group; every place that needs
    the underlying error unwraps it with this one function."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    out: list[BaseException] = []
    for inner in exc.exceptions:
        out.extend(leaf_exceptions(inner))
    return out
