"""Crash-safe writes of small private files, relative to an open directory descriptor.

One implementation for every state file qbsync writes (the destination's state tree, the
pinned peer keys, the activity log): a reader sees the old content or the new, never a part.
Each write goes to a fresh temporary name (``O_EXCL | O_NOFOLLOW``: never an existing file or
a planted symlink), mode 0600, is written in full and ``fsync``-ed, then renamed or linked
over ``name``, and the directory is ``fsync``-ed so the new name survives a power loss. The
only file removed is that temporary name, which this call created itself.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

TMP_PREFIX = ".tmp-"
FILE_MODE = 0o600


def _write_temp(dir_fd: int, name: str, data: bytes, mode: int) -> str:
    """``data`` under a new temporary name next to ``name``, complete and ``fsync``-ed; its
    name. Nothing is left behind when this fails."""
    tmp = f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)  # our own temporary file, created above with O_EXCL
        raise
    return tmp


def replace(dir_fd: int, name: str, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Write ``name`` in ``dir_fd`` with ``data``, replacing what is there (the rename
    replaces the directory entry -- a planted symlink included -- never what it points to)."""
    tmp = _write_temp(dir_fd, name, data, mode)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)  # our own temporary file
        raise
    os.fsync(dir_fd)


def create(dir_fd: int, name: str, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Create ``name`` in ``dir_fd`` with ``data``, complete or not at all (linked, so it is
    never replaced: ``FileExistsError`` when it exists)."""
    tmp = _write_temp(dir_fd, name, data, mode)
    try:
        os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)  # our own temporary file; ``name`` links the data
    os.fsync(dir_fd)


def replace_in(directory: Path, name: str, data: bytes, *, mode: int = FILE_MODE) -> None:
    """:func:`replace` for a directory given by path."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        replace(dir_fd, name, data, mode=mode)
    finally:
        os.close(dir_fd)
