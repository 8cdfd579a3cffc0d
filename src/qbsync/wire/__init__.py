"""The qbsync wire protocol: typed frames over TCP (optionally TLS), usable without qBittorrent.

Layers (inner to outer): :mod:`.codec` (control messages <-> bytes, one cattrs converter),
:mod:`.frames` (sans-IO framing and the incremental decoder), :mod:`.protocol` (sans-IO
handshake, authentication, request ids and credit), :mod:`.connection` (the Trio shell:
:func:`serve` for the destination, :func:`open_connection` for the source), :mod:`.tls`.
"""

from .connection import (
    ByteBudget,
    ClientConnection,
    Peer,
    ServerHandler,
    open_connection,
    serve,
)
from .errors import RETRYABLE, ConnectionClosed, ErrorCode, LocalProtocolError, WireError
from .messages import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Abort,
    AbortResult,
    FileEntry,
    Finalize,
    FinalizeResult,
    InitResult,
    InitTorrent,
    Piece,
    PieceAck,
    StartResult,
    StartTorrent,
    SyncStatus,
    valid_info_hash,
)
from .protocol import DEFAULT_MAX_PIECE, DEFAULT_WINDOW, MAX_CONTROL_FRAME, Request, Response
from .tls import client_ssl_context, server_ssl_context

__all__ = [
    "DEFAULT_MAX_PIECE",
    "DEFAULT_WINDOW",
    "MAX_CONTROL_FRAME",
    "MIN_PROTOCOL_VERSION",
    "PROTOCOL_VERSION",
    "RETRYABLE",
    "Abort",
    "AbortResult",
    "ByteBudget",
    "ClientConnection",
    "ConnectionClosed",
    "ErrorCode",
    "FileEntry",
    "Finalize",
    "FinalizeResult",
    "InitResult",
    "InitTorrent",
    "LocalProtocolError",
    "Peer",
    "Piece",
    "PieceAck",
    "Request",
    "Response",
    "ServerHandler",
    "StartResult",
    "StartTorrent",
    "SyncStatus",
    "WireError",
    "client_ssl_context",
    "open_connection",
    "serve",
    "server_ssl_context",
    "valid_info_hash",
]
