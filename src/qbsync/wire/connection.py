"""The Trio shell around the sans-IO :class:`~qbsync.wire.protocol.Endpoint`, in one import.

The shell lives in modules named for what they do:

* :mod:`.transport` -- bytes over plain TCP (zero-copy ``readv``/``writev`` paths) or TLS;
* :mod:`.shell` -- what both ends share: handshake flights, the send lock, the receive loop,
  keepalive pings and the idle timeout, closing with a stable code;
* :mod:`.server` -- the destination: :func:`serve`, :class:`ServerHandler`, :class:`Peer`;
* :mod:`.client` -- the source: :func:`open_connection`, :class:`ClientConnection`;
* :mod:`.budget` -- :class:`ByteBudget`, the destination's global piece-memory budget.

This module re-exports their public names so ``qbsync.wire.connection`` keeps working;
new code should import from :mod:`qbsync.wire`.
"""

from __future__ import annotations

from .budget import ByteBudget
from .client import ClientConnection, open_connection
from .server import Peer, ServerHandler, serve
from .transport import tune_socket

__all__ = [
    "ByteBudget",
    "ClientConnection",
    "Peer",
    "ServerHandler",
    "open_connection",
    "serve",
    "tune_socket",
]
