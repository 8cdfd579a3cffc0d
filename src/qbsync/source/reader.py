"""Reading pieces from disk, across file boundaries, in worker threads.

* One piece is read into one preallocated buffer with ``os.preadv`` (no intermediate copies);
  the buffer goes to the wire as a ``memoryview`` and back to the pool after the ack.
* File handles are cached per (torrent, path), shared by concurrent reads (positional reads
  need no seek), bounded by an LRU (``max_handles``), and closed when the torrent stops being
  tracked: no leaked handles keeping deleted files' space allocated
  (docs/design-decisions.md#handles-closed-on-untrack).
* qBittorrent's "append .!qB to incomplete files" option: a file is opened under its final
  name or, failing that, with the ``.!qB`` suffix. An open handle survives the rename qB does
  when the file completes (same inode).
* Spans of deselected files and BEP 47 padding files are zero-filled: qBittorrent never
  writes deselected files (their share of boundary pieces goes to its part file), and the
  destination writes only the selected spans of such pieces.
* A missing file (moved from the temp path, category change) raises :class:`FileMissing`; the
  caller refreshes the torrent's location from qBittorrent's ``content_path`` and retries.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import attrs
import trio

from .. import metrics
from ..torrent import Span
from .meta import INCOMPLETE_EXT, SourceMeta

log = logging.getLogger("qbsync.source.reader")

READ_AHEAD = 32 * 1024 * 1024  # bytes past each read the kernel is asked to fetch ahead
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)  # Linux >= 4.14


class ReadError(Exception):
    """A piece could not be read now; retrying later may work."""


class FileMissing(ReadError):
    """A file of the piece is not where the torrent's location says."""


@attrs.define(eq=False)
class _Handle:
    fd: int
    info_hash: str
    refs: int = 0
    doomed: bool = False  # evicted while in use: close on last release


class HandleCache:
    """Bounded LRU of open file descriptors, safe to use from many threads."""

    def __init__(self, max_handles: int = 128) -> None:
        self.max_handles = max(1, max_handles)
        self._lock = threading.Lock()
        self._handles: OrderedDict[tuple[str, str], _Handle] = OrderedDict()

    def __len__(self) -> int:
        return len(self._handles)

    def acquire(self, info_hash: str, path: Path) -> _Handle:
        key = (info_hash, str(path))
        with self._lock:
            h = self._handles.get(key)
            if h is not None:
                self._handles.move_to_end(key)
                h.refs += 1
                metrics.file_handle_cache.labels("hit").inc()
                return h
        metrics.file_handle_cache.labels("miss").inc()
        fd = _open_either(path)
        with self._lock:
            existing = self._handles.get(key)
            if existing is not None:  # another thread opened it meanwhile: keep one
                os.close(fd)
                existing.refs += 1
                return existing
            h = _Handle(fd, info_hash, refs=1)
            self._handles[key] = h
            self._evict_locked()
            return h

    def acquire_cached(self, info_hash: str, path: Path) -> _Handle | None:
        """:meth:`acquire` only if the handle is already open (never opens: no blocking
        syscall), else None."""
        with self._lock:
            h = self._handles.get((info_hash, str(path)))
            if h is not None:
                self._handles.move_to_end((info_hash, str(path)))
                h.refs += 1
            return h

    def unref(self, h: _Handle) -> None:
        with self._lock:
            h.refs -= 1
            if h.doomed and h.refs == 0:
                os.close(h.fd)

    def discard(self, info_hash: str, path: Path) -> None:
        """Drop one handle (after an I/O error) so the next read reopens the file."""
        with self._lock:
            h = self._handles.pop((info_hash, str(path)), None)
            if h is not None:
                self._doom_locked(h)

    def forget(self, info_hash: str) -> int:
        """Close every handle of a torrent. Returns how many were dropped."""
        with self._lock:
            keys = [k for k in self._handles if k[0] == info_hash]
            for k in keys:
                self._doom_locked(self._handles.pop(k))
            return len(keys)

    def close_all(self) -> None:
        with self._lock:
            for h in self._handles.values():
                self._doom_locked(h)
            self._handles.clear()

    def _evict_locked(self) -> None:
        while len(self._handles) > self.max_handles:
            _, h = self._handles.popitem(last=False)
            self._doom_locked(h)
            metrics.file_handle_evictions.inc()

    @staticmethod
    def _doom_locked(h: _Handle) -> None:
        h.doomed = True
        if h.refs == 0:
            os.close(h.fd)


def _open_either(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            fd = os.open(path.with_name(path.name + INCOMPLETE_EXT), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileMissing(f"{path} (nor {INCOMPLETE_EXT}) not found") from None
        except OSError as exc:
            raise ReadError(f"open {path}: {exc.strerror}") from None
    # Pieces are mostly read in order: let the kernel read ahead in larger chunks.
    _fadvise(fd, 0, 0, "POSIX_FADV_SEQUENTIAL")
    return fd


def _fadvise(fd: int, offset: int, length: int, advice: str) -> None:
    """``posix_fadvise`` where the platform has it; advice only, so failures are ignored."""
    value = getattr(os, advice, None)
    if value is None:
        return
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, value)


class BufferPool:
    """Reusable piece buffers, so steady streaming allocates nothing per piece."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._free: dict[int, list[bytearray]] = {}

    def get(self, capacity: int) -> bytearray:
        free = self._free.get(capacity)
        return free.pop() if free else bytearray(capacity)

    def put(self, buf: bytearray) -> None:
        free = self._free.setdefault(len(buf), [])
        if len(free) < self.keep:
            free.append(buf)


class PieceReader:
    """Reads whole pieces (``read``) for the senders; blocking work runs in threads."""

    def __init__(self, *, max_handles: int = 128, threads: int = 8) -> None:
        self.handles = HandleCache(max_handles)
        self.buffers = BufferPool()
        self._limiter = trio.CapacityLimiter(threads)

    async def read(self, meta: SourceMeta, index: int) -> tuple[bytearray, memoryview]:
        """Return (buffer, view of exactly the piece). Give the buffer back with ``release``.

        Raises :class:`FileMissing` or :class:`ReadError`; the buffer is returned to the
        pool on failure.
        """
        size = meta.geometry.piece_size(index)
        buf = self.buffers.get(meta.geometry.piece_length)
        view = memoryview(buf)[:size]
        start = time.monotonic()
        if self._read_cached(meta, index, view):
            metrics.piece_read_duration.observe(time.monotonic() - start)
            await trio.lowlevel.checkpoint()
            return buf, view
        try:
            await trio.to_thread.run_sync(self._read_sync, meta, index, view, limiter=self._limiter)
        except BaseException:
            self.recycle(buf, view)
            raise
        metrics.piece_read_duration.observe(time.monotonic() - start)
        return buf, view

    def recycle(self, buf: bytearray, view: memoryview) -> None:
        try:
            view.release()
        except BufferError:  # something still holds a view: let it go rather than reuse
            return
        self.buffers.put(buf)

    def forget(self, info_hash: str) -> None:
        self.handles.forget(info_hash)

    def close(self) -> None:
        self.handles.close_all()

    def _read_cached(self, meta: SourceMeta, index: int, view: memoryview) -> bool:
        """Read the piece right here, on the Trio thread, if every byte is in the page cache
        (``preadv`` with ``RWF_NOWAIT`` never waits for the disk) and every file is already
        open; False (the caller reads in a worker thread) otherwise, and whenever the read
        crosses a :data:`READ_AHEAD` boundary, so the worker path keeps asking the kernel to
        read ahead. A piece from the page cache is a memory copy of a millisecond or so; the
        hand-off to a worker thread and back costs about as much CPU again (GIL hand-over,
        two wake-ups), which is what this saves on a warm source."""
        if _RWF_NOWAIT is None:
            return False
        local_dir = meta.local_dir
        for span, name, dst in _spans_to_read(meta, index, view):
            end = span.file_offset + span.length
            if end % READ_AHEAD < span.length:
                return False
            h = self.handles.acquire_cached(meta.info_hash, local_dir / name)
            if h is None:
                return False
            try:
                done = 0
                while done < span.length:
                    try:
                        n = os.preadv(h.fd, [dst[done:]], span.file_offset + done, _RWF_NOWAIT)
                    except OSError:  # EAGAIN (not cached) or a real error: the worker path
                        return False  # retries and reports it properly
                    if n <= 0:
                        return False
                    done += n
            finally:
                self.handles.unref(h)
        return True

    # -- in a worker thread -----------------------------------------------------------------

    def _read_sync(self, meta: SourceMeta, index: int, view: memoryview) -> None:
        local_dir = meta.local_dir
        for span, name, dst in _spans_to_read(meta, index, view):
            path = local_dir / name
            try:
                self._read_span(meta.info_hash, path, dst, span.file_offset)
            except FileMissing:
                raise
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise FileMissing(str(path)) from None
                # A stale handle (file replaced, NFS): reopen once and retry.
                self.handles.discard(meta.info_hash, path)
                try:
                    self._read_span(meta.info_hash, path, dst, span.file_offset)
                except OSError as exc2:
                    raise ReadError(f"read {path}: {exc2.strerror or exc2}") from None

    def _read_span(self, info_hash: str, path: Path, dst: memoryview, offset: int) -> None:
        h = self.handles.acquire(info_hash, path)
        try:
            done = 0
            while done < len(dst):
                n = os.preadv(h.fd, [dst[done:]], offset + done)
                if n <= 0:
                    raise ReadError(
                        f"short read of {path}: {done} of {len(dst)} bytes at offset {offset}"
                    )
                done += n
            # Read ahead of the poll: the next pieces of this file are the ones the queue
            # hands out next, so ask the kernel to start reading them now (asynchronously,
            # in large sequential requests). From a cold page cache this overlaps the disk
            # with sending instead of paying one seek-and-wait per piece. Once per
            # READ_AHEAD window crossed, so a warm cache pays one cheap call per 32 MiB.
            end = offset + done
            if end % READ_AHEAD < done:
                _fadvise(h.fd, end, READ_AHEAD, "POSIX_FADV_WILLNEED")
        except ReadError:
            self.handles.discard(info_hash, path)
            raise
        finally:
            self.handles.unref(h)


def _spans_to_read(
    meta: SourceMeta, index: int, view: memoryview
) -> Iterator[tuple[Span, str, memoryview]]:
    """Piece ``index``'s spans that come from a file: each with the file's name and the part
    of ``view`` it fills. A span of a padding file or of a file not selected is zero-filled
    here instead (both read paths, cached and worker, send the same bytes for it)."""
    for span in meta.geometry.spans(index):
        slot = meta.slots[span.file_index]
        dst = view[span.piece_offset : span.piece_offset + span.length]
        if slot.name is None or not slot.selected:
            dst[:] = bytes(span.length)
            continue
        yield span, slot.name, dst
