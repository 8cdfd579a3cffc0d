"""The piece monitor: learns within about a quarter second which pieces qBittorrent finished.

Every ``interval`` (0.25 s) it asks qBittorrent for the *changes* since the last call
(``sync/maindata?rid=``, one request whatever the number of torrents) and merges them into a
local picture of every torrent. Then, for tracked torrents only, and only those whose
``progress``, ``completed`` or ``state`` changed (plus a few follow-up polls, see
:data:`~qbsync.source.state.FOLLOW_UPS`), it fetches ``torrents/pieceStates`` and queues the
pieces that became ready. An idle source therefore costs four small requests per second,
independent of how many torrents qBittorrent holds (the Go reference polled every monitored
torrent every 500 ms and re-queued every unacknowledged piece each time; see
docs/design-decisions.md#each-piece-queued-once).

The merged picture doubles as the orchestrator's torrent list, so the orchestrator's cycles
cost no ``torrents/info`` call either. Removals come from the raw delta's ``torrents_removed``
(a full update is diffed against the previous picture), with a 404 on ``pieceStates`` as the
backstop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .. import metrics
from ..http.server import Health
from ..log import kv
from ..qbittorrent.api import QB, QBError
from .state import Registry, Tracked

log = logging.getLogger("qbsync.source.monitor")

# Fields whose change means new pieces may be ready.
PIECE_FIELDS = frozenset({"progress", "completed", "state"})


@attrs.frozen
class MaindataUpdate:
    full: bool
    changed: dict[str, frozenset[str]]  # hash -> names of the fields that changed
    added: frozenset[str]
    removed: frozenset[str]


def merge_maindata(torrents: dict[str, dict[str, Any]], md: dict[str, Any]) -> MaindataUpdate:
    """Merge one ``sync/maindata`` reply into ``torrents`` (in place); report what changed.

    A ``full_update`` replaces the picture (hashes missing from it count as removed). A
    partial one merges field by field: absent fields keep their values.
    """
    delta: dict[str, dict[str, Any]] = md.get("torrents") or {}
    removed: set[str] = set(md.get("torrents_removed") or ())
    full = bool(md.get("full_update"))
    added: set[str] = set()
    changed: dict[str, frozenset[str]] = {}
    if full:
        removed |= set(torrents) - set(delta)
    for h in removed:
        torrents.pop(h, None)
    for h, fields in delta.items():
        old = torrents.get(h)
        if old is None:
            added.add(h)
            changed[h] = frozenset(fields)
            torrents[h] = dict(fields)
        elif full:  # a whole picture: only real differences count
            changed[h] = frozenset(k for k, v in fields.items() if old.get(k) != v)
            torrents[h] = dict(fields)
        else:  # a delta lists only what changed
            changed[h] = frozenset(fields)
            old.update(fields)
    for h, t in torrents.items():
        t.setdefault("hash", h)
    return MaindataUpdate(full, changed, frozenset(added), frozenset(removed))


class Monitor:
    def __init__(
        self,
        qb: QB,
        registry: Registry,
        *,
        interval: float = 0.25,
        health: Health | None = None,
        on_update: Callable[[MaindataUpdate], None] | None = None,
        on_removed: Callable[[str], None] | None = None,
        max_parallel: int = 4,
    ) -> None:
        self.qb = qb
        self.registry = registry
        self.interval = interval
        self.health = health
        self.on_update = on_update or (lambda u: None)
        self.on_removed = on_removed or (lambda h: None)
        self.torrents: dict[str, dict[str, Any]] = {}
        self.server_state: dict[str, Any] = {}
        self.ready = trio.Event()  # set once the first maindata arrived
        self.healthy = False  # last maindata call succeeded
        self.polls = 0  # piece-state requests made (for /status and tests)
        self._rid = 0
        self._limiter = trio.CapacityLimiter(max_parallel)
        self._failing_since: float | None = None
        self._last_error_log = 0.0
        self._wake = trio.Event()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """``sync/maindata`` every ``interval``; between those, a torrent's piece-state poll
        runs when it is due (a just-initialized torrent's first poll, a follow-up) instead of
        waiting for the next tick, so a torrent starts streaming as soon as it is tracked."""
        task_status.started()
        next_maindata = trio.current_time()
        while True:
            self._wake = trio.Event()  # before the work: a request during it is not lost
            now = trio.current_time()
            if now >= next_maindata:
                ok = await self._poll_once_logged()
                if self.health is not None:
                    self.health.heartbeat("monitor")
                # After failures, back off to a few seconds (the qB client retries too).
                next_maindata = now + (self.interval if ok else max(self.interval, 2.0))
            else:
                await self._poll_due(now)
            wake_at = next_maindata
            for t in self.registry.all():
                if t.poll_times:
                    wake_at = min(wake_at, t.poll_times[0])
            with trio.move_on_at(wake_at):
                await self._wake.wait()

    async def _poll_once_logged(self) -> bool:
        try:
            with trio.fail_after(60):
                await self.poll_once()
        except (QBError, trio.TooSlowError) as exc:
            now = trio.current_time()
            self.healthy = False
            if self._failing_since is None:
                self._failing_since = now
                log.warning("event=monitor_poll_failed code=qb-error error=%s", _one_line(exc))
                self._last_error_log = now
            elif now - self._last_error_log > 60:
                log.warning(
                    "event=monitor_poll_failing code=qb-error for_s=%.0f error=%s",
                    now - self._failing_since,
                    _one_line(exc),
                )
                self._last_error_log = now
            return False
        if self._failing_since is not None:
            log.info(
                "event=monitor_poll_recovered after_s=%.1f",
                trio.current_time() - self._failing_since,
            )
            self._failing_since = None
        self.healthy = True
        return True

    async def poll_once(self) -> None:
        md = await self.qb.maindata(self._rid)
        self._rid = int(md.get("rid") or 0)
        update = merge_maindata(self.torrents, md)
        if md.get("server_state"):
            self.server_state.update(md["server_state"])
        if update.full:
            log.debug("event=maindata_full torrents=%d rid=%d", len(self.torrents), self._rid)
        self.ready.set()
        self.on_update(update)
        now = trio.current_time()
        for t in self.registry.all():
            fields = update.changed.get(t.info_hash)
            if fields and fields & PIECE_FIELDS:
                t.schedule_polls(now)
        await self._poll_due(now)

    async def _poll_due(self, now: float) -> None:
        due = [t for t in self.registry.all() if t.poll_due(now)]
        if due:
            async with trio.open_nursery() as nursery:
                for t in due:
                    t.consume_polls(now)
                    nursery.start_soon(self.poll_pieces, t)

    async def poll_pieces(self, t: Tracked) -> None:
        """Fetch one torrent's piece states and queue what became ready."""
        async with self._limiter:
            if not t.active:
                return
            self.polls += 1
            try:
                states = await self.qb.piece_states(t.info_hash)
            except QBError as exc:
                if exc.not_found:
                    log.info("event=torrent_gone hash=%s via=pieceStates", t.info_hash)
                    self.on_removed(t.info_hash)
                else:
                    log.warning(
                        "event=piece_states_failed hash=%s code=qb-error error=%s",
                        t.info_hash,
                        _one_line(exc),
                    )
                    t.schedule_polls(trio.current_time(), (2.0,))
                return
        if not _active(t):  # untracked while we awaited
            return
        if len(states) != t.tracker.num_pieces:
            log.warning(
                "event=piece_states_mismatch hash=%s got=%d expected=%d",
                t.info_hash,
                len(states),
                t.tracker.num_pieces,
            )
            return
        new = t.tracker.mark_ready(states, trio.current_time())
        self.registry.enqueue(t, new)
        if new:
            log.debug("event=pieces_ready hash=%s count=%d", t.info_hash, len(new))
        t.first_poll_finished()
        metrics.piece_queue_depth.set(len(self.registry.queue))
        if t.tracker.complete:
            self.registry.notify_changed()

    def request_poll(self, t: Tracked) -> None:
        """Poll ``t``'s piece states now (not at the next tick)."""
        t.schedule_polls(trio.current_time(), (0.0,))
        self._wake.set()


def _active(t: Tracked) -> bool:
    return t.active


def _one_line(exc: BaseException) -> str:
    return kv(str(exc).replace("\n", " ")[:300])
