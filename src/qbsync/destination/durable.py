"""Durable writes on the destination: what a crash cannot half-do.

Owns the three blocking helpers every state file goes through (call them in a thread):
``atomic_write`` (temp file, fsync, rename, fsync of the directory), ``fsync_dir`` and
``mkdir_durable``. They sit below both :mod:`.state` and :mod:`.ownership`, which each persist
their own records with them, so neither has to import the other for it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

TMP_PREFIX = ".tmp-"  # a leftover with this prefix is a write a crash interrupted


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mkdir_durable(path: Path) -> None:
    """``mkdir -p`` whose every new directory is ``fsync``'ed into its parent: an entry in a
    directory that a crash forgets is lost with everything below it."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o755)
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def atomic_write(directory: Path, name: str, data: bytes) -> None:
    """Write ``directory/name`` so that a crash leaves either the old or the new content."""
    tmp = directory / f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
