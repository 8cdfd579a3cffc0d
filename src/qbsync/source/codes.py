"""Stable codes the source logs for outcomes that never cross the wire.

Failures the destination reports travel as :class:`~qbsync.wire.errors.ErrorCode`; the source
reuses those for its own failures of the same kind (``qb-error``, ``bad-request``, ``io``).
What has no wire counterpart is here, so every ``code=...`` a source log line or its status
page shows is a member of one of the two enums (users grep for them: never rename one).
"""

from __future__ import annotations

import enum

from ..wire.errors import ErrorCode


class SourceCode(enum.StrEnum):
    CONNECT_FAILED = "connect-failed"  # TCP connect to the destination failed
    CONNECTION_LOST = "connection-lost"  # an open connection broke (reset, EOF)
    VERIFYING = "verifying"  # the destination is still checking the torrent: ask again later


Code = ErrorCode | SourceCode


class SkipReason(enum.StrEnum):
    """Why discovery does not start syncing a torrent (logged as ``reason=...``)."""

    TRACKED = "tracked"  # already being synced
    SYNCED = "synced"  # in the completion cache
    EXCLUDED = "excluded"  # carries --exclude-sync-tag
    SYNC_FAILED = "sync-failed"  # carries --sync-failed-tag
    STATE = "state"  # not in a syncable qBittorrent state
    NO_PROGRESS = "no-progress"  # nothing downloaded yet
