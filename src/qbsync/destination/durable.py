"""Durable writes on the destination: what a crash cannot half-do.

Owns the blocking helpers state files go through (call them in a thread): ``atomic_write``
(temp file, fsync, rename, fsync of the directory; done by :mod:`.statetree` through
directory descriptors, 0600, with the file's authentication tag), ``fsync_dir`` and
``mkdir_durable``. They sit below both :mod:`.state` and :mod:`.ownership`, which each persist
their own records with them, so neither has to import the other for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import statetree

TMP_PREFIX = statetree.TMP_PREFIX  # a leftover with this prefix is a write a crash interrupted


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
    """Write the state file ``directory/name`` (``directory`` is a ``<state>/<hash>``
    directory) so that a crash leaves either the old or the new content: through directory
    descriptors, 0600, with its authentication tag (see :mod:`.statetree`)."""
    statetree.write(directory, name, data)
