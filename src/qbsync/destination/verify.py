"""Reading pieces back from disk and checking their SHA-1.

:func:`verify_pieces` is the blocking reader (run in threads), used by the read-back finalize
without qBittorrent and by :func:`scan`, the verification of files found on disk at init
(which pieces to check, read in batches under the store's read limiter). What a scan's result
does to the torrent (proven pieces, settled or demoted files) is the store's lifecycle."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from .. import paths
from .state import FileStatus, TorrentState

SCAN_BATCH = 64  # pieces per worker-thread call of a scan


@attrs.frozen
class ReadSpan:
    parts: paths.Parts | None  # None: a padding file, read as zeros
    file_offset: int
    length: int


@attrs.frozen
class PieceCheck:
    index: int
    expected: bytes
    spans: tuple[ReadSpan, ...]


def verify_pieces(
    root: Path, checks: Sequence[PieceCheck], *, drop_cache: bool = False
) -> set[int]:
    """Read and SHA-1 each piece from disk; return the indices that match. Each file is
    ``fdatasync``'ed before it is read (see :func:`_open_synced`); unreadable, unsyncable or
    short data counts as a mismatch. With ``drop_cache`` the page cache of each file is dropped
    first, so the bytes come from the disk."""
    ok: set[int] = set()
    fds: dict[paths.Parts, int | None] = {}
    buf = bytearray(max((sum(s.length for s in c.spans) for c in checks), default=0))
    try:
        for check in checks:
            view = memoryview(buf)
            pos = 0
            good = True
            for span in check.spans:
                chunk = view[pos : pos + span.length]
                if span.parts is None:
                    chunk[:] = bytes(span.length)
                else:
                    if span.parts not in fds:
                        fds[span.parts] = _open_synced(root, span.parts, drop_cache)
                    fd_or_none = fds[span.parts]
                    if fd_or_none is None or not _pread_exact(fd_or_none, chunk, span.file_offset):
                        good = False
                        break
                pos += span.length
            if good and hashlib.sha1(view[:pos]).digest() == check.expected:
                ok.add(check.index)
    finally:
        for open_fd in fds.values():
            if open_fd is not None:
                os.close(open_fd)
    return ok


def _open_synced(root: Path, parts: paths.Parts, drop_cache: bool) -> int | None:
    """Open a file for a verification read, after making its bytes durable: a piece proven
    here gets its bit persisted, and the bytes may still be only in the page cache (a file left
    by an abort, a resync or a killed process). ``fdatasync`` also makes ``DONTNEED`` effective
    (dirty pages are not dropped). None when it cannot be opened or synced."""
    try:
        fd = paths.open_file(root, parts, os.O_RDONLY)
    except OSError:
        return None
    try:
        os.fdatasync(fd)
        if drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        os.close(fd)
        return None
    return fd


def _pread_exact(fd: int, into: memoryview, offset: int) -> bool:
    while into:
        try:
            n = os.preadv(fd, [into], offset)
        except OSError:
            return False
        if n <= 0:
            return False
        into = into[n:]
        offset += n
    return True


# --- the scan: files found on disk at init ----------------------------------------------------


async def scan(
    root: Path, state: TorrentState, files: set[int], limiter: trio.CapacityLimiter
) -> tuple[set[int], set[int]]:
    """Verify the unwritten pieces of ``files`` that can be read whole from disk now.
    Returns ``(checked, proven)``: the pieces read, and those whose SHA-1 matched."""
    present = await trio.to_thread.run_sync(present_files, root, state)
    checks = [
        c
        for i in scan_candidates(state, files)
        if (c := piece_check(state, i, present)) is not None
    ]
    proven: set[int] = set()
    for start in range(0, len(checks), SCAN_BATCH):
        async with limiter:
            proven |= await trio.to_thread.run_sync(
                verify_pieces, root, checks[start : start + SCAN_BATCH]
            )
    return {c.index for c in checks}, proven


def scan_candidates(state: TorrentState, files: set[int]) -> list[int]:
    """Unwritten pieces touching one of ``files`` (found on disk, to be verified)."""
    out: set[int] = set()
    for idx in files:
        out.update(i for i in state.geometry.file_pieces(idx) if not state.written[i])
    return sorted(out)


def piece_check(state: TorrentState, index: int, present: set[int]) -> PieceCheck | None:
    """How to read piece ``index`` back; None when one of its files is not on disk whole."""
    spans: list[ReadSpan] = []
    for span in state.geometry.spans(index):
        f = state.files[span.file_index]
        if f.pad:
            spans.append(ReadSpan(None, span.file_offset, span.length))
        elif f.index in present:
            spans.append(ReadSpan(f.working_parts, span.file_offset, span.length))
        else:
            return None
    return PieceCheck(index, state.metainfo.piece_hashes[index], tuple(spans))


def present_files(root: Path, state: TorrentState) -> set[int]:
    """Files whose working path holds a full-size regular file right now (blocking)."""
    out: set[int] = set()
    for f in state.files:
        if f.pad or f.size == 0 or f.created_empty:
            continue
        parts = f.working_parts if f.status is not FileStatus.SKIPPED else f.parts
        try:
            if paths.regular_size(root, parts) == f.size:
                out.add(f.index)
        except (OSError, paths.UnsafePathError):
            continue
    return out
