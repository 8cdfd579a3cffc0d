"""What the wire reports about itself, without knowing who listens.

The wire package depends on nothing else in qbsync (a test parses every ``wire/*.py`` to keep
it so). Instead of writing metrics, it calls a :class:`WireHooks` object handed to
:func:`~qbsync.wire.serve`, :func:`~qbsync.wire.open_connection` and
:class:`~qbsync.wire.ByteBudget`. The default does nothing; the daemons pass
``qbsync.metrics.WIRE_METRICS``, which turns each call into a Prometheus update. That object
is the only writer of the wire's metrics (``wire_connections`` included).
"""

from __future__ import annotations

from typing import Literal

from .errors import ErrorCode

Side = Literal["source", "destination"]


class WireHooks:
    """Instrumentation callbacks. Every method is a no-op here; override what you record.

    Methods are called on the Trio thread, synchronously, and must not block or raise.
    """

    def connection_opened(self, side: Side) -> None:
        """A connection finished its handshake (``side`` is this end's role)."""

    def connection_closed(self, side: Side) -> None:
        """A connection that :meth:`connection_opened` reported has closed."""

    def handshake_failed(self, code: ErrorCode) -> None:
        """A handshake failed or a connection was refused before authenticating."""

    def protocol_error(self, code: ErrorCode) -> None:
        """A connection was closed because the peer violated the protocol."""

    def buffer_limit(self, limit: int) -> None:
        """The piece budget's limit in bytes (reported once, when it is created)."""

    def buffer_used(self, used: int) -> None:
        """Piece bytes currently charged to the budget."""


NO_HOOKS = WireHooks()
