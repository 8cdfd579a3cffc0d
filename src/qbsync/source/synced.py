""" "Synced": the one owner of the fact that a torrent is finalized on the destination.

The fact has two copies: the completion cache entry (:mod:`.cache`, what qbsync itself reads)
and ``--synced-tag`` on the source torrent (what users and cleanup read). They change together
here and nowhere else: :meth:`SyncedMarks.mark` sets both, :meth:`SyncedMarks.forget` clears
both. :meth:`SyncedMarks.retag` only repairs the tag of a torrent the cache already holds (a
tag write that failed earlier), never the other way round. A grep in
``tests/test_state_machines.py`` keeps every cache write and synced-tag change in this module.
"""

from __future__ import annotations

import logging

from .. import metrics
from ..log import kv
from ..qbittorrent.api import QB, QBError
from .cache import CompletionCache

log = logging.getLogger("qbsync.source.synced")


async def add_tag(qb: QB, info_hash: str, tag: str) -> None:
    """Add ``tag`` to a source torrent. A failure is counted and logged, not raised: a missing
    ``--synced-tag`` is added again by the next cleanup pass (see :meth:`SyncedMarks.retag`)."""
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


class SyncedMarks:
    """The completion cache and ``--synced-tag``, changed as one (dry run: neither changes on
    disk or in qBittorrent; the cache is read-only then and the tag is only logged)."""

    def __init__(self, cache: CompletionCache, qb: QB, tag: str, *, dry_run: bool) -> None:
        self.cache = cache
        self.qb = qb
        self.tag = tag  # "" = --synced-tag disabled: the cache alone
        self.dry_run = dry_run

    async def mark(self, info_hash: str, fp: str) -> None:
        """Finalized on the destination with selection fingerprint ``fp`` ("" = unknown)."""
        await self.cache.put(info_hash, fp)
        await self.retag(info_hash)

    async def forget(self, info_hash: str, *, untag: bool = True) -> None:
        """No longer known synced (resync, destination copy gone, handed off). ``untag``
        False: the torrent left the source, there is no tag to remove."""
        await self.cache.remove(info_hash)
        if not untag or not self.tag:
            return
        if self.dry_run:
            log.info("event=dry_run action=untag hash=%s tag=%s", info_hash, kv(self.tag))
            return
        try:
            await self.qb.remove_tags(info_hash, [self.tag])
        except QBError as exc:
            metrics.tag_application_errors.labels("source").inc()
            log.warning(
                "event=untag_failed hash=%s tag=%s code=qb-error error=%s",
                info_hash,
                kv(self.tag),
                kv(str(exc)),
            )

    async def retag(self, info_hash: str) -> None:
        """Put ``--synced-tag`` on a torrent the cache holds (the tag follows the cache)."""
        if not self.tag:
            return
        if self.dry_run:
            log.info("event=dry_run action=tag hash=%s tag=%s", info_hash, kv(self.tag))
            return
        await add_tag(self.qb, info_hash, self.tag)
