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

The drain (SIGTERM, gated by the pod annotation, see :mod:`qbsync.integrations.k8s`) is one pass in
*draining* mode: free space, seeding time and the exclude-cleanup tag are ignored; the synced
tag and the completion cache are still required. It reads a fresh torrent list (a cached one
could name torrents already gone).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from .. import metrics
from ..integrations import notify
from ..log import kv
from ..qbittorrent.api import QB, QBError, split_tags
from ..wire.errors import ErrorCode, WireError
from ..wire.messages import StartResult, StartTorrent
from .cache import CompletionCache
from .paths import PathMapper, content_parent

log = logging.getLogger("qbsync.source.cleanup")

GiB = 1024**3
HANDOFF_TIMEOUT = 30.0


@attrs.define
class Candidate:
    info_hash: str
    name: str
    size: int
    seeding_time: int
    popularity: int
    file_ids: set[tuple[int, int]] = attrs.field(factory=set)


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


async def add_tag(qb: QB, info_hash: str, tag: str) -> None:
    """Add ``tag`` to a source torrent. A failure is counted and logged, not raised: a missing
    ``--synced-tag`` is added again by the next cleanup pass (see :class:`Cleanup`)."""
    try:
        await qb.add_tags(info_hash, [tag])
    except QBError as exc:
        metrics.tag_application_errors.labels("source").inc()
        log.warning(
            "event=tag_failed hash=%s tag=%s code=qb-error error=%s",
            info_hash,
            kv(tag),
            kv(str(exc)),
        )


@attrs.define
class CleanupResult:
    handed_off: int = 0
    groups_ok: int = 0
    groups_failed: int = 0
    groups_skipped: int = 0
    deferred: bool = False  # stopped early: no authenticated destination connection


class Cleanup:
    notifier: notify.Notifier = notify.DISABLED  # --notify-url; the runner sets it

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
        # Whether an authenticated destination connection is up right now. A torrent is
        # stopped for a hand-off only then: stopping it and waiting for a destination that
        # is away (or an impostor that fails the handshake) only takes it off the swarm.
        self.destination_ready = destination_ready
        self._lock = trio.Lock()  # at most one pass (cleanup or drain) at a time

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

    async def _candidates(
        self, torrents: Iterable[dict[str, Any]], draining: bool
    ) -> list[Candidate]:
        out: list[Candidate] = []
        for info in torrents:
            h = str(info.get("hash") or "")
            if h not in self.cache or self.syncing(h):
                continue
            tags = split_tags(str(info.get("tags") or ""))
            if not draining and self.exclude_cleanup_tag and self.exclude_cleanup_tag in tags:
                continue
            if self.synced_tag and self.synced_tag not in tags:
                # Completion known but never tagged (e.g. found complete after a re-download
                # or a failed tag write): tag now, hand off in a later pass.
                if not self.dry_run:
                    await add_tag(self.qb, h, self.synced_tag)
                continue
            c = Candidate(
                info_hash=h,
                name=str(info.get("name") or ""),
                size=int(info.get("size") or 0),
                seeding_time=int(info.get("seeding_time") or 0),
                popularity=int(info.get("num_complete") or 0)
                + int(info.get("num_incomplete") or 0),
            )
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
        if self.dry_run:
            log.info("event=dry_run action=handoff hash=%s name=%s", h, kv(c.name))
            return True
        if not self.destination_ready():  # the connection dropped during this pass
            log.warning("event=handoff_deferred hash=%s reason=no_authenticated_destination", h)
            return False
        try:
            await self.qb.stop(h)
        except QBError as exc:
            metrics.torrent_stop_errors.labels("source").inc()
            log.warning(
                "event=handoff_failed hash=%s step=stop code=qb-error error=%s", h, kv(str(exc))
            )
            return False
        if not await self.start_on_destination(h, then="resume_source"):
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
        except QBError as exc:
            # The destination seeds already; a later pass retries the delete.
            log.warning(
                "event=handoff_delete_failed hash=%s code=qb-error error=%s", h, kv(str(exc))
            )
        metrics.cleanup_torrents_handed_off.inc()
        self.notifier.emit("handed_off", h, c.name, size=c.size)
        log.info(
            "event=handed_off hash=%s name=%s bytes=%d tag=%s",
            h,
            kv(c.name),
            c.size,
            kv(self.source_removed_tag),
        )
        return True

    async def start_on_destination(self, h: str, *, then: str) -> bool:
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
                StartTorrent(h, tag=self.source_removed_tag), within=HANDOFF_TIMEOUT
            )
        except WireError as exc:
            reason, detail = exc.code.value, str(exc)
        except (OSError, trio.TooSlowError) as exc:
            reason, detail = "error", f"{type(exc).__name__}: {exc}"
        else:
            if isinstance(result, StartResult) and result.started is True:
                return True
            reason, detail = "not-started", "destination answered started=false"
        metrics.handoff_refused.labels(reason).inc()
        log.warning(
            "event=handoff_refused hash=%s step=start reason=%s then=%s error=%s",
            h,
            reason,
            then,
            kv(detail),
        )
        if reason == ErrorCode.NOT_FOUND.value and h in self.cache:
            await self.cache.remove(h)
            log.warning(
                "event=completion_forgotten hash=%s reason=destination_copy_missing "
                "action=sync_again",
                h,
            )
        return False
