"""The orchestrator: decides which torrents sync, finalizes them, tags them, cleans up after them.

It runs a *cycle* every ``--sleep`` seconds, and sooner when something happened that needs a
decision: the monitor saw a torrent appear, disappear, change its tags, state or selected
size, or a sender acknowledged a torrent's last piece (finalize follows within a fraction of
a second instead of up to a whole ``--sleep``). A cycle never runs concurrently with another.

A cycle (each step logs and survives its own errors):

1. **Removals** reported by the monitor: a torrent removed mid-sync is untracked and aborted
   on the destination (its partial data deleted), unless every piece had already been sent,
   in which case it is finalized anyway from the last known tags/category and handed over
   with ``StartTorrent`` (docs/design-decisions.md#finalize-streamed-removals). A removed torrent
   that was already synced is started
   on the destination with ``--source-removed-tag``.
2. **Exclusions**: a tracked torrent that got ``--exclude-sync-tag`` is untracked and aborted
   on the destination; one that got ``--sync-failed-tag`` is untracked. Synced torrents keep
   their completion-cache entry (removing it would let a later removal delete finalized data).
3. **Selection changes**, detected from a change of the torrent's selected ``size`` in the
   monitor's feed (no per-torrent polling): the selection fingerprint is compared and, if it
   changed, the destination re-initializes the torrent (``InitTorrent(resync=True)``).
4. **Discovery**: torrents in a syncable state with progress > 0, none of the exclusion tags,
   not synced and not tracked, are probed on the destination (``InitTorrent(probe=True)``);
   ``complete`` ones are recorded and tagged, ``ready`` ones are tracked, those the
   destination has most of first.
5. **Finalize** fully streamed torrents. ``verifying`` means "poll again shortly" and is not
   a failure; ``incomplete`` re-initializes (the destination lost or rejected pieces); other
   errors count, and the third consecutive one tags the torrent ``--sync-failed-tag``.
   Destination outages (no connection, timeouts, retryable codes) never count.
6. **Tagged hand-offs** (``--handoff-tag``, every cycle): synced torrents carrying the tag are
   handed off now (see :meth:`.cleanup.Cleanup.run_tagged`); such a torrent was also probed
   first in discovery and its pieces jump the send queue, and the tag is left out of the tags
   ``Finalize`` sends, so the destination's copy never carries it.
7. **Disk-pressure cleanup** (every ``--sleep``): see :mod:`.cleanup`.
8. **Maintenance** every 50 cycles' worth of time: hand over synced torrents removed from the
   source while we were not watching, and re-check tracked torrents' selection.

Dry run (``--dry-run``) changes nothing on either side: no InitTorrent that creates state, no
piece, no finalize, no tag, no abort, no start, no cache write. Discovery still probes (a
read-only request) and logs ``event=dry_run action=...`` for what it would do.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import attrs
import trio

from .. import metrics
from ..config import SourceConfig
from ..http.activity import ActivityLog, Event, completed_ms_ago
from ..http.server import Health
from ..integrations import notify
from ..integrations.arr import RECHECK_AFTER as ARR_RECHECK
from ..integrations.arr import ArrSet
from ..log import kv
from ..qbittorrent.api import QB, QBError, completion_time, split_tags
from ..wire.errors import RETRYABLE, ConnectionClosed, ErrorCode, WireError
from ..wire.messages import Abort, Finalize, FinalizeResult, InitResult, InitTorrent, SyncStatus
from .cache import CompletionCache, fingerprint
from .cleanup import Cleanup
from .codes import Code, SkipReason, SourceCode
from .discovery import Discovery
from .meta import MetaError, SourceMeta, build_meta
from .monitor import MaindataUpdate, Monitor
from .paths import PathMapper
from .pool import ConnectionPool, DestinationUnavailable
from .reader import PieceReader
from .sender import NotReady, initialize
from .state import Registry, Tracked
from .synced import add_tag
from .tracker import PieceTracker

log = logging.getLogger("qbsync.source.orchestrator")

# pausedUP (4.x) is normalized to stoppedUP by the qB client.
SYNCABLE_STATES = frozenset(
    {
        "downloading",
        "stalledDL",
        "queuedDL",
        "forcedDL",
        "uploading",
        "stalledUP",
        "queuedUP",
        "forcedUP",
        "stoppedUP",
    }
)
MAX_FINALIZE_FAILURES = 3
FINALIZE_REPOLL = 0.25  # seconds between Finalize requests answered "verifying"
MAINTENANCE_EVERY = 50  # cycles' worth of --sleep
MIN_CYCLE_GAP = 0.2  # seconds between event-driven cycles
PROBE_TIMEOUT = 30.0
FINALIZE_TIMEOUT = 30.0
CONTROL_TIMEOUT = 30.0


def has_tag(info: dict[str, Any], tag: str) -> bool:
    return bool(tag) and tag in split_tags(str(info.get("tags") or ""))


def skip_reason(
    info: dict[str, Any],
    *,
    exclude_tag: str,
    failed_tag: str,
    completed: bool,
    tracked: bool,
) -> SkipReason | None:
    """Why discovery does not start syncing this torrent (None = it should)."""
    if tracked:
        return SkipReason.TRACKED
    if completed:
        return SkipReason.SYNCED
    if has_tag(info, exclude_tag):
        return SkipReason.EXCLUDED
    if has_tag(info, failed_tag):
        return SkipReason.SYNC_FAILED
    if str(info.get("state") or "") not in SYNCABLE_STATES:
        return SkipReason.STATE
    try:
        progress = float(info.get("progress") or 0)
    except (TypeError, ValueError):
        progress = 0.0
    if progress <= 0:
        return SkipReason.NO_PROGRESS
    return None


class HardlinkWait(Exception):
    """Not tracked yet: shares a file with ``blocker``, which is being synced."""

    def __init__(self, blocker: str) -> None:
        super().__init__(blocker)
        self.blocker = blocker


def _link_ids(meta: SourceMeta) -> frozenset[tuple[int, int]]:
    """(device, inode) of the torrent's selected, non-empty files that have other links."""
    return frozenset(
        (e.device, e.inode)
        for e in meta.file_entries()
        if e.selected and e.size > 0 and (e.device or e.inode) and _nlink(meta, e.path) > 1
    )


def _nlink(meta: SourceMeta, name: str) -> int:
    try:
        return os.stat(meta.local_dir / name).st_nlink
    except OSError:
        return 1


def is_transient(exc: BaseException) -> bool:
    """A destination error that says nothing about the torrent (outage, restart, overload)."""
    if isinstance(exc, (ConnectionClosed, DestinationUnavailable)):
        return True
    return isinstance(exc, WireError) and exc.code in RETRYABLE


@attrs.define
class _Stats:
    cycles: int = 0
    synced: int = 0
    failed: int = 0
    aborted: int = 0


class Orchestrator:
    notifier: notify.Notifier = notify.DISABLED  # --notify-url; the runner sets it
    activity: ActivityLog | None = None  # the status page's history; the runner sets it

    def __init__(
        self,
        config: SourceConfig,
        *,
        qb: QB,
        pool: ConnectionPool,
        registry: Registry,
        monitor: Monitor,
        reader: PieceReader,
        cache: CompletionCache,
        mapper: PathMapper,
        health: Health | None = None,
    ) -> None:
        self.config = config
        self.qb = qb
        self.pool = pool
        self.registry = registry
        self.monitor = monitor
        self.reader = reader
        self.cache = cache
        self.mapper = mapper
        self.health = health
        self.dry_run = config.dry_run
        self.stats = _Stats()
        self._removed: set[str] = set()
        self._size_changed: set[str] = set()
        self.discovery = Discovery()  # probe back-off and hard-link waiters (not tracked)
        self._dry_logged: set[tuple[str, str]] = set()
        self._pending_aborts: set[str] = set()  # aborts that failed while unreachable
        self._waiting_on_other: set[str] = set()  # another source syncs these (see _discover)
        self._last_timer_cycle = 0.0
        self._last_maintenance = trio.current_time()
        self.arr = ArrSet.from_config(config.arr_url, config.arr_api_key, mode="source")
        self.cleanup = Cleanup(
            qb=qb,
            request=pool.request,
            cache=cache,
            mapper=mapper,
            min_space_gib=config.min_space,
            min_seeding_time=config.min_seeding_time,
            synced_tag=config.synced_tag,
            source_removed_tag=config.source_removed_tag,
            exclude_cleanup_tag=config.exclude_cleanup_tag,
            dry_run=config.dry_run,
            syncing=lambda h: h in self.registry,  # being (re-)synced: never handed off
            handoff_tag=config.handoff_tag,
            exclude_sync_tag=config.exclude_sync_tag,
            destination_ready=lambda: pool.connected > 0,  # authenticated connections only
        )
        self.synced = self.cleanup.synced  # the only writer of the cache and --synced-tag
        monitor.on_update = self.on_update
        monitor.on_removed = self.on_removed

    # -- events from the monitor (synchronous: record and wake) -----------------------------

    def wake(self) -> None:
        self.registry.notify_changed()

    def on_removed(self, info_hash: str) -> None:
        self._removed.add(info_hash)
        self.wake()

    def on_update(self, update: MaindataUpdate) -> None:
        wake = False
        if update.removed:
            self._removed |= update.removed
            wake = True
        now = trio.current_time()
        for h, fields in update.changed.items():
            if h in update.added:
                wake = True
                continue
            if "size" in fields and (h in self.registry or h in self.cache):
                self._size_changed.add(h)
                wake = True
            if "tags" in fields:
                wake = True
            elif fields & {"state", "progress"} and h not in self.registry and h not in self.cache:
                info = self.monitor.torrents.get(h)
                if info is not None and self.discovery.due(h, now) and self._skip(info) is None:
                    wake = True
        if wake:
            self.wake()

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.cache.load()
        task_status.started()
        while not self.monitor.ready.is_set():
            self._heartbeat()
            with trio.move_on_after(5):
                await self.monitor.ready.wait()
        last = -MIN_CYCLE_GAP
        while True:
            now = trio.current_time()
            if now - last < MIN_CYCLE_GAP:
                await trio.sleep(MIN_CYCLE_GAP - (now - last))
            self.registry.changed = trio.Event()
            last = trio.current_time()
            await self.cycle()
            self._heartbeat()
            with trio.move_on_at(self._next_deadline()):
                await self.registry.changed.wait()

    def _heartbeat(self) -> None:
        if self.health is not None:
            self.health.heartbeat("orchestrator", stale_after=max(120.0, 4 * self.config.sleep))

    def _next_deadline(self) -> float:
        """Trio time of the next timer cycle: ``--sleep`` from now, or sooner for a finalize
        poll that is due earlier."""
        now_m = trio.current_time()
        delay = self.config.sleep
        for t in self.registry.all():
            if t.tracker.complete and t.next_finalize_at:
                delay = min(delay, max(0.0, t.next_finalize_at - now_m))
        return trio.current_time() + delay

    def _skip(self, info: dict[str, Any]) -> str | None:
        h = str(info.get("hash") or "")
        return skip_reason(
            info,
            exclude_tag=self.config.exclude_sync_tag,
            failed_tag=self.config.sync_failed_tag,
            completed=h in self.cache,
            tracked=h in self.registry,
        )

    async def cycle(self) -> None:
        self.stats.cycles += 1
        now = trio.current_time()
        timer = now - self._last_timer_cycle >= self.config.sleep
        if timer:
            self._last_timer_cycle = now
        for step in (
            self._handle_removals,
            self._handle_exclusions,
            self._handle_selection_changes,
            self._discover,
            self._finalize_ready,
            self._handoff_tagged,
        ):
            try:
                await step()
            except (QBError, WireError, MetaError, OSError) as exc:
                log.error(
                    "event=cycle_step_failed step=%s code=%s error=%s",
                    step.__name__.lstrip("_"),
                    _code(exc),
                    kv(str(exc)),
                )
        if timer:
            try:
                free = self.monitor.server_state.get("free_space_on_disk")
                await self.cleanup.run_pass(
                    list(self.monitor.torrents.values()),
                    free_bytes=int(free) if free is not None else None,
                    draining=False,
                )
            except (QBError, WireError, OSError) as exc:
                log.error("event=cleanup_failed code=%s error=%s", _code(exc), kv(str(exc)))
            # Backstop: a tracked torrent that is not complete gets one piece-state poll per
            # --sleep even without a progress change (cheap: only active syncs).
            for t in self.registry.all():
                if not t.tracker.complete and t.info_hash in self.monitor.torrents:
                    self.monitor.request_poll(t)
        if now - self._last_maintenance >= MAINTENANCE_EVERY * self.config.sleep:
            self._last_maintenance = now
            try:
                await self._maintenance()
            except (QBError, WireError, MetaError, OSError) as exc:
                log.error("event=maintenance_failed code=%s error=%s", _code(exc), kv(str(exc)))
        metrics.active_torrents.labels("source").set(len(self.registry))
        metrics.active_finalization_backoffs.set(
            sum(1 for t in self.registry.all() if t.finalize_failures)
        )
        for t in self.registry.all():
            info = self.monitor.torrents.get(t.info_hash)
            if info is not None:
                t.remember_info(info)

    # -- 1. removals ------------------------------------------------------------------------

    async def _handle_removals(self) -> None:
        if self._pending_aborts and self.pool.connected:
            for h in sorted(self._pending_aborts):
                if h not in self.registry:
                    await self._abort(h, reason="retry")
        removed, self._removed = self._removed, set()
        for h in sorted(removed):
            if h in self.monitor.torrents:
                continue  # re-added meanwhile (or a spurious 404): nothing to do
            t = self.registry.get(h)
            if t is not None and t.removed_from_source:
                continue  # already handled: finishing the finalize of a removed torrent
            if h in self.cache:
                await self._handoff_removed(h)
                if t is not None:
                    self._untrack(h)
                continue
            if t is None:
                continue
            if t.tracker.complete and not self.dry_run:
                # Every piece is on the destination: finalize anyway, then hand over.
                t.mark_removed_from_source()
                log.info("event=torrent_removed_streamed hash=%s action=finalize", h)
                continue
            self._untrack(h)
            log.info("event=torrent_removed hash=%s action=abort", h)
            await self._abort(h, reason="removed")

    async def _handoff_removed(self, h: str) -> None:
        """A synced torrent left the source: the destination takes over seeding."""
        if self.dry_run:
            self._dry("start_destination", h, reason="removed_from_source")
            return
        if not self.pool.connected:
            log.warning("event=handoff_deferred hash=%s code=timeout retry=maintenance", h)
            return
        if await self.cleanup.start_on_destination(h, then="retry_at_maintenance"):
            await self.synced.forget(h, untag=False)  # gone from the source: no tag to remove
            log.info("event=handoff_removed hash=%s tag=%s", h, kv(self.config.source_removed_tag))
            if h in self.cleanup.handed_off:
                self.cleanup.handed_off.discard(h)  # the cleanup's own delete: logged there
            else:
                await self._record_removed_handoff(h)

    async def _record_removed_handoff(self, h: str) -> None:
        """The activity log's ``handed off`` for a synced torrent removed from the source. Its
        name and size come from its last entry in the log (the source lists it no more)."""
        if self.activity is None:
            return
        last = next((e for e in reversed(self.activity.events) if e.hash == h), None)
        await self.activity.record(
            Event(
                time=time.time(),
                kind="handed off",
                hash=h,
                name=last.name if last is not None else h,
                size=last.size if last is not None else 0,
                message="removed from the source",
            )
        )

    async def _abort(self, h: str, *, reason: str) -> None:
        if self.dry_run:
            self._dry("abort", h, reason=reason)
            return
        if not self.pool.connected:
            self._pending_aborts.add(h)
            log.warning("event=abort_deferred hash=%s reason=%s code=timeout", h, reason)
            return
        try:
            result = await self.pool.request(Abort(h, delete_files=True), within=CONTROL_TIMEOUT)
        except WireError as exc:
            retry = is_transient(exc)
            if retry:
                self._pending_aborts.add(h)
            log.warning(
                "event=abort_failed hash=%s reason=%s code=%s retry=%s error=%s",
                h,
                reason,
                exc.code.value,
                str(retry).lower(),
                kv(str(exc)),
            )
            return
        self._pending_aborts.discard(h)
        self.stats.aborted += 1
        log.info(
            "event=torrent_aborted hash=%s reason=%s existed=%s",
            h,
            reason,
            str(result.existed).lower(),
        )

    def _wait_for_other_source(self, h: str, *, detail: str = "") -> None:
        """Another source is syncing ``h`` into the same destination: stop tracking it here
        (nothing is aborted: the partial copy there is the other source's) and probe again
        after ``--sleep``; once the other sync is finalized the probe answers ``complete`` and
        the torrent is recorded as synced without a second copy."""
        if h in self.registry:
            self._untrack(h)
        self.discovery.retry_at(h, trio.current_time() + self.config.sleep)
        first = h not in self._waiting_on_other
        self._waiting_on_other.add(h)  # logged at info once per wait, then at debug
        log.log(
            logging.INFO if first else logging.DEBUG,
            "event=sync_wait hash=%s code=owned-by-other-source retry_in_s=%g error=%s",
            h,
            self.config.sleep,
            kv(detail or "another source is syncing this torrent"),
        )

    # -- 2. exclusions ----------------------------------------------------------------------

    async def _handle_exclusions(self) -> None:
        for t in self.registry.all():
            if t.owned_elsewhere:
                self._wait_for_other_source(t.info_hash)
                continue
            info = self.monitor.torrents.get(t.info_hash)
            if info is None:
                continue
            if has_tag(info, self.config.exclude_sync_tag):
                self._untrack(t.info_hash)
                metrics.exclude_sync_abort.inc()
                log.info(
                    "event=torrent_excluded hash=%s tag=%s action=abort",
                    t.info_hash,
                    kv(self.config.exclude_sync_tag),
                )
                await self._abort(t.info_hash, reason="excluded")
            elif has_tag(info, self.config.sync_failed_tag):
                self._untrack(t.info_hash)
                log.info(
                    "event=torrent_excluded hash=%s tag=%s action=untrack",
                    t.info_hash,
                    kv(self.config.sync_failed_tag),
                )

    # -- 3. selection changes ---------------------------------------------------------------

    async def _handle_selection_changes(self) -> None:
        changed, self._size_changed = self._size_changed, set()
        for h in sorted(changed):
            info = self.monitor.torrents.get(h)
            if info is None or has_tag(info, self.config.exclude_sync_tag):
                continue
            await self._check_selection(h, info)

    async def _check_selection(self, h: str, info: dict[str, Any]) -> None:
        try:
            files = await self.qb.files(h)
        except QBError as exc:
            if not exc.not_found:
                raise
            return
        fp = fingerprint(files)
        t = self.registry.get(h)
        if t is not None:
            if fp == t.meta.fingerprint:
                return
            log.info(
                "event=selection_changed hash=%s old=%s new=%s action=resync",
                h,
                kv(t.meta.fingerprint),
                kv(fp),
            )
            metrics.file_selection_resyncs.inc()
            await self.synced.forget(h)
            await self._track(h, info, resync=True, files=files, torrent_file=t.meta.torrent_file)
            return
        stored = self.cache.get(h)
        if stored is None or stored == fp:
            return
        if stored == "":
            await self.synced.mark(h, fp)  # unknown fingerprint: fill it in, no resync
            return
        log.info(
            "event=selection_changed hash=%s old=%s new=%s action=resync",
            h,
            kv(stored),
            kv(fp),
        )
        metrics.file_selection_resyncs.inc()
        if self.dry_run:
            self._dry("resync", h, reason="selection_changed")
            return
        await self.synced.forget(h)
        await self._track(h, info, resync=True, files=files)

    # -- 4. discovery -----------------------------------------------------------------------

    def _hardlink_gate(self, h: str, ids: frozenset[tuple[int, int]]) -> None:
        """Raise HardlinkWait when an active tracked torrent shares a linked file with ``h``
        (the rule and why: ``Discovery``'s docstring)."""
        active = (t.info_hash for t in self.registry.all() if t.active)
        blocker = self.discovery.gate(h, ids, active)
        if blocker is not None:
            raise HardlinkWait(blocker)

    async def _discover(self) -> None:
        now = trio.current_time()
        self.discovery.release(self.registry)
        candidates = [
            info
            for h, info in self.monitor.torrents.items()
            if not self._finishing_removed(h)
            and self.discovery.due(h, now)
            and self._skip(info) is None
        ]
        if not candidates:
            return
        if not self.pool.connected:
            return  # nothing to ask until the destination is back (no 30 s wait per cycle)
        candidates.sort(key=lambda info: not self._urgent(info))  # stable: --handoff-tag first
        ready: list[tuple[int, str]] = []
        for info in candidates:
            h = str(info["hash"])
            if self.arr and await self.arr.rejected(h, str(info.get("name") or "")):
                self.discovery.retry_at(h, now + ARR_RECHECK)  # *arr failed/ignored it: no sync
                continue
            try:
                result: InitResult = await self.pool.request(
                    InitTorrent(info_hash=h, probe=True), within=PROBE_TIMEOUT
                )
            except WireError as exc:
                if exc.code == ErrorCode.OWNED_BY_OTHER_SOURCE:
                    self._wait_for_other_source(h, detail=exc.message)
                    continue
                if is_transient(exc):
                    log.warning(
                        "event=destination_unreachable step=discover code=%s error=%s",
                        exc.code.value,
                        kv(str(exc)),
                    )
                    break
                log.warning(
                    "event=probe_failed hash=%s code=%s error=%s", h, exc.code.value, kv(str(exc))
                )
                self.discovery.retry_at(h, now + self.config.sleep)
                continue
            self._waiting_on_other.discard(h)
            if result.status == SyncStatus.COMPLETE:
                await self._mark_complete_on_probe(h)
            elif result.status == SyncStatus.VERIFYING:
                log.info("event=probe_verifying hash=%s", h)
                self.discovery.retry_at(h, now + min(self.config.sleep, 5.0))
            else:
                ready.append((result.pieces_have_count, h))
        urgent = {h for h, info in self.monitor.torrents.items() if self._urgent(info)}
        ready.sort(key=lambda x: (x[1] not in urgent, -x[0], x[1]))
        for have, h in ready:
            current = self.monitor.torrents.get(h)
            if current is None or self._skip(current) is not None:
                continue
            if self.dry_run:
                self._dry("sync", h, name=kv(current.get("name", "")), have=str(have))
                self.discovery.retry_at(h, now + self.config.sleep)
                continue
            try:
                await self._track(h, current)
            except HardlinkWait as wait:
                log.info("event=hardlink_group_wait hash=%s waiting_for=%s", h, wait.blocker)
                self.discovery.wait(h, wait.blocker)  # until the blocker is no longer tracked
            except MetaError as exc:
                log.error(
                    "event=torrent_unsupported hash=%s code=bad-request error=%s", h, kv(str(exc))
                )
                self.discovery.retry_at(h, now + 10 * self.config.sleep)
            except QBError as exc:
                log.warning("event=track_failed hash=%s code=qb-error error=%s", h, kv(str(exc)))
                self.discovery.retry_at(h, now + self.config.sleep)

    async def _mark_complete_on_probe(self, h: str) -> None:
        """The destination already has this torrent verified (e.g. a re-download)."""
        try:
            fp = fingerprint(await self.qb.files(h))
        except QBError:
            # Unknown: filled in later, never a reason to resync
            # (docs/design-decisions.md#unknown-fingerprint-is-filled-in).
            fp = ""
        log.info("event=torrent_complete_on_destination hash=%s", h)
        await self.synced.mark(h, fp)

    async def _track(
        self,
        h: str,
        info: dict[str, Any],
        *,
        resync: bool = False,
        files: list[dict[str, Any]] | None = None,
        torrent_file: bytes | None = None,
    ) -> Tracked:
        """Start streaming ``h``: build its layout, register it, initialize the destination."""
        if files is None:
            files = await self.qb.files(h)
        if torrent_file is None:
            torrent_file = await self.qb.export(h)
        meta = await trio.to_thread.run_sync(build_meta, h, info, files, torrent_file, self.mapper)
        if not resync:
            self._hardlink_gate(h, await trio.to_thread.run_sync(_link_ids, meta))
        tracker = PieceTracker(meta.num_pieces, meta.mask)
        completion = completion_time(info)
        since = completion if completion is not None else time.time()
        self.reader.forget(h)
        self._pending_aborts.discard(h)  # tracked again (tag removed, re-added): keep its data
        t = self.registry.add(meta, tracker, since, resync=resync)
        t.mark_urgent(self._urgent(info))
        metrics.active_torrents.labels("source").set(len(self.registry))
        log.info(
            "event=torrent_tracked hash=%s name=%s pieces=%d piece_length=%d selected_bytes=%d "
            "masked=%d save_sub_path=%s local_dir=%s resync=%s",
            h,
            kv(meta.name),
            meta.num_pieces,
            meta.geometry.piece_length,
            meta.selected_size,
            len(meta.mask),
            kv(meta.save_sub_path),
            kv(str(meta.local_dir)),
            str(resync).lower(),
        )
        try:
            await initialize(self.pool, self.registry, t, resync=resync, force=True)
        except (WireError, NotReady) as exc:
            if t.owned_elsewhere:
                self._wait_for_other_source(h, detail=str(exc))
                return t
            # Senders initialize lazily before the first piece; nothing is lost.
            log.warning(
                "event=init_deferred hash=%s code=%s error=%s",
                h,
                _code(exc),
                kv(str(exc)),
            )
        self.monitor.request_poll(t)  # learn its ready pieces now, not at the next tick
        return t

    # -- 5. finalize ------------------------------------------------------------------------

    async def _finalize_ready(self) -> None:
        if not self.pool.connected:
            return  # a destination outage is not a finalize failure; try when it is back
        now = trio.current_time()
        for t in sorted(self.registry.all(), key=lambda t: t.seq):
            if not t.active or not t.tracker.complete or now < t.next_finalize_at:
                continue
            if t.init_generation != self.pool.generation and self.pool.connected:
                # The destination may have restarted since this torrent was initialized.
                try:
                    await initialize(self.pool, self.registry, t)
                except (WireError, NotReady) as exc:
                    if is_transient(exc):
                        return
                    t.finalize_later(now + min(self.config.sleep, 5.0))
                    continue
                if not _complete(t):  # the destination lacked pieces: streaming resumes
                    continue
            if not await self._finalize(t):
                return  # destination unreachable: try again next cycle

    async def _finalize(self, t: Tracked) -> bool:
        """One finalize attempt. Returns False when the destination is unreachable."""
        h = t.info_hash
        now = trio.current_time()
        info = self.monitor.torrents.get(h) or t.last_info
        if info is None:
            return True
        t.meta.locate(self.mapper, info)
        t.begin_finalize(now)
        wall = time.time()
        request = Finalize(
            info_hash=h,
            category=str(info.get("category") or ""),
            # The hand-off request is for this source only: the destination's copy never
            # carries it (it would hand the torrent on again if the home also ran a source).
            tags=tuple(
                tag
                for tag in split_tags(str(info.get("tags") or ""))
                if tag != self.config.handoff_tag
            ),
            save_sub_path=t.meta.save_sub_path,
            # Every piece is here. qBittorrent stamps completion_on a moment after it reports
            # the last piece, and pieces stream faster than that: no stamp yet = just now.
            completed_ms_ago=completed_ms_ago(completion_time(info) or wall, wall),
        )
        try:
            result: FinalizeResult = await self.pool.request(request, within=FINALIZE_TIMEOUT)
        except WireError as exc:
            metrics.finalization_errors.labels("source").inc()
            if is_transient(exc):
                log.warning(
                    "event=finalize_deferred hash=%s code=%s error=%s",
                    h,
                    exc.code.value,
                    kv(str(exc)),
                )
                t.finalize_later(now + min(self.config.sleep, 5.0))
                return False
            await self._finalize_failed(t, exc)
            return True
        if result.status == SyncStatus.VERIFYING:
            # Each Finalize already waits on the destination for the job; ask again at once.
            if t.finalize_verifying(now + min(self.config.sleep, FINALIZE_REPOLL)) == 1:
                log.info("event=finalize_verifying hash=%s", h)
            return True
        await self._mark_synced(t, info, result)
        if self.discovery.anyone_waiting:
            self.wake()  # torrents sharing its files can start now (see _hardlink_gate)
        return True

    async def _finalize_failed(self, t: Tracked, exc: WireError) -> None:
        h = t.info_hash
        if exc.code == ErrorCode.NOT_FOUND:
            # The destination has no state for it (lost, or cleaned up): start over.
            metrics.finalize_not_found.inc()
            log.warning("event=finalize_not_found hash=%s action=reinit", h)
            t.uninitialized()
            await self._reinit(t)
            return
        t.finalize_failed(exc.code.value, exc.message or str(exc))
        log.warning(
            "event=finalize_failed hash=%s code=%s attempt=%d max=%d error=%s",
            h,
            exc.code.value,
            t.finalize_failures,
            MAX_FINALIZE_FAILURES,
            kv(exc.message or str(exc)),
        )
        if t.finalize_failures >= MAX_FINALIZE_FAILURES:
            await self._sync_failed(t, exc.code)
            return
        t.finalize_later(
            trio.current_time() + min(self.config.sleep, 2.0 * 2 ** (t.finalize_failures - 1))
        )
        if exc.code in (ErrorCode.INCOMPLETE, ErrorCode.VERIFY_FAILED):
            await self._reinit(t)

    async def _reinit(self, t: Tracked) -> None:
        """Re-learn what the destination has (after incomplete / not-found)."""
        try:
            await initialize(self.pool, self.registry, t, force=True)
        except (WireError, NotReady) as exc:
            log.warning(
                "event=reinit_failed hash=%s code=%s error=%s",
                t.info_hash,
                _code(exc),
                kv(str(exc)),
            )
        # Pieces the destination lacks are waiting again; ready ones were re-queued, and a
        # poll catches the rest.
        self.monitor.request_poll(t)

    async def _mark_synced(self, t: Tracked, info: dict[str, Any], result: FinalizeResult) -> None:
        h = t.info_hash
        orphan = t.removed_from_source
        self._untrack(h)
        selection = "partial" if t.meta.partial else "full"
        latency = max(0.0, time.time() - t.since)
        metrics.sync_outcomes.labels("source", "synced", selection).inc()
        metrics.bytes_synced.labels("source", selection).inc(t.meta.selected_size)
        metrics.torrent_sync_latency.observe(latency)
        self.stats.synced += 1
        log.info(
            "event=torrent_synced hash=%s name=%s pieces=%d bytes=%d selection=%s latency_s=%.1f "
            "finalize_s=%.1f state=%s",
            h,
            kv(t.name),
            t.tracker.num_pieces,
            t.meta.selected_size,
            selection,
            latency,
            trio.current_time() - t.finalize_started,
            kv(result.message or result.status.value),
        )
        await self._record_end(t, "synced", completed_at=completion_time(info))
        if orphan:
            # Removed from the source: the destination takes over. If it cannot start it, it
            # keeps the verified torrent stopped (not cached: nothing here retries).
            if await self.cleanup.start_on_destination(
                h, then="left_stopped_on_destination", completed_at=completion_time(info)
            ):
                log.info("event=handoff_removed hash=%s", h)
                await self._record_removed_handoff(h)
            return
        await self.synced.mark(h, t.meta.fingerprint)

    async def _record_end(
        self,
        t: Tracked,
        kind: str,
        *,
        completed_at: float | None = None,
        code: str | None = None,
        message: str = "",
    ) -> None:
        """The activity log's entry for the end of a sync (``synced`` or ``failed``): timed
        from when ``t`` was tracked and, when qBittorrent knows it, from its completion."""
        if self.activity is None:
            return
        now = time.time()
        await self.activity.record(
            Event(
                time=now,
                kind=kind,
                hash=t.info_hash,
                name=t.name,
                size=int(t.meta.selected_size),
                duration_seconds=now - t.tracked_at,
                since_complete_seconds=(
                    None if completed_at is None else max(now - completed_at, 0.0)
                ),
                code=code,
                message=message,
            )
        )

    async def _sync_failed(self, t: Tracked, code: ErrorCode) -> None:
        h = t.info_hash
        orphan = t.removed_from_source
        self._untrack(h)
        selection = "partial" if t.meta.partial else "full"
        metrics.sync_outcomes.labels("source", "failed", selection).inc()
        self.stats.failed += 1
        self.notifier.emit(
            "failed",
            h,
            t.name,
            size=t.meta.selected_size,
            code=code,
            message=t.last_error[1] if t.last_error else None,
        )
        message = t.last_error[1] if t.last_error else ""
        await self._record_end(t, "failed", code=str(code.value), message=message)
        log.error(
            "event=sync_failed hash=%s name=%s code=%s attempts=%d tag=%s",
            h,
            kv(t.name),
            code,
            t.finalize_failures,
            kv(self.config.sync_failed_tag),
        )
        if orphan:
            await self._abort(h, reason="removed")
            return
        await self._tag(h, self.config.sync_failed_tag)

    # -- 6. tagged hand-offs -----------------------------------------------------------------

    def _urgent(self, info: dict[str, Any]) -> bool:
        return has_tag(info, self.config.handoff_tag)

    async def _handoff_tagged(self) -> None:
        """``--handoff-tag``: tracked torrents that got the tag jump the queue; synced ones
        are handed off now (the destination must be connected to confirm it seeds)."""
        if not self.config.handoff_tag:
            return
        for t in self.registry.all():
            info = self.monitor.torrents.get(t.info_hash)
            if info is not None and self._urgent(info) and not t.urgent:
                self.registry.make_urgent(t)
                log.info("event=handoff_tag_priority hash=%s", t.info_hash)
        if not self.pool.connected and not self.dry_run:
            return  # a refusal for an outage would only delay the retry
        await self.cleanup.run_tagged(list(self.monitor.torrents.values()))

    # -- 8. maintenance ---------------------------------------------------------------------

    async def _maintenance(self) -> None:
        listed = self.monitor.torrents
        self.discovery.keep_listed(listed)
        self._dry_logged = {k for k in self._dry_logged if k[1] in listed}
        # Synced torrents that left the source while nobody watched (restart, missed event).
        for h in list(self.cache):
            if h not in self.monitor.torrents:
                await self._handoff_removed(h)
        # Tracked torrents whose selection changed without changing the selected size.
        for t in self.registry.all():
            info = self.monitor.torrents.get(t.info_hash)
            if info is not None and not has_tag(info, self.config.exclude_sync_tag):
                await self._check_selection(t.info_hash, info)

    # -- helpers ----------------------------------------------------------------------------

    def _finishing_removed(self, h: str) -> bool:
        """Tracked, fully streamed and removed from the source: being finalized anyway."""
        t = self.registry.get(h)
        return t is not None and t.removed_from_source

    def _untrack(self, h: str) -> None:
        self.registry.remove(h)
        self.reader.forget(h)
        metrics.active_torrents.labels("source").set(len(self.registry))

    async def _tag(self, h: str, tag: str) -> None:
        if not tag:
            return
        if self.dry_run:
            self._dry("tag", h, tag=kv(tag))
            return
        await add_tag(self.qb, h, tag)

    def _dry(self, action: str, h: str, **fields: str) -> None:
        key = (action, h)
        if key in self._dry_logged:
            return
        self._dry_logged.add(key)
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        log.info("event=dry_run action=%s hash=%s%s", action, h, extra)

    async def relocate(self, t: Tracked) -> bool:
        """A file was missing: re-read the torrent's location; True if it moved."""
        info = self.monitor.torrents.get(t.info_hash)
        changed = info is not None and t.meta.locate(self.mapper, info)
        if not changed:
            try:
                fresh = await self.qb.torrent(t.info_hash)
            except QBError:
                fresh = None
            if fresh is not None:
                changed = t.meta.locate(self.mapper, fresh)
        if changed:
            self.reader.forget(t.info_hash)
            log.info(
                "event=torrent_relocated hash=%s local_dir=%s save_sub_path=%s",
                t.info_hash,
                kv(str(t.meta.local_dir)),
                kv(t.meta.save_sub_path),
            )
        return changed

    def status(self) -> dict[str, Any]:
        torrents = []
        for t in sorted(self.registry.all(), key=lambda t: t.seq):
            tr = t.tracker
            torrents.append(
                {
                    "hash": t.info_hash,
                    "name": t.name,
                    "pieces": tr.num_pieces,
                    "done": tr.done_count,
                    "pending": len(tr.pending),
                    "inflight": len(tr.inflight),
                    "complete": tr.complete,
                    "finalize_failures": t.finalize_failures,
                    "removed_from_source": t.removed_from_source,
                }
            )
        return {
            "cycles": self.stats.cycles,
            "synced": self.stats.synced,
            "failed": self.stats.failed,
            "aborted": self.stats.aborted,
            "completed_on_destination": len(self.cache),
            "tracked": torrents,
            **({"handoff_tag": self.cleanup.tag_status()} if self.config.handoff_tag else {}),
        }


def _complete(t: Tracked) -> bool:
    return t.tracker.complete


def _code(exc: BaseException) -> Code:
    if isinstance(exc, WireError):
        return exc.code
    if isinstance(exc, QBError):
        return ErrorCode.QB_ERROR
    if isinstance(exc, NotReady):
        return SourceCode.VERIFYING
    if isinstance(exc, MetaError):
        return ErrorCode.BAD_REQUEST
    return ErrorCode.IO
