"""Several sources, one destination: who is connected, and which source syncs which torrent.

Every authenticated connection names its source (``Hello.instance``, the source's
``--source-name``; the Auth MACs cover it). The destination keeps, per source name, the open
connections, the pieces being written and the torrents being synced, for ``/status`` and the
metrics; the ``source`` metric label takes at most :data:`MAX_LABELS` distinct names, any
further one is counted under ``other`` (a source names itself, so its label must not grow the
registry without bound).

*Ownership* makes "the same info-hash offered by two sources is synced once" hold: the first
source whose full ``InitTorrent`` creates (or continues) a torrent's in-progress state owns it
until that state is gone (finalized or aborted). Any request about that torrent from another
source -- a probe, an ``InitTorrent``, a piece, a ``Finalize``, an ``Abort`` -- is answered
``owned-by-other-source`` (retryable): the other source waits and probes again, and once the
owner's copy is finalized its probe answers ``complete``, so the torrent is stored once and
nobody is ever handed a second copy or another source's half-written one. An owner that has had
no connection for :data:`OWNER_GRACE` seconds (gone for good, or renamed) loses the claim, and
the next source continues the partial copy (every piece is SHA-1 checked, whoever sends it).
Claims live in memory: after a restart the first source to initialize a torrent owns it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container
from typing import Any

import attrs
import trio

from .. import metrics
from ..log import kv
from ..wire.errors import ErrorCode, WireError

log = logging.getLogger("qbsync.destination.sources")

MAX_LABELS = 16  # distinct values of the ``source`` metric label; the rest count as "other"
OTHER_LABEL = "other"
UNNAMED = "unnamed"  # a source that announced no name (older qbsync)
OWNER_GRACE = 120.0  # seconds an owner without connections keeps its claims


@attrs.define
class SourceStats:
    name: str
    label: str
    connections: int = 0
    pieces_inflight: int = 0
    connected_since: float = 0.0  # unix time the first of its current connections opened
    last_seen: float = 0.0  # unix time of its last connection change
    gone_at: float | None = None  # trio time its last connection closed (None: connected)


def source_name(instance: str) -> str:
    """The name a peer announced, made safe for logs and labels (the source checks it too)."""
    name = "".join(c for c in instance if c.isascii() and (c.isalnum() or c in "._-"))[:64]
    return name or UNNAMED


class Sources:
    def __init__(self) -> None:
        self._by_name: dict[str, SourceStats] = {}
        self._owners: dict[str, str] = {}  # info-hash -> source name
        # Full InitTorrents in flight per info-hash: their claim holds before the state exists.
        self._initializing: dict[str, int] = {}
        self._labels: set[str] = set()
        self._keys: dict[str, str] = {}  # source name -> the identity key that first used it

    def identify(self, peer: Any) -> str:
        """The name this source is known by: the name it announced, bound to the first
        identity key that announced it. Another key announcing the same name gets the name
        with its key's fingerprint appended, so a paired source cannot pass for another one
        (and take over the torrents it syncs) by announcing its name."""
        name = source_name(getattr(peer, "instance", ""))
        key = str(getattr(peer, "fingerprint", "") or "")
        if not key:
            return name
        bound = self._keys.setdefault(name, key)
        if bound == key:
            return name
        alias = f"{name}~{key.removeprefix('SHA256:')[:8]}"
        if alias not in self._by_name:
            log.warning(
                "event=source_name_taken name=%s by=%s key=%s known_as=%s",
                kv(name),
                bound,
                key,
                kv(alias),
            )
        return alias

    def _stats(self, name: str) -> SourceStats:
        stats = self._by_name.get(name)
        if stats is None:
            if name in self._labels or len(self._labels) < MAX_LABELS:
                self._labels.add(name)
                label = name
            else:
                label = OTHER_LABEL
            stats = self._by_name[name] = SourceStats(name, label)
        return stats

    # -- connections (the wire server's on_peer hook) -----------------------------------------

    def on_peer(self, peer: Any, opened: bool) -> None:
        stats = self._stats(self.identify(peer))
        now = time.time()
        if opened:
            if stats.connections == 0:
                stats.connected_since = now
                log.info("event=source_connected source=%s", kv(stats.name))
            stats.connections += 1
            stats.gone_at = None
        else:
            stats.connections = max(0, stats.connections - 1)
            if stats.connections == 0:
                stats.gone_at = trio.current_time()
                log.info("event=source_disconnected source=%s", kv(stats.name))
        stats.last_seen = now
        self._set_connections(stats.label)

    def _set_connections(self, label: str) -> None:
        metrics.source_connections.labels(label).set(
            sum(s.connections for s in self._by_name.values() if s.label == label)
        )

    def _present(self, name: str) -> bool:
        stats = self._by_name.get(name)
        if stats is None:
            return False
        if stats.connections > 0 or stats.gone_at is None:
            return True
        return trio.current_time() - stats.gone_at < OWNER_GRACE

    # -- ownership ------------------------------------------------------------------------------

    def check(self, info_hash: str, name: str, in_progress: bool) -> None:
        """Raise ``owned-by-other-source`` when another, present source owns ``info_hash``'s
        in-progress state."""
        owner = self._owners.get(info_hash)
        if owner is None or owner == name:
            return
        if not in_progress and info_hash not in self._initializing:
            del self._owners[info_hash]  # finalized or aborted meanwhile: a stale claim
            return
        if self._present(owner):
            metrics.owned_by_other_source.labels(self._stats(name).label).inc()
            raise WireError(
                ErrorCode.OWNED_BY_OTHER_SOURCE,
                f"source {owner!r} is syncing this torrent here: retry later",
            )
        log.info(
            "event=torrent_owner_changed hash=%s from=%s to=%s reason=owner_gone_for_%gs",
            info_hash,
            kv(owner),
            kv(name),
            OWNER_GRACE,
        )
        del self._owners[info_hash]

    def claim(self, info_hash: str, name: str) -> None:
        """``name`` is about to initialize ``info_hash``: check, then own it (no await between,
        so two sources cannot both pass)."""
        self.check(info_hash, name, in_progress=True)
        self._owners[info_hash] = name
        self._initializing[info_hash] = self._initializing.get(info_hash, 0) + 1

    def init_done(self, info_hash: str) -> None:
        """The InitTorrent that :meth:`claim` preceded has returned (or failed)."""
        n = self._initializing.get(info_hash, 0) - 1
        if n > 0:
            self._initializing[info_hash] = n
        else:
            self._initializing.pop(info_hash, None)

    def owner(self, info_hash: str) -> str | None:
        return self._owners.get(info_hash)

    def refresh(self, in_progress: Container[str]) -> None:
        """Drop claims whose state is gone; update the per-source torrent gauge."""
        self._owners = {
            h: n for h, n in self._owners.items() if h in in_progress or h in self._initializing
        }
        counts: dict[str, int] = dict.fromkeys(self._labels | {OTHER_LABEL}, 0)
        for name in self._owners.values():
            label = self._stats(name).label
            counts[label] = counts.get(label, 0) + 1
        for label, n in counts.items():
            if n or label in self._labels:
                metrics.source_torrents.labels(label).set(n)

    # -- pieces ---------------------------------------------------------------------------------

    def piece_started(self, name: str) -> None:
        stats = self._stats(name)
        stats.pieces_inflight += 1
        metrics.source_pieces_inflight.labels(stats.label).inc()

    def piece_done(self, name: str) -> None:
        stats = self._stats(name)
        stats.pieces_inflight = max(0, stats.pieces_inflight - 1)
        metrics.source_pieces_inflight.labels(stats.label).dec()

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        owned: dict[str, int] = {}
        for name in self._owners.values():
            owned[name] = owned.get(name, 0) + 1
        return [
            {
                "name": s.name,
                "connections": s.connections,
                "pieces_inflight": s.pieces_inflight,
                "torrents": owned.get(s.name, 0),
                "connected": s.connections > 0,
                "last_seen": s.last_seen,
            }
            for s in sorted(self._by_name.values(), key=lambda s: s.name)
        ]
