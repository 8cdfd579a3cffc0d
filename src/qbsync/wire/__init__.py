"""The qbsync wire protocol: typed frames over TCP (optionally TLS), usable without qBittorrent.

Layers (inner to outer): :mod:`.codec` (control messages <-> bytes, one cattrs converter),
:mod:`.frames` (sans-IO framing and the incremental decoder), :mod:`.protocol` (sans-IO
handshake, authentication, request ids and credit), then the Trio shell: :mod:`.transport`
(TCP/TLS bytes), :mod:`.keys` (the handshake's signatures, key derivation and frame
tags), :mod:`.shell` (what both ends share), :mod:`.server` (:func:`serve`, the
destination), :mod:`.client` (:func:`open_connection`, the source), :mod:`.budget`
(:class:`ByteBudget`), and :mod:`.tls` (contexts). :mod:`.hooks` is how the wire reports
metrics without knowing them, :mod:`.address` its address type.

The package imports nothing from the rest of qbsync (``tests/wire/test_wire_imports.py``), so it
can be read, tested and reused on its own. The protocol itself is specified in
``docs/wire-protocol.md``.
"""

from .address import HostPort
from .budget import ByteBudget
from .client import ClientConnection, open_connection
from .errors import (
    RETRYABLE,
    ConnectionClosed,
    ErrorCode,
    LocalProtocolError,
    WireError,
    leaf_exceptions,
)
from .hooks import NO_HOOKS, WireHooks
from .keys import ADMIT_ANY, Admission, PeerKey, fingerprint, new_identity
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
    OpenConnection,
    OpenConnectionResult,
    Piece,
    PieceAck,
    StartResult,
    StartTorrent,
    SyncStatus,
    valid_info_hash,
)
from .protocol import DEFAULT_MAX_PIECE, DEFAULT_WINDOW, MAX_CONTROL_FRAME, Request, Response
from .server import OpenPeer, OpenPeers, Peer, ServerHandler, serve, serve_dialed
from .tls import client_ssl_context, server_ssl_context

__all__ = [
    "ADMIT_ANY",
    "DEFAULT_MAX_PIECE",
    "DEFAULT_WINDOW",
    "MAX_CONTROL_FRAME",
    "MIN_PROTOCOL_VERSION",
    "NO_HOOKS",
    "PROTOCOL_VERSION",
    "RETRYABLE",
    "Abort",
    "AbortResult",
    "Admission",
    "ByteBudget",
    "ClientConnection",
    "ConnectionClosed",
    "ErrorCode",
    "FileEntry",
    "Finalize",
    "FinalizeResult",
    "HostPort",
    "InitResult",
    "InitTorrent",
    "LocalProtocolError",
    "OpenConnection",
    "OpenConnectionResult",
    "OpenPeer",
    "OpenPeers",
    "Peer",
    "PeerKey",
    "Piece",
    "PieceAck",
    "Request",
    "Response",
    "ServerHandler",
    "StartResult",
    "StartTorrent",
    "SyncStatus",
    "WireError",
    "WireHooks",
    "client_ssl_context",
    "fingerprint",
    "leaf_exceptions",
    "new_identity",
    "open_connection",
    "serve",
    "serve_dialed",
    "server_ssl_context",
    "valid_info_hash",
]
