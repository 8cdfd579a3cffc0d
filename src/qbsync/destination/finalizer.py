"""Finalization: per-file early finalize, and the torrent's finalize into qBittorrent.

Per file (as soon as every piece touching it is written): wait for writes in flight,
``fdatasync``, close, persist the bitmap, rename ``.partial`` -> final. No read-back here:
every piece counted for the file was SHA-1-checked before it was written (or proven by the
scan of data already on disk); the read-back happens once for the whole torrent — by
qBittorrent's recheck, or by our own pass when no qBittorrent is configured.

Per torrent (the source's Finalize): a synchronous completeness check, then a background job
(a task in the runner's nursery, one at a time across torrents) that

1. closes and renames the remaining files and persists the bitmap;
2. without ``--qb-url``: reads every piece back from disk (page cache dropped first) and
   checks it; with ``--qb-url``: adds the raw ``.torrent`` *stopped* with the save path
   ``--save-path``/sub-path, category (created first if missing), the source's tags (minus
   qbsync's own, :data:`QBSYNC_TAGS`: ``synced`` is set only after the check it stands for) and
   ``contentLayout=Original`` (the on-disk layout is exactly the names the source sent, and
   renames any file whose name qBittorrent derives differently); sets priority 0 on deselected
   files and reads the priorities back until they stick (qBittorrent may silently drop the
   call on a freshly added stopped torrent). When every file is selected and ``--recheck`` is
   off, every file's presence and size is checked and the add skips qBittorrent's hash check
   (every piece was SHA-1-checked before it was written): the torrent is complete in
   qBittorrent at once. Otherwise it forces a recheck and polls (every 0.25 s for the first
   minute, then every ``--poll-interval``) up to ``--poll-timeout`` (0 = 10 min + 1 min/GiB,
   at most 6 h);
3. judges: every piece that lies entirely in selected files must pass. Pieces that touch a
   deselected file cannot pass in qBittorrent (it does not have those bytes) and are excused;
   they were SHA-1-checked here when the source had the bytes, and recorded as unverified
   otherwise. ``missingFiles``/``error`` fail fast; a recheck whose result does not change
   for a settle window (a few refresh intervals) has finished even if its ``checking`` state
   was never visible;
4. on success tags ``--synced-tag`` and writes the ``.finalized`` marker. The torrent is left
   **stopped**: starting it is the source's hand-off (StartTorrent), so a private tracker never
   sees the torrent seeded from two places at once;
5. on corrupt pieces (our read-back or qBittorrent's) clears them, renames the files back to
   ``.partial`` and answers ``incomplete``: the source re-inits and resends just those pieces.

The Finalize request's ``save_sub_path`` is validated (``unsafe-path``) but not acted on: the
layout is fixed when the torrent is initialized (the Go reference's relocation on a sub-path
change is not implemented); qBittorrent is always given the directory the files really are in.

Dry run: the finalize only checks that every needed piece arrived and matched during this run
and logs what it would have done in qBittorrent; nothing is renamed, added or tagged.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import stat
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from .. import metrics, paths
from ..config import GiB
from ..http.activity import ActivityLog, Event, since_complete
from ..integrations import notify
from ..integrations.arr import ArrSet
from ..log import paths_kv
from ..qbittorrent.api import CHECKING_STATES, ERROR_STATES, QB, SEEDING_STATES, QBError
from ..wire.errors import ErrorCode, WireError
from ..wire.messages import Finalize, FinalizeResult, SyncStatus
from .files import demote_file
from .ownership import ConflictError
from .state import DataFile, FileStatus, FinalizeJob, Phase, TorrentState
from .store import Store
from .verify import PieceCheck, ReadSpan, verify_pieces
from .writer import close_file

log = logging.getLogger("qbsync.destination.finalizer")

PRIORITY_BUDGET = 30.0  # seconds to get deselected priorities to stick
PRIORITY_BACKOFF = (0.5, 5.0)
LISTED_TIMEOUT = 15.0  # after an add, wait this long for the torrent to be listed
READY_POLL = 0.1  # seconds between looks at a torrent added with skip-checking
READY_TIMEOUT = 10.0  # ... before falling back to a full recheck
QUICK_POLL = 0.25  # recheck polls in the first QUICK_POLL_WINDOW seconds
QUICK_POLL_WINDOW = 60.0
VERIFY_BATCH = 32


def scaled_poll_timeout(total_size: int) -> float:
    """``--poll-timeout 0``: 10 min + 1 min per whole GiB, capped at 6 h (a recheck reads
    every byte; on slow disks that is minutes per GiB)."""
    return float(min(6 * 3600, 600 + 60 * (total_size // GiB)))


# Tags qbsync itself sets, each meaning a check passed: never copied from the source's tags
# (a source torrent re-syncing carries its own ``synced``), only set by qbsync after the check.
QBSYNC_TAGS = frozenset({"synced", "source-removed", "sync-failed"})


@attrs.frozen
class FinalizerSettings:
    qb_save_path: Path
    poll_interval: float = 2.0
    poll_timeout: float = 300.0  # 0 = scaled by size
    synced_tag: str = "synced"
    recheck: bool = False  # --recheck: full qBittorrent recheck even when every file is selected

    def copied_tags(self, tags: tuple[str, ...] | list[str]) -> list[str]:
        """The source's tags minus qbsync's own (see :data:`QBSYNC_TAGS`)."""
        own = QBSYNC_TAGS | {self.synced_tag}
        return [t for t in tags if t and t not in own]


class Finalizer:
    notifier: notify.Notifier = notify.DISABLED  # --notify-url; the runner sets it
    activity: ActivityLog | None = None  # the status page's history; the runner sets it

    def __init__(self, store: Store, qb: QB | None, settings: FinalizerSettings) -> None:
        self.store = store
        self.qb = qb
        self.settings = settings
        self.slot = trio.CapacityLimiter(1)  # one torrent verified/added at a time
        self.arr: ArrSet | None = None  # Sonarr/Radarr to ask for an import once synced

    # -- per-file early finalize -------------------------------------------------------------

    def file_complete(self, state: TorrentState, f: DataFile) -> None:
        """Called on the event loop when the last piece touching ``f`` is written."""
        if f.finalizing or f.status is not FileStatus.STREAMING or state.dry_run:
            return
        if state.phase not in (Phase.ACTIVE, Phase.SCANNING):
            return
        f.finalizing = True
        f.finalize_done = trio.Event()
        self.store.spawn(state, lambda: self._finalize_file(state, f), "early-finalize")

    async def _finalize_file(self, state: TorrentState, f: DataFile) -> None:
        try:
            if not await close_file(state, f):
                return
            pieces = state.geometry.file_pieces(f.index)
            if state.phase is Phase.CLOSED or not all(state.written[i] for i in pieces):
                return
            await self.store.flush(state)
            # Ours (ledger-checked), and never over an existing name: a file someone put at
            # the final name meanwhile stays theirs and this rename fails.
            await trio.to_thread.run_sync(
                state.ledger.rename, self.store.root, paths.partial_parts(f.parts), f.parts
            )
            f.become(FileStatus.COMPLETE)
            metrics.files_early_finalized.inc()
            log.info("event=file_finalized hash=%s file=%s", state.info_hash, paths_kv(f.parts))
        except (OSError, paths.UnsafePathError, ConflictError) as exc:
            # Left STREAMING with all pieces written: the torrent's finalize retries it.
            log.warning(
                "event=file_finalize_failed hash=%s file=%s error=%s",
                state.info_hash,
                paths_kv(f.parts),
                paths_kv(str(exc)),
            )
        finally:
            f.finalizing = False
            if f.finalize_done is not None:
                f.finalize_done.set()
                f.finalize_done = None

    # -- torrent finalize --------------------------------------------------------------------

    def check_complete(self, state: TorrentState) -> None:
        """Raise ``incomplete`` unless every piece touching a streamed file is written (pieces
        covered only by skipped files do not count: nothing of them is written here) and no
        file awaits its scan."""
        if state.dry_run:
            seen = state.dry_seen
            missing = sum(1 for i in state.needed().set_indices() if seen is None or not seen[i])
        else:
            missing = state.missing_count()
        existing = sum(1 for f in state.files if f.status is FileStatus.EXISTING)
        if missing or existing:
            raise WireError(
                ErrorCode.INCOMPLETE,
                f"{missing} of {state.num_pieces} pieces missing"
                + (f", {existing} files not verified yet" if existing else ""),
            )

    def start(self, state: TorrentState, request: Finalize) -> FinalizeJob:
        """Begin finalizing (caller holds the torrent's lock and ran :meth:`check_complete`)."""
        job = FinalizeJob(request)
        state.begin_finalize(job)
        self.store.spawn(state, lambda: self._run(state, job), "finalize")
        return job

    async def _run(self, state: TorrentState, job: FinalizeJob) -> None:
        start = time.monotonic()
        try:
            async with self.slot:
                job.result = await self._finalize(state, job.request)
        except WireError as exc:
            job.error = exc
        except ConflictError as exc:
            job.error = exc.logged(state.info_hash)
        except (OSError, paths.UnsafePathError) as exc:
            job.error = WireError(ErrorCode.IO, f"finalizing files: {exc}")
        except QBError as exc:
            job.error = WireError(ErrorCode.QB_ERROR, str(exc))
        except trio.Cancelled:
            job.error = WireError(ErrorCode.SHUTTING_DOWN, "finalization cancelled")
            raise
        except Exception as exc:
            log.exception("event=finalize_crashed hash=%s", state.info_hash)
            job.error = WireError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            elapsed = time.monotonic() - start
            if job.error is not None:
                metrics.finalization_errors.labels("destination").inc()
                state.last_error = (job.error.code.value, job.error.message, time.time())
                metrics.finalization_duration.labels("failure").observe(elapsed)
                log.warning(
                    "event=finalize_failed hash=%s code=%s error=%s seconds=%.1f",
                    state.info_hash,
                    job.error.code.value,
                    paths_kv(job.error.message),
                    elapsed,
                )
            else:
                metrics.finalization_duration.labels("success").observe(elapsed)
            job.done.set()
        if self.activity is not None and not state.dry_run:
            await self._record(state, job)

    async def _record(self, state: TorrentState, job: FinalizeJob) -> None:
        """The activity log's entry for a finished finalize: ``synced`` (verified, in
        qBittorrent, seeding-ready) or ``failed`` with its code (the source retries)."""
        assert self.activity is not None
        now = time.time()
        created = state.meta.created
        await self.activity.record(
            Event(
                time=now,
                kind="failed" if job.error is not None else "synced",
                hash=state.info_hash,
                name=state.meta.name,
                size=sum(f.size for f in state.files if f.selected),
                duration_seconds=now - created if created > 0 else None,
                since_complete_seconds=since_complete(
                    job.request.completed_ms_ago, time.monotonic() - job.started
                ),
                code=job.error.code.value if job.error is not None else None,
                message=job.error.message if job.error is not None else "",
            )
        )

    async def _finalize(self, state: TorrentState, request: Finalize) -> FinalizeResult:
        if state.dry_run:
            return self._dry_run(state, request)
        # Early finalizes in progress complete first (they own those files' handles).
        for f in state.files:
            if f.finalize_done is not None:
                await f.finalize_done.wait()
        for f in state.files:
            if f.status is FileStatus.STREAMING:
                await close_file(state, f)
        self.check_complete(state)  # a failed sync clears bits: re-check after closing
        await self.store.flush(state)
        await trio.to_thread.run_sync(self._rename_all, state)

        if self.qb is None:
            failed = await self._read_back(state)
            if failed:
                await self._recover(state, failed, "read-back")
            qb_state = "finalized"
        else:
            qb_state, failed = await self._register(state, request)
            if failed:
                by = "size check" if qb_state == "files_changed" else "qbittorrent recheck"
                await self._recover(state, failed, by)

        await self.store.write_marker(state)
        self.store.untrack(state)
        selection = "full" if all(f.selected or f.pad for f in state.files) else "partial"
        metrics.sync_outcomes.labels("destination", "synced", selection).inc()
        metrics.bytes_synced.labels("destination", selection).inc(
            sum(f.size for f in state.files if f.selected)
        )
        unverified = state.unverified.count()
        log.info(
            "event=finalized hash=%s state=%s selection=%s unverified_boundary_pieces=%d",
            state.info_hash,
            qb_state,
            selection,
            unverified,
        )
        content = self.content_path(state)
        self.notifier.emit(
            "synced", state.info_hash, state.meta.name, size=state.geometry.total_size, path=content
        )
        if self.arr:  # verified and in place: now *arr may import it (never raises)
            await self.arr.import_synced(state.info_hash, content)
        message = f"finalized ({qb_state})"
        if unverified:
            message += f"; {unverified} boundary pieces could not be hash-checked"
        return FinalizeResult(SyncStatus.COMPLETE, message)

    def _dry_run(self, state: TorrentState, request: Finalize) -> FinalizeResult:
        self.check_complete(state)
        sub = state.meta.save_sub_path
        log.info(
            "event=dry_run_finalize hash=%s would=%s save_path=%s category=%s tags=%s",
            state.info_hash,
            "rename_partials,add_stopped_to_qbittorrent,recheck,tag"
            if self.qb is not None
            else "rename_partials,read_back_verify",
            paths_kv(posixpath.join(str(self.settings.qb_save_path), sub)),
            paths_kv(request.category),
            paths_kv(",".join(request.tags)),
        )
        self.store.untrack(state)
        return FinalizeResult(
            SyncStatus.COMPLETE, "dry run: all pieces received and verified; nothing was changed"
        )

    def _rename_all(self, state: TorrentState) -> None:
        root = self.store.root
        for f in state.files:
            if f.status is not FileStatus.STREAMING:
                continue
            partial = paths.partial_parts(f.parts)
            try:
                state.ledger.rename(root, partial, f.parts)  # ours; never over another name
            except FileNotFoundError:
                # Idempotent restart: renamed before, the marker was not written yet.
                if paths.regular_size(root, f.parts) != f.size:
                    raise
            f.become(FileStatus.COMPLETE)

    # -- verification ------------------------------------------------------------------------

    def _checks(self, state: TorrentState, pieces: list[int]) -> list[PieceCheck]:
        out = []
        for i in pieces:
            spans = []
            for span in state.geometry.spans(i):
                f = state.files[span.file_index]
                spans.append(ReadSpan(None if f.pad else f.parts, span.file_offset, span.length))
            out.append(PieceCheck(i, state.metainfo.piece_hashes[i], tuple(spans)))
        return out

    def must_pass(self, state: TorrentState) -> list[int]:
        """Pieces qBittorrent (or our read-back) must pass: touching a selected file and no
        deselected one."""
        out: set[int] = set()
        for f in state.files:
            if f.selected and f.size > 0:
                out.update(state.geometry.file_pieces(f.index))
        return sorted(i for i in out if not state.is_boundary(i))

    async def _read_back(self, state: TorrentState) -> list[int]:
        pieces = self.must_pass(state)
        ok: set[int] = set()
        for start in range(0, len(pieces), VERIFY_BATCH):
            batch = self._checks(state, pieces[start : start + VERIFY_BATCH])
            async with self.store.read_limiter:
                ok |= await trio.to_thread.run_sync(
                    functools.partial(verify_pieces, self.store.root, batch, drop_cache=True)
                )
        failed = [i for i in pieces if i not in ok]
        log.info(
            "event=read_back_done hash=%s pieces=%d failed=%d",
            state.info_hash,
            len(pieces),
            len(failed),
        )
        return failed

    async def _recover(self, state: TorrentState, failed: list[int], by: str) -> None:
        """Corrupt pieces found after the rename: clear them, put their files back to
        ``.partial`` and answer ``incomplete`` so the source resends exactly those."""
        metrics.verification_errors.labels("destination").inc()
        metrics.verification_recoveries.inc()
        root = self.store.root

        def demote() -> None:
            touched = {s.file_index for i in failed for s in state.geometry.spans(i)}
            for idx in sorted(touched):
                f = state.files[idx]
                if not f.selected or f.status is not FileStatus.COMPLETE or f.size == 0:
                    continue
                # Only files this torrent created are put back to .partial; an adopted
                # (user's) file that no longer verifies raises ConflictError, untouched.
                demote_file(root, state, f)

        state.clear_pieces(failed)
        await trio.to_thread.run_sync(demote)
        state.recount_remaining()
        await self.store.flush(state)
        shown = ",".join(str(i) for i in failed[:20]) + ("..." if len(failed) > 20 else "")
        raise WireError(
            ErrorCode.INCOMPLETE,
            f"{by} found {len(failed)} corrupt pieces ({shown}); they will be re-requested",
        )

    # -- qBittorrent -------------------------------------------------------------------------

    def content_path(self, state: TorrentState) -> str:
        """The torrent's content as qBittorrent sees it (what Sonarr/Radarr import and the
        webhook's ``path``), built from the validated file paths only: the one top-level entry
        (a single file, or the torrent's root folder) under the save path, or the save path
        itself when the files have several top-level entries. Never from the request's
        ``name`` or the metainfo's: an absolute or ``..`` name would pick the path sent on."""
        try:
            sub = paths.split_relative(state.meta.save_sub_path, allow_empty=True)
        except paths.UnsafePathError:  # validated at init; a state file is no proof
            return str(self.settings.qb_save_path)
        base = posixpath.join(str(self.settings.qb_save_path), *sub)
        rels = [f.parts[len(sub) :] for f in state.files if f.parts and not f.pad]
        if (
            not rels
            or any(not r for r in rels)
            or any(f.parts[: len(sub)] != sub for f in state.files if f.parts and not f.pad)
        ):
            return base
        tops = {r[0] for r in rels}
        return posixpath.join(base, rels[0][0]) if len(tops) == 1 else base

    def qb_save_path(self, state: TorrentState) -> str:
        sub = state.meta.save_sub_path
        base = str(self.settings.qb_save_path)
        return posixpath.join(base, sub) if sub else base

    def skip_check(self, state: TorrentState) -> bool:
        """The seeding-ready fast path applies: every file selected and no ``--recheck``.

        Every piece was SHA-1-checked against a ``.torrent`` whose info-hash matched before it
        was written (or, for data found on disk, by the scan), and each file was fsync'd before
        its rename, so a qBittorrent recheck would only read every byte again to learn what is
        already proven. A partial selection has boundary pieces qBittorrent must judge itself.
        """
        if self.settings.recheck:
            return False
        return all(f.selected or f.pad for f in state.files)

    def _wrong_sizes(self, state: TorrentState) -> tuple[list[int], list[str]]:
        """Check every selected file is present with its size before skipping the recheck.
        Returns the pieces of files that are not, and their names (for the log)."""
        failed: set[int] = set()
        names: list[str] = []
        for f in state.files:
            if f.pad or not f.selected:
                continue
            if paths.regular_size(self.store.root, f.parts) != f.size:
                names.append("/".join(f.parts))
                failed.update(state.geometry.file_pieces(f.index))
        return sorted(failed), names

    def check_qb_paths(self, state: TorrentState) -> None:
        """Raise :class:`ConflictError` unless every name qBittorrent will resolve for this
        torrent is absent or owned by qbsync for it (blocking; nothing is changed).

        qBittorrent is given the raw ``.torrent`` with the original layout, so it resolves
        each file at its *metainfo* path first and is then asked to rename it to the name the
        source sent (the *target* path, where qbsync wrote it); a recheck reads the target.
        Its rename replaces whatever is at the target and follows symlinks, so:

        * every directory on the way to either path is absent or a real directory (a symlink
          would send qBittorrent out of ``--data``);
        * a selected file's target holds a regular file qbsync created for this torrent, or,
          when both paths are the same (no rename), a user's file adopted after every piece
          it covers verified (qBittorrent only reads it);
        * where the two paths differ, nothing exists at the metainfo path (qBittorrent would
          move it over the verified copy), and a user's adopted file is never the target;
        * a deselected file's paths hold nothing, except a regular file at a target equal to
          its metainfo path (qBittorrent never writes a file of priority 0; it may read it).
        """
        root = self.store.root
        sub = paths.split_relative(state.meta.save_sub_path, allow_empty=True)
        for f in state.files:
            if f.pad or not f.parts:
                continue
            meta_name = state.metainfo.geometry.files[f.index].path
            try:
                meta = sub + paths.split_relative(meta_name)
            except paths.UnsafePathError:
                raise ConflictError(
                    f.parts, f"has an unusable metainfo name {meta_name!r}"
                ) from None
            for parts in (meta, f.parts):
                _check_dirs(root, parts)
            target = _leaf(root, f.parts)
            renamed = meta != f.parts
            if renamed and _leaf(root, meta) is not None:
                raise ConflictError(
                    meta,
                    f"exists and qBittorrent would move it to {'/'.join(f.parts)!r}: "
                    "not qbsync's file",
                )
            if target is None:
                if f.selected:
                    raise ConflictError(f.parts, "is missing before it is handed to qBittorrent")
                continue
            if not stat.S_ISREG(target.st_mode):
                raise ConflictError(f.parts, "is not a regular file")
            ours = state.ledger.owns_file(target, str(paths.join(root, f.parts)))
            if ours:
                continue
            if not renamed and (not f.selected or f.parts in state.ledger.adopted):
                continue
            raise ConflictError(f.parts, "was not created by qbsync for this torrent")

    async def _register(self, state: TorrentState, request: Finalize) -> tuple[str, list[int]]:
        """Add (or reuse) the torrent in the destination qBittorrent and have it checked.
        Returns qBittorrent's final state and the pieces that failed.

        Fast path (:meth:`skip_check`): files' presence and sizes are checked, the torrent is
        added with skip-checking and is complete in qBittorrent at once. Otherwise (``--recheck``,
        a partial selection, or an add that qBittorrent did not take as complete) qBittorrent
        rechecks every byte."""
        qb = self.qb
        assert qb is not None
        h = state.info_hash
        tags = self.settings.copied_tags(request.tags)
        skip = self.skip_check(state)
        if skip:
            failed, names = await trio.to_thread.run_sync(self._wrong_sizes, state)
            if failed:
                log.warning(
                    "event=finalize_files_changed hash=%s files=%s",
                    h,
                    paths_kv(",".join(names[:10])),
                )
                return "files_changed", failed
        # qBittorrent never touches a name qbsync does not own: checked before the add, the
        # renames and the recheck, and nothing moves when it fails (``conflict``).
        await trio.to_thread.run_sync(self.check_qb_paths, state)
        existing = await qb.torrent(h)
        if existing is not None and not await trio.to_thread.run_sync(self.store.qb_added, h):
            raise WireError(
                ErrorCode.CONFLICT,
                "the destination qBittorrent already has this torrent and qbsync did not add "
                "it (the user's own, or added by a qbsync older than this one): qbsync does not "
                "stop, check or rename it; remove it from qBittorrent, keeping its files, to "
                "let qbsync add its own",
            )
        if existing is None:
            await trio.to_thread.run_sync(self.store.record_qb_added, state)
            if request.category:
                await self._ensure_category(request.category)
            await qb.add_torrent(
                state.metainfo.raw,
                filename=f"{h}.torrent",
                save_path=self.qb_save_path(state),
                category=request.category or None,
                tags=tags,
                stopped=True,
                skip_checking=skip,
            )
            await self._wait_listed(h)
            log.info(
                "event=qb_added hash=%s save_path=%s category=%s skip_checking=%s",
                h,
                paths_kv(self.qb_save_path(state)),
                paths_kv(request.category),
                str(skip).lower(),
            )
        else:
            await qb.stop(h)
            if self.settings.synced_tag:
                # Set again only once this recheck passes.
                await qb.remove_tags(h, [self.settings.synced_tag])
            if tags:
                await qb.add_tags(h, tags)
        await self._align_names(state)
        await self._apply_priorities(state)
        ready = await self._seeding_ready(state) if skip else None
        if ready is not None:
            qb_state, failed = ready, []
        else:
            qb_state, failed = await self._recheck(state)
        try:
            await qb.stop(h)  # it is stopped already; make sure (source seeds until hand-off)
        except QBError as exc:
            log.warning("event=qb_stop_failed hash=%s error=%s", h, paths_kv(str(exc)))
        if not failed and self.settings.synced_tag:
            try:
                await qb.add_tags(h, [self.settings.synced_tag])
            except QBError as exc:
                metrics.tag_application_errors.labels("destination").inc()
                log.warning("event=tag_failed hash=%s error=%s", h, paths_kv(str(exc)))
        return qb_state, failed

    async def _seeding_ready(self, state: TorrentState) -> str | None:
        """After a skip-checking add: wait (polling every :data:`READY_POLL` s) until
        qBittorrent lists the torrent complete with every piece present. Returns its state, or
        ``None`` when it does not get there within :data:`READY_TIMEOUT` (for example a torrent
        that was already in qBittorrent, added without skip-checking): the caller rechecks."""
        qb = self.qb
        assert qb is not None
        h = state.info_hash
        must_pass = self.must_pass(state)
        polls = 0
        last = ""
        with trio.move_on_after(READY_TIMEOUT):
            while True:
                polls += 1
                info = await qb.torrent(h)
                if info is None:
                    raise WireError(ErrorCode.QB_ERROR, "torrent disappeared after add")
                last = str(info.get("state", ""))
                if last not in CHECKING_STATES and last not in ERROR_STATES:
                    if float(info.get("progress", 0.0)) >= 1.0:
                        states = await qb.piece_states(h)
                        if all(i < len(states) and states[i] == 2 for i in must_pass):
                            log.info(
                                "event=qb_seeding_ready hash=%s state=%s polls=%d",
                                h,
                                last,
                                polls,
                            )
                            return last
                    else:
                        break  # not taken as complete (added before, without skip-checking)
                await trio.sleep(READY_POLL)
        log.info("event=qb_skip_check_not_complete hash=%s state=%s action=recheck", h, last)
        return None

    async def _ensure_category(self, category: str) -> None:
        """qBittorrent may drop an unknown category on add: create it first (best effort)."""
        qb = self.qb
        assert qb is not None
        try:
            known = await qb.call("torrents_categories", lambda c: dict(c.torrents_categories()))
            if category not in known:
                await qb.call(
                    "torrents_create_category",
                    lambda c: c.torrents_create_category(name=category),
                )
        except QBError as exc:
            log.warning(
                "event=qb_category_failed category=%s error=%s",
                paths_kv(category),
                paths_kv(str(exc)),
            )

    async def _wait_listed(self, h: str) -> None:
        qb = self.qb
        assert qb is not None
        with trio.move_on_after(LISTED_TIMEOUT):
            while await qb.torrent(h) is None:  # noqa: ASYNC110  # polling qBittorrent
                await trio.sleep(0.1)
            return
        raise WireError(ErrorCode.QB_ERROR, "torrent not listed after add")

    async def _align_names(self, state: TorrentState) -> None:
        """Rename files whose qBittorrent name differs from the name they have on disk (the
        source renamed them, or added the torrent without its root folder)."""
        qb = self.qb
        assert qb is not None
        h = state.info_hash
        files = await qb.files(h)
        wanted = {f.request_index: f for f in state.files if f.request_index >= 0 and not f.pad}
        sub = state.meta.save_sub_path
        for entry in files:
            f = wanted.get(int(entry["index"]))
            if f is None:
                continue
            rel = "/".join(f.parts[len(paths.split_relative(sub, allow_empty=True)) :])
            if entry.get("name") != rel:
                old = str(entry["name"])
                await qb.call(
                    "torrents_rename_file",
                    functools.partial(_rename_file, torrent_hash=h, old_path=old, new_path=rel),
                )
                log.info(
                    "event=qb_file_renamed hash=%s old=%s new=%s", h, paths_kv(old), paths_kv(rel)
                )

    async def _apply_priorities(self, state: TorrentState) -> None:
        """Priority 0 for deselected files, read back until qBittorrent really has it."""
        qb = self.qb
        assert qb is not None
        h = state.info_hash
        deselected = sorted(
            f.request_index
            for f in state.files
            if f.request_index >= 0 and not f.selected and not f.pad
        )
        if not deselected:
            return
        delay, deadline = PRIORITY_BACKOFF[0], trio.current_time() + PRIORITY_BUDGET
        attempts = 0
        last = ""
        while True:
            attempts += 1
            try:
                await qb.call(
                    "torrents_file_priority",
                    lambda c: c.torrents_file_priority(
                        torrent_hash=h, file_ids=deselected, priority=0
                    ),
                )
                files = await qb.files(h)
                prio = {int(e["index"]): int(e.get("priority", 1)) for e in files}
                if all(prio.get(i, 1) == 0 for i in deselected):
                    log.info(
                        "event=qb_priorities_set hash=%s deselected=%d attempts=%d",
                        h,
                        len(deselected),
                        attempts,
                    )
                    return
                last = "read back shows them unchanged"
            except QBError as exc:
                last = str(exc)
            if trio.current_time() + delay > deadline:
                raise WireError(
                    ErrorCode.QB_ERROR,
                    f"deselected priorities never persisted after {attempts} attempts: {last}",
                )
            await trio.sleep(delay)
            delay = min(PRIORITY_BACKOFF[1], delay * 2)

    async def _recheck(self, state: TorrentState) -> tuple[str, list[int]]:
        qb = self.qb
        assert qb is not None
        h = state.info_hash
        interval = self.settings.poll_interval
        budget = self.settings.poll_timeout or scaled_poll_timeout(state.geometry.total_size)
        try:
            prefs = await qb.preferences()
            refresh = float(prefs.get("refresh_interval", 1500)) / 1000.0
        except (QBError, TypeError, ValueError):
            refresh = 1.5
        settle = max(5.0, 3 * refresh) + interval
        must_pass = self.must_pass(state)
        await qb.recheck(h)
        t0 = trio.current_time()
        last_checking = t0
        last_state, last_progress, polls = "", 0.0, 0
        with trio.move_on_after(budget):
            while True:
                # Quick looks while a small torrent's recheck is likely to end any moment, then
                # the configured interval for long ones.
                quick = trio.current_time() - t0 < QUICK_POLL_WINDOW
                await trio.sleep(min(interval, QUICK_POLL) if quick else interval)
                polls += 1
                now = trio.current_time()
                info = await qb.torrent(h)
                if info is None:
                    raise WireError(ErrorCode.QB_ERROR, "torrent disappeared during recheck")
                last_state = str(info.get("state", ""))
                last_progress = float(info.get("progress", 0.0))
                if last_state in ERROR_STATES:
                    raise WireError(
                        ErrorCode.VERIFY_FAILED, f"qBittorrent reports {last_state} after recheck"
                    )
                if last_state in CHECKING_STATES:
                    last_checking = now
                    continue
                if now - t0 < 2 * refresh and last_checking == t0:
                    continue  # the snapshot may predate the recheck
                states = await qb.piece_states(h)
                failed = [i for i in must_pass if i >= len(states) or states[i] != 2]
                if not failed:
                    log.info(
                        "event=qb_verified hash=%s state=%s progress=%.4f polls=%d",
                        h,
                        last_state,
                        last_progress,
                        polls,
                    )
                    return last_state, []
                if now - last_checking >= settle:
                    log.warning(
                        "event=qb_verify_failed hash=%s state=%s progress=%.4f failed_pieces=%d",
                        h,
                        last_state,
                        last_progress,
                        len(failed),
                    )
                    return last_state, failed
        log.warning(
            "event=qb_verify_timeout hash=%s state=%s progress=%.4f polls=%d budget=%.0f",
            h,
            last_state,
            last_progress,
            polls,
            budget,
        )
        raise WireError(
            ErrorCode.VERIFY_FAILED,
            f"timeout after {budget:.0f}s waiting for qBittorrent's recheck "
            f"(state {last_state}, progress {last_progress:.4f})",
        )

    async def qb_status(self, info_hash: str) -> SyncStatus | None:
        """What the destination qBittorrent says about a torrent, for Init: VERIFYING while it
        checks, COMPLETE when it is complete on the seeding side, None otherwise (errors are
        logged and mean "don't know")."""
        if self.qb is None:
            return None
        try:
            info = await self.qb.torrent(info_hash)
        except QBError as exc:
            log.info("event=qb_status_unknown hash=%s error=%s", info_hash, paths_kv(str(exc)))
            return None
        if info is None:
            return None
        state = str(info.get("state", ""))
        if state in CHECKING_STATES:
            return SyncStatus.VERIFYING
        if float(info.get("progress", 0.0)) >= 1.0 and state in SEEDING_STATES:
            return SyncStatus.COMPLETE
        return None


def _check_dirs(root: Path, parts: paths.Parts) -> None:
    """Every directory on the way to ``root/parts`` is absent or a real directory."""
    for depth in range(1, len(parts)):
        st = _leaf(root, parts[:depth])
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise ConflictError(parts[:depth], f"is {what}: qBittorrent would follow or trip on it")


def _leaf(root: Path, parts: paths.Parts) -> os.stat_result | None:
    """``lstat`` without following any symlink; a symlink on the way is a conflict."""
    try:
        return paths.lstat(root, parts)
    except paths.UnsafePathError:
        raise ConflictError(parts, "is reached through a symlink") from None


def _rename_file(client: Any, *, torrent_hash: str, old_path: str, new_path: str) -> None:
    client.torrents_rename_file(torrent_hash=torrent_hash, old_path=old_path, new_path=new_path)
