"""Reading pieces back from disk and checking their SHA-1 (blocking; run in threads).

Used by the scan of files found on disk and by the read-back finalize without qBittorrent."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import attrs

from .. import paths


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
