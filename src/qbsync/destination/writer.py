"""Writing pieces: SHA-1 check, positional writes into ``.partial`` files, bookkeeping.

The hot path is built for ~1 GB/s on loopback with every piece checked:

* the piece arrives as a ``memoryview`` of the connection's receive buffer (charged to the
  global :class:`~qbsync.wire.ByteBudget`, released when :meth:`Writer.write` returns, so
  memory stays bounded by ``--max-stream-buffer`` however many sources push);
* one worker-thread call hashes that view and ``os.pwrite``s its slices into every file the
  piece spans (``hashlib`` and ``pwrite`` both release the GIL) — no copy of the payload is
  ever made, on the event loop or elsewhere;
* at most ``--stream-workers`` such calls run at once (a :class:`trio.CapacityLimiter`);
* no ``fsync`` per piece: durability comes from the flusher (see :mod:`.store`), which syncs
  the touched files *before* persisting the bits that mention them.

Boundary pieces (touching a deselected file): the source zero-fills the bytes of deselected
files, so the SHA-1 only matches when those bytes really are zeros (or the source had them).
On a match the piece counts as proven; otherwise only the selected spans are written and the
piece is recorded as an *unverified boundary* piece — nothing else can check it here, and the
finalizer lets qBittorrent's recheck judge the selected files (it also cannot pass such a
piece without the deselected bytes, which is why the finalizer excuses exactly these pieces
and nothing else).

The write descriptors are opened (creating the sparse ``.partial``) before the hash is known,
so that hashing and writing are one worker-thread call; a refused piece leaves at most an
empty sparse file of a torrent that was validated at init.

Error handling: a failed write (``ENOSPC``, ``EACCES``, ``EIO``...) is acked ``io``; the bit
stays unset, the torrent stays consistent, and the source simply retries later — writing
resumes on its own once space returns.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio

from .. import metrics, paths
from ..log import paths_kv
from ..torrent import Span
from ..wire.errors import ErrorCode
from .files import open_for_write
from .state import DataFile, FileStatus, Phase, TorrentState

log = logging.getLogger("qbsync.destination.writer")


@attrs.frozen
class Outcome:
    code: ErrorCode
    message: str = ""


OK = Outcome(ErrorCode.OK)


def _hash_and_write(
    data: memoryview,
    expected: bytes,
    boundary: bool,
    targets: Sequence[tuple[int, int, int, int]],
) -> bool | None:
    """Worker-thread body: SHA-1 of the whole piece, then the positional writes.

    ``targets`` are ``(fd, file_offset, piece_offset, length)``. Returns True (hash matched,
    written), False (boundary piece, hash did not match, selected spans written) or None (hash
    mismatch, nothing written). ``OSError`` propagates.
    """
    matched = hashlib.sha1(data).digest() == expected
    if not matched and not boundary:
        return None
    for fd, file_offset, piece_offset, length in targets:
        view = data[piece_offset : piece_offset + length]
        pos = file_offset
        while view:
            n = os.pwrite(fd, view, pos)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[n:]
            pos += n
    return matched


def _hash_only(data: memoryview, expected: bytes) -> bool:
    return hashlib.sha1(data).digest() == expected


class Writer:
    """Turns received pieces into durable-once-flushed bytes and set bits."""

    def __init__(
        self,
        root: Path,
        *,
        workers: int,
        on_file_complete: Callable[[TorrentState, DataFile], None],
    ) -> None:
        self.root = root  # the --data directory the files live under
        self.limiter = trio.CapacityLimiter(max(1, workers))
        self._on_file_complete = on_file_complete
        self._busy = 0

    async def write(self, state: TorrentState, index: int, data: memoryview) -> Outcome:
        """Check and write piece ``index`` (already validated against the geometry)."""
        state.touch()
        if state.phase is Phase.CLOSED:
            return Outcome(ErrorCode.NOT_INITIALIZED, "torrent not initialized")
        if state.written[index]:
            return OK  # idempotent: a resend of a piece we already have
        if state.phase is Phase.FINALIZING:
            return Outcome(ErrorCode.FINALIZING, "torrent is being finalized")
        if state.phase is Phase.SCANNING:
            return Outcome(ErrorCode.BUSY, "verifying files already on disk; init again later")
        expected = state.metainfo.piece_hashes[index]
        if state.dry_run:
            return await self._dry_run(state, index, data, expected)

        spans = list(state.geometry.spans(index))
        boundary = state.is_boundary(index)
        wanted = [s for s in spans if state.files[s.file_index].status is FileStatus.STREAMING]
        pinned: list[DataFile] = []
        targets: list[tuple[int, int, int, int]] = []
        start = time.monotonic()
        try:
            for span in wanted:
                f = state.files[span.file_index]
                try:
                    fd = await acquire(self.root, state, f)
                except paths.UnsafePathError as exc:
                    return self._io_failure(state, index, f, exc, ErrorCode.UNSAFE_PATH)
                except OSError as exc:
                    return self._io_failure(state, index, f, exc)
                if fd is None:
                    # The file is being closed (complete, or the torrent is going away): a
                    # concurrent copy of this piece got there first, or the torrent is closing.
                    return self._settled(state, index)
                pinned.append(f)
                targets.append((fd, span.file_offset, span.piece_offset, span.length))
            async with self.limiter:
                self._busy += 1
                metrics.write_workers_busy.set(self._busy)
                try:
                    matched = await trio.to_thread.run_sync(
                        _hash_and_write, data, expected, boundary, targets
                    )
                except OSError as exc:
                    return self._io_failure(state, index, pinned[0] if pinned else None, exc)
                finally:
                    self._busy -= 1
                    metrics.write_workers_busy.set(self._busy)
        finally:
            for f in pinned:
                f.release()

        return self._settle(state, index, start, matched, wanted, len(data))

    def _settle(
        self,
        state: TorrentState,
        index: int,
        start: float,
        matched: bool | None,
        wanted: list[Span],
        size: int,
    ) -> Outcome:
        if matched is None:
            metrics.piece_hash_failures.inc()
            state.last_error = (
                "hash-mismatch",
                f"SHA-1 of piece {index} does not match",
                time.time(),
            )
            log.info(
                "event=piece_hash_mismatch hash=%s piece=%d code=%s",
                state.info_hash,
                index,
                ErrorCode.HASH_MISMATCH.value,
            )
            return Outcome(ErrorCode.HASH_MISMATCH, f"SHA-1 of piece {index} does not match")
        late = self._overtaken(state, index)
        if late is not None:
            return late
        self._record(state, index, matched, [state.files[s.file_index] for s in wanted])
        metrics.piece_write_duration.observe(time.monotonic() - start)
        metrics.pieces_received.inc()
        metrics.bytes_received.inc(size)
        return OK

    def _record(
        self, state: TorrentState, index: int, matched: bool, files: list[DataFile]
    ) -> None:
        """Book a written piece through the state machine (:meth:`TorrentState.mark_written`
        is the only writer of the piece record), then start the files it completed."""
        done = state.mark_written(index, files, verified=matched)
        if not matched:
            metrics.boundary_pieces_unverified.inc()
            log.info(
                "event=boundary_piece_unverified hash=%s piece=%d reason=deselected_bytes_unknown",
                state.info_hash,
                index,
            )
        for f in done:
            self._on_file_complete(state, f)

    def _overtaken(self, state: TorrentState, index: int) -> Outcome | None:
        """After an await: the answer when the torrent was aborted, another copy of the piece
        got written, or finalization began meanwhile; None when the piece is still wanted."""
        if state.phase is Phase.CLOSED:
            return Outcome(ErrorCode.NOT_INITIALIZED, "torrent was aborted")
        if state.written[index]:
            return OK
        if state.phase is Phase.FINALIZING:
            return Outcome(ErrorCode.FINALIZING, "torrent is being finalized")
        return None

    def _settled(self, state: TorrentState, index: int) -> Outcome:
        late = self._overtaken(state, index)
        return late if late is not None else Outcome(ErrorCode.BUSY, "file is being closed; retry")

    def _io_failure(
        self,
        state: TorrentState,
        index: int,
        f: DataFile | None,
        exc: OSError | paths.UnsafePathError,
        code: ErrorCode = ErrorCode.IO,
    ) -> Outcome:
        metrics.piece_write_errors.labels("destination").inc()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f.path if f is not None else "?"
        log.warning(
            "event=piece_write_failed hash=%s piece=%d file=%s code=%s error=%s",
            state.info_hash,
            index,
            paths_kv(where),
            code.value,
            paths_kv(reason),
        )
        return Outcome(code, f"writing {where}: {reason}")

    async def _dry_run(
        self, state: TorrentState, index: int, data: memoryview, expected: bytes
    ) -> Outcome:
        """Dry run: the piece is hash-checked and acked but nothing is written or recorded
        (except in memory, so a dry-run finalize can tell whether everything arrived)."""
        async with self.limiter:
            matched = await trio.to_thread.run_sync(_hash_only, data, expected)
        if not matched and not state.is_boundary(index):
            metrics.piece_hash_failures.inc()
            return Outcome(ErrorCode.HASH_MISMATCH, f"SHA-1 of piece {index} does not match")
        if state.dry_seen is not None:
            state.dry_seen[index] = True
        metrics.pieces_received.inc()
        metrics.bytes_received.inc(len(data))
        return OK


# --- write handles ------------------------------------------------------------------------------
# The lifetime of a file's write descriptor (see DataFile): opened lazily by the first writer,
# pinned by every write in flight, closed only when no write holds it. The finalizer closes a
# file before its rename, the store closes them all when it forgets a torrent.


async def acquire(root: Path, state: TorrentState, f: DataFile) -> int | None:
    """The write descriptor of ``f`` (opened on first use), pinned until
    :meth:`DataFile.release`. ``None`` when the file is being closed or finalized, or the
    torrent is finalizing or gone — a late writer must never re-create a ``.partial`` that
    finalize just renamed or abort just deleted. Raises ``OSError`` / ``UnsafePathError``."""
    if f.unavailable() or not state.is_in(Phase.ACTIVE):
        return None
    if f.fd is None:
        async with f.open_lock:
            if f.fd is None and not f.unavailable() and state.is_in(Phase.ACTIVE):
                f.fd = await trio.to_thread.run_sync(open_for_write, root, state, f)
    fd = f.fd
    if f.unavailable() or fd is None or not state.is_in(Phase.ACTIVE):
        return None
    f.users += 1
    return fd


async def close_file(state: TorrentState, f: DataFile, *, sync: bool = True) -> bool:
    """Wait for writes in flight, fdatasync and close. False when the sync failed (then
    the file's bits are cleared, see :meth:`.store.Store.flush`)."""
    f.closing = True
    try:
        async with f.open_lock:
            await f.wait_idle()
            fd, f.fd = f.fd, None
            if fd is None:
                return True
            ok = await trio.to_thread.run_sync(_sync_and_close, fd, sync)
    finally:
        f.closing = False
    state.touched.discard(f.index)
    if not ok:
        metrics.file_sync_errors.labels("destination").inc()
        log.error("event=file_sync_failed hash=%s file=%s", state.info_hash, paths_kv(f.parts))
        state.clear_pieces(state.geometry.file_pieces(f.index))
        state.recount_remaining()
    return ok


async def close_all(state: TorrentState, *, sync: bool = True) -> bool:
    ok = True
    for f in state.files:
        if f.fd is not None or f.users:
            ok = await close_file(state, f, sync=sync) and ok
    return ok


def _sync_and_close(fd: int, sync: bool) -> bool:
    try:
        if sync:
            os.fdatasync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
