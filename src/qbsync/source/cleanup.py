"""Disk-pressure cleanup and shutdown drain: hand seeding over to the destination.

A *handoff* of one torrent is: stop it on the source, start it on the destination
(``StartTorrent`` with ``--source-removed-tag``), delete it from the source with its files.
In that order, so the two never seed at once and the torrent never ends up seeded by nobody:
if the destination does not confirm (``started=True``) that it seeds a verified, complete copy,
the source is resumed and keeps its files: nothing is deleted on any doubt.

Cleanup runs in an orchestrator cycle while qBittorrent's free space (``server_state`` of the
monitor's feed: no extra request) is below ``--min-space``. Candidates are synced torrents
(completion cache) carrying ``--synced-tag`` (when set: a torrent found complete on the
destination without a real sync gets the tag first and waits a cycle) and not carrying
``--exclude-cleanup-tag``. Torrents sharing a file (same device and inode: hardlinks) are
handed off together as one group. Groups go least-wanted swarm first, then longest seeded,
then largest; a group whose shortest seeding time is below ``--min-seeding-time`` waits.
Cleanup stops once the estimated free space (qBittorrent deletes asynchronously, so it is
estimated, not re-read) reaches ``--min-space``.

A *tagged* hand-off (``--handoff-tag``, :meth:`Cleanup.run_tagged`) is the same handoff asked
for by the user: it runs every orchestrator cycle for each synced torrent carrying the tag,
whatever ``--min-space``, ``--min-seeding-time`` and ``--exclude-cleanup-tag`` say (asking is
explicit), alone (not with its hard-link group: nothing needs the space). ``--dry-run`` wins
(it only logs) and so does ``--exclude-sync-tag`` (such a torrent is never synced, so nothing
is handed off). A refusal keeps the source copy seeding, is logged, counted and shown in
``/status``, and is retried with a growing delay while the tag stays. The tag leaves the source
with the torrent (the delete removes both); the destination never gets it (the orchestrator
leaves it out of the tags it sends with ``Finalize``).

The drain (SIGTERM, gated by the pod annotation, see :mod:`qbsync.integrations.k8s`) is one pass in
*draining* mode: free space, seeding time and the exclude-cleanup tag are ignored; the synced
tag and the completion cache are still required. It reads a fresh torrent list (a cached one
could name torrents already gone).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from .. import metrics
from ..http.activity import ActivityLog, Event, completed_ms_ago
from ..integrations import notify
from ..log import kv
from ..qbittorrent.api import QB, QBError, completion_time, split_tags
from ..wire.errors import ErrorCode, WireError
from ..wire.messages import StartResult, StartTorrent
from .cache import CompletionCache
from .paths import PathMapper, content_parent
from .synced import SyncedMarks

log = logging.getLogger("qbsync.source.cleanup")

GiB = 1024**3
HANDOFF_TIMEOUT = 30.0
TAG_RETRY_FIRST = 5.0  # seconds before a refused --handoff-tag hand-off is tried again
TAG_RETRY_MAX = 300.0  # ... doubling up to this


@attrs.define
class Candidate:
    info_hash: str
    name: str
    size: int
    seeding_time: int
    popularity: int
    file_ids: set[tuple[int, int]] = attrs.field(factory=set)
    completed_at: float | None = None  # Unix time qBittorrent finished downloading it


@attrs.define
class Group:
    members: list[Candidate]

    @property
    def popularity(self) -> int:
        return sum(c.popularity for c in self.members)

    @property
    def max_size(self) -> int:
        return max(c.size for c in self.members)

    @property
    def min_seeding(self) -> int:
        return min(c.seeding_time for c in self.members)


def group_candidates(candidates: Sequence[Candidate]) -> list[Group]:
    """Union-find over shared (device, inode) pairs; groups in cleanup order."""
    parent = list(range(len(candidates)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[int, int], int] = {}
    for i, c in enumerate(candidates):
        for fid in c.file_ids:
            j = owner.setdefault(fid, i)
            if j != i:
                parent[find(i)] = find(j)
    groups: dict[int, list[Candidate]] = {}
    for i, c in enumerate(candidates):
        groups.setdefault(find(i), []).append(c)
    out = [Group(sorted(m, key=lambda c: c.info_hash)) for m in groups.values()]
    out.sort(key=lambda g: (g.popularity, -g.min_seeding, -g.max_size))
    return out


def _file_ids(local_dir: Path, names: Iterable[str]) -> set[tuple[int, int]]:
    out = set()
    for name in names:
        try:
            st = os.stat(local_dir / name)
        except OSError:
            continue
        if st.st_ino:
            out.add((st.st_dev, st.st_ino))
    return out


def _candidate(info: dict[str, Any]) -> Candidate:
    return Candidate(
        info_hash=str(info.get("hash") or ""),
        name=str(info.get("name") or ""),
        size=int(info.get("size") or 0),
        seeding_time=int(info.get("seeding_time") or 0),
        popularity=int(info.get("num_complete") or 0) + int(info.get("num_incomplete") or 0),
        completed_at=completion_time(info),
    )


@attrs.define
class TagRefusal:
    """Why the last ``--handoff-tag`` hand-off of a torrent did not happen, for ``/status``."""

    reason: str
    attempts: int
    at: float  # unix time of the last attempt
    retry_at: float  # trio time of the next one


@attrs.define
class CleanupResult:
    handed_off: int = 0
    groups_ok: int = 0
    groups_failed: int = 0
    groups_skipped: int = 0
    deferred: bool = False  # stopped early: no authenticated destination connection


class Cleanup:
    notifier: notify.Notifier = notify.DISABLED  # --notify-url; the runner sets it
    activity: ActivityLog | None = None  # the status page's history; the runner sets it

    def __init__(
        self,
        *,
        qb: QB,
        request: Callable[..., Awaitable[Any]],
        cache: CompletionCache,
        mapper: PathMapper,
        min_space_gib: float,
        min_seeding_time: int,
        synced_tag: str,
        source_removed_tag: str,
        exclude_cleanup_tag: str,
        dry_run: bool,
        syncing: Callable[[str], bool] = lambda h: False,
        handoff_tag: str = "",
        exclude_sync_tag: str = "",
        destination_ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.qb = qb
        self.request = request  # ConnectionPool.request
        self.cache = cache
        self.mapper = mapper
        self.min_space_gib = min_space_gib
        self.min_seeding_time = min_seeding_time
        self.synced_tag = synced_tag
        self.source_removed_tag = source_removed_tag
        self.exclude_cleanup_tag = exclude_cleanup_tag
        self.dry_run = dry_run
        self.syncing = syncing  # a torrent being (re-)synced is never a candidate
        self.synced = SyncedMarks(cache, qb, synced_tag, dry_run=dry_run)
        self._lock = trio.Lock()  # at most one pass (cleanup, drain or tagged) at a time
        # Whether an authenticated destination connection is up right now. A torrent is
        # stopped for a hand-off only then: stopping it and waiting for a destination that
        # is away (or an impostor that fails the handshake) only takes it off the swarm.
        self.destination_ready = destination_ready
        self.handoff_tag = handoff_tag
        self.exclude_sync_tag = exclude_sync_tag
        self.tag_refusals: dict[str, TagRefusal] = {}
        self.tag_pending = 0
        self.last_refusal = ""  # reason of the latest refusal of _handoff
        self._tag_dry_logged: set[str] = set()
        # Handed off and deleted: qBittorrent deletes asynchronously, so the torrent may stay
        # listed for a moment; it must not be stopped and handed off a second time.
        self._tag_done: set[str] = set()
        self.last_delete_ok = False
        # Handed off by a pass and deleted here: the removal that follows is not a second
        # hand-off for the activity log (the orchestrator reads and clears it).
        self.handed_off: set[str] = set()

    async def run_pass(
        self,
        torrents: Iterable[dict[str, Any]],
        *,
        free_bytes: int | None,
        draining: bool,
    ) -> CleanupResult | None:
        """One cleanup (or drain) pass. None when it did not run (enough space, or busy)."""
        result = CleanupResult()
        if self._lock.locked():
            log.warning("event=cleanup_skipped reason=already_running draining=%s", draining)
            return None
        async with self._lock:
            if not draining:
                if free_bytes is None:
                    return None
                free_gib = free_bytes // GiB
                if free_gib >= self.min_space_gib:
                    return None
                start_gib = free_gib
            else:
                start_gib = 0
            candidates = await self._candidates(torrents, draining)
            if not candidates:
                return result
            groups = group_candidates(candidates)
            log.info(
                "event=cleanup_start draining=%s free_gib=%s min_space_gib=%g candidates=%d "
                "groups=%d",
                str(draining).lower(),
                "n/a" if draining else start_gib,
                self.min_space_gib,
                len(candidates),
                len(groups),
            )
            freed = 0
            for group in groups:
                if not draining and group.min_seeding < self.min_seeding_time:
                    result.groups_skipped += 1
                    metrics.cleanup_groups.labels("skipped_seeding").inc()
                    continue
                if not self.destination_ready():
                    result.deferred = True
                    log.warning(
                        "event=cleanup_deferred draining=%s reason=no_authenticated_destination "
                        "note=%s",
                        str(draining).lower(),
                        kv("no torrent is stopped until the destination is connected"),
                    )
                    break
                ok = True
                for c in group.members:
                    if await self._handoff(c):
                        result.handed_off += 1
                    else:
                        ok = False
                if ok:
                    freed += group.max_size
                    result.groups_ok += 1
                    metrics.cleanup_groups.labels("success").inc()
                else:
                    result.groups_failed += 1
                    metrics.cleanup_groups.labels("failure").inc()
                if not draining and start_gib + freed // GiB >= self.min_space_gib:
                    break
            log.info(
                "event=cleanup_done draining=%s handed_off=%d groups_ok=%d groups_failed=%d "
                "groups_skipped_seeding=%d freed_bytes_est=%d",
                str(draining).lower(),
                result.handed_off,
                result.groups_ok,
                result.groups_failed,
                result.groups_skipped,
                freed,
            )
            return result

    def eligible(self, info: dict[str, Any], draining: bool) -> bool | None:
        """May ``info``'s torrent be handed off? True: a candidate; None: synced but not
        tagged yet (the pass tags it; it is a candidate the pass after); False: not ours to
        hand off (not in the completion cache, being synced, or excluded)."""
        h = str(info.get("hash") or "")
        if h not in self.cache or self.syncing(h):
            return False
        tags = split_tags(str(info.get("tags") or ""))
        if not draining and self.exclude_cleanup_tag and self.exclude_cleanup_tag in tags:
            return False
        if self.synced_tag and self.synced_tag not in tags:
            return None
        return True

    def next_candidates(self, torrents: Iterable[dict[str, Any]], limit: int = 5) -> list[Group]:
        """The torrents the next cleanup pass would hand off first, in its order, for the
        status page: the same filter (:meth:`eligible`) and order (:func:`group_candidates`)
        as :meth:`run_pass`, read from the monitor's torrent list, without a request or a
        side effect. Hardlink groups are not known here (that needs a stat of every file):
        each torrent is its own group."""
        cands = [_candidate(info) for info in torrents if self.eligible(info, False)]
        return group_candidates(sorted(cands, key=lambda c: c.size))[:limit]

    async def run_tagged(self, torrents: Iterable[dict[str, Any]]) -> int:
        """Hand off every synced torrent carrying ``--handoff-tag`` (see the module docstring
        for its precedence). Returns how many were handed off. Torrents not synced yet are
        counted as pending: the orchestrator syncs them first."""
        tag = self.handoff_tag
        if not tag:
            return 0
        now = trio.current_time()
        handed = 0
        pending = 0
        seen: set[str] = set()
        for info in torrents:
            h = str(info.get("hash") or "")
            tags = split_tags(str(info.get("tags") or ""))
            if not h or tag not in tags:
                continue
            if self.exclude_sync_tag and self.exclude_sync_tag in tags:
                continue  # never synced: nothing to hand off
            seen.add(h)
            pending += 1
            if h in self._tag_done:
                pending -= 1
                continue
            if h not in self.cache or self.syncing(h):
                continue
            refusal = self.tag_refusals.get(h)
            if refusal is not None and now < refusal.retry_at:
                continue
            c = Candidate(
                info_hash=h,
                name=str(info.get("name") or ""),
                size=int(info.get("size") or 0),
                seeding_time=int(info.get("seeding_time") or 0),
                popularity=0,
            )
            if self.dry_run:
                if h not in self._tag_dry_logged:
                    self._tag_dry_logged.add(h)
                    log.info(
                        "event=dry_run action=handoff hash=%s name=%s reason=handoff_tag tag=%s",
                        h,
                        kv(c.name),
                        kv(tag),
                    )
                continue
            if self._lock.locked():
                break  # a cleanup or drain pass runs: the next cycle tries again
            async with self._lock:
                log.info("event=handoff_tag_start hash=%s name=%s tag=%s", h, kv(c.name), kv(tag))
                ok = await self._handoff(c)
            if ok:
                handed += 1
                pending -= 1
                self.tag_refusals.pop(h, None)
                if self.last_delete_ok:  # else the next pass tries the delete again
                    self._tag_done.add(h)
                metrics.handoff_tag_results.labels("handed_off").inc()
                continue
            attempts = refusal.attempts + 1 if refusal is not None else 1
            delay = min(TAG_RETRY_MAX, TAG_RETRY_FIRST * 2 ** (attempts - 1))
            self.tag_refusals[h] = TagRefusal(
                reason=self.last_refusal or "error",
                attempts=attempts,
                at=time.time(),
                retry_at=trio.current_time() + delay,
            )
            metrics.handoff_tag_results.labels("refused").inc()
            log.warning(
                "event=handoff_tag_refused hash=%s name=%s reason=%s attempts=%d retry_in_s=%g "
                "action=keep_seeding_on_source",
                h,
                kv(c.name),
                self.last_refusal or "error",
                attempts,
                delay,
            )
        self.tag_refusals = {h: r for h, r in self.tag_refusals.items() if h in seen}
        self._tag_dry_logged &= seen
        self._tag_done &= seen
        self.tag_pending = pending
        metrics.handoff_tag_pending.set(pending)
        return handed

    def tag_status(self) -> dict[str, Any]:
        """``/status``: the ``--handoff-tag`` hand-offs not done yet and why."""
        return {
            "tag": self.handoff_tag,
            "pending": self.tag_pending,
            "refused": {
                h: {"reason": r.reason, "attempts": r.attempts, "at": r.at}
                for h, r in sorted(self.tag_refusals.items())
            },
        }

    async def _candidates(
        self, torrents: Iterable[dict[str, Any]], draining: bool
    ) -> list[Candidate]:
        out: list[Candidate] = []
        for info in torrents:
            h = str(info.get("hash") or "")
            ok = self.eligible(info, draining)
            if ok is None:
                # Completion known but never tagged (e.g. found complete after a re-download
                # or a failed tag write): tag now, hand off in a later pass.
                if not self.dry_run:
                    await self.synced.retag(h)
                continue
            if not ok:
                continue
            c = _candidate(info)
            try:
                files = await self.qb.files(h)
            except QBError:
                files = []
            names = [str(f.get("name") or "") for f in files]
            parent = content_parent(
                str(info.get("content_path") or ""), str(info.get("save_path") or ""), names
            )
            c.file_ids = await trio.to_thread.run_sync(
                _file_ids, self.mapper.to_local(parent), names
            )
            out.append(c)
        out.sort(key=lambda c: c.size)
        return out

    async def _handoff(self, c: Candidate) -> bool:
        """Stop on the source, start on the destination, delete on the source."""
        h = c.info_hash
        self.last_refusal = ""
        self.last_delete_ok = False
        if self.dry_run:
            log.info("event=dry_run action=handoff hash=%s name=%s", h, kv(c.name))
            return True
        if not self.destination_ready():  # the connection dropped during this pass
            log.warning("event=handoff_deferred hash=%s reason=no_authenticated_destination", h)
            return False
        started = time.monotonic()
        try:
            await self.qb.stop(h)
        except QBError as exc:
            self.last_refusal = "stop-failed"
            metrics.torrent_stop_errors.labels("source").inc()
            log.warning(
                "event=handoff_failed hash=%s step=stop code=qb-error error=%s", h, kv(str(exc))
            )
            return False
        if not await self.start_on_destination(
            h, then="resume_source", completed_at=c.completed_at
        ):
            try:
                await self.qb.start(h)
            except QBError as exc2:
                metrics.torrent_resume_errors.labels("source").inc()
                log.error(
                    "event=resume_failed hash=%s code=qb-error error=%s note=%s",
                    h,
                    kv(str(exc2)),
                    kv("torrent is stopped on both sides"),
                )
            return False
        try:
            await self.qb.delete(h, delete_files=True)
            self.last_delete_ok = True
        except QBError as exc:
            # The destination seeds already; a later pass retries the delete.
            log.warning(
                "event=handoff_delete_failed hash=%s code=qb-error error=%s", h, kv(str(exc))
            )
        metrics.cleanup_torrents_handed_off.inc()
        self.handed_off.add(h)
        self.notifier.emit("handed_off", h, c.name, size=c.size)
        log.info(
            "event=handed_off hash=%s name=%s bytes=%d tag=%s",
            h,
            kv(c.name),
            c.size,
            kv(self.source_removed_tag),
        )
        if self.activity is not None:
            now = time.time()
            await self.activity.record(
                Event(
                    time=now,
                    kind="handed off",
                    hash=h,
                    name=c.name,
                    size=c.size,
                    duration_seconds=time.monotonic() - started,
                    since_complete_seconds=None if c.completed_at is None else now - c.completed_at,
                )
            )
        return True

    async def start_on_destination(
        self, h: str, *, then: str, completed_at: float | None = None
    ) -> bool:
        """``StartTorrent`` with ``--source-removed-tag``: the destination seeds ``h`` from now
        on. True only when the destination answered ``started=True``, which it does only after
        checking its ``.finalized`` marker, the files' sizes and qBittorrent's progress, and
        seeing qBittorrent seed it. Anything else (``started=False``, an error, a timeout) is a
        refusal: counted in ``handoff_refused_total{reason}``, logged with what the caller does
        ``then``, and the caller keeps its copy. When the destination says its copy is gone
        (``not-found``), the completion cache entry is dropped so the torrent is synced again
        instead of being offered for hand-off forever."""
        reason = ""
        detail = ""
        try:
            result = await self.request(
                StartTorrent(
                    h,
                    tag=self.source_removed_tag,
                    completed_ms_ago=completed_ms_ago(completed_at, time.time()),
                ),
                within=HANDOFF_TIMEOUT,
            )
        except WireError as exc:
            reason, detail = exc.code.value, str(exc)
        except (OSError, trio.TooSlowError) as exc:
            reason, detail = "error", f"{type(exc).__name__}: {exc}"
        else:
            if isinstance(result, StartResult) and result.started is True:
                return True
            reason, detail = "not-started", "destination answered started=false"
        self.last_refusal = reason
        metrics.handoff_refused.labels(reason).inc()
        log.warning(
            "event=handoff_refused hash=%s step=start reason=%s then=%s error=%s",
            h,
            reason,
            then,
            kv(detail),
        )
        if reason == ErrorCode.NOT_FOUND.value and h in self.cache:
            await self.synced.forget(h)
            log.warning(
                "event=completion_forgotten hash=%s reason=destination_copy_missing "
                "action=sync_again",
                h,
            )
        return False
