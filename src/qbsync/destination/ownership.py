"""Name ownership: which files and directories under ``--data`` this destination created.

The rule every destructive operation follows (see docs/data-safety.md): the destination only
ever deletes, truncates, renames or writes into a file it created itself, identified by the
(device, inode) it had when it was created — never by its name alone, since a name can be
taken over by a person, qBittorrent or another tool between two looks. Renames never replace
an existing name (:func:`qbsync.paths.rename`). A file found at a wanted name that qbsync did
not create is *foreign*: it is only read (every piece it covers must verify, then it is
adopted as the torrent's copy and stays the user's file: never deleted, written or renamed by
abort, the orphan reaper or a resync); otherwise the init is refused with ``conflict``.

One :class:`Ledger` per torrent, persisted as ``<data>/.qbsync/<hash>/owned.json``. It
survives a resync (the data files it names are kept) and the ``.finalized`` marker, and goes
with the state directory when the torrent is aborted (after its files were deleted). Inodes
are recorded, not paths, so renames (``x.partial`` -> ``x`` and back) need no update.

A crash between creating a file and saving the ledger leaves a file that is not recorded:
it is then foreign, so the worst case is a ``conflict`` refusal, never a deletion.

Inode numbers are reused: a file of ours deleted by someone else, and a new file of theirs
at the same name, may get the same number. So each file qbsync creates also carries the
extended attribute ``user.qbsync.created``, and a recorded inode counts as ours only while
the file still carries it (a new file never does; ``cp`` does not copy it by default). On a
filesystem without user extended attributes the inode alone is the proof.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from pathlib import Path

import attrs

from .. import paths
from ..log import paths_kv
from ..wire.errors import ErrorCode, WireError
from . import statetree
from .durable import atomic_write

log = logging.getLogger(__name__)

OWNED_NAME = "owned.json"
XATTR = "user.qbsync.created"


def _has_mark(target: int | str) -> bool:
    try:
        if isinstance(target, str):
            os.getxattr(target, XATTR, follow_symlinks=False)
        else:
            os.getxattr(target, XATTR)
    except OSError:
        return False  # absent, or cannot be read: not proof (fail closed)
    return True


class ConflictError(Exception):
    """A wanted name holds something qbsync did not create and cannot adopt. Maps to the
    wire code ``conflict``; the message names the path."""

    def __init__(self, parts: paths.Parts, why: str) -> None:
        super().__init__(f"{'/'.join(parts)!r} {why}")
        self.parts = parts

    def logged(self, info_hash: str) -> WireError:
        """Log the conflict (``event=ownership_conflict`` names the path) and return the wire
        error the source is answered with: one place for what every refusal says."""
        log.warning(
            "event=ownership_conflict hash=%s path=%s error=%s",
            info_hash,
            paths_kv(self.parts),
            paths_kv(str(self)),
        )
        return WireError(ErrorCode.CONFLICT, str(self))


@attrs.define
class Ledger:
    """What one torrent's destination state created: files by (device, inode), directories
    by path."""

    files: set[tuple[int, int]] = attrs.field(factory=set)
    dirs: set[paths.Parts] = attrs.field(factory=set)
    # Files that carry XATTR (set when created): for these the mark is part of the proof.
    marked: set[tuple[int, int]] = attrs.field(factory=set)
    adopted: set[paths.Parts] = attrs.field(factory=set)  # foreign files accepted (logs, status)
    # Files of this torrent that were finalized and so handed to the destination qBittorrent
    # (:meth:`disown`): foreign now, but known to be the copy qbsync once verified.
    handed: set[tuple[int, int]] = attrs.field(factory=set)
    # Worker threads of several files of one torrent record and save concurrently.
    _lock: threading.Lock = attrs.field(factory=threading.Lock, eq=False, repr=False)
    _save_lock: threading.Lock = attrs.field(factory=threading.Lock, eq=False, repr=False)

    # -- questions -------------------------------------------------------------------------

    def _recorded(self, st: os.stat_result | None) -> bool:
        return st is not None and stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) in self.files

    def owns_file(self, st: os.stat_result | None, target: int | str) -> bool:
        """The file ``st`` describes (open as ``target``: a descriptor, or a path that is not
        followed if it is a symlink) is one this torrent created."""
        if st is None or not self._recorded(st):
            return False
        return (st.st_dev, st.st_ino) not in self.marked or _has_mark(target)

    def owns(self, root: Path, parts: paths.Parts) -> bool:
        """``root/parts`` is a regular file this torrent created (blocking)."""
        try:
            return self.owns_file(paths.lstat(root, parts), str(paths.join(root, parts)))
        except (OSError, paths.UnsafePathError):
            return False

    # -- changes (blocking; the caller saves) ------------------------------------------------

    def record_fd(self, fd: int, *, mark: bool = True) -> None:
        st = os.fstat(fd)
        marked = False
        if mark:
            try:
                os.setxattr(fd, XATTR, b"1")
                marked = True
            except OSError:
                pass  # no user xattrs here: the inode alone is the proof
        with self._lock:
            self.files.add((st.st_dev, st.st_ino))
            if marked:
                self.marked.add((st.st_dev, st.st_ino))

    def record_dirs(self, created: list[paths.Parts]) -> None:
        with self._lock:
            self.dirs.update(created)

    def create(self, root: Path, parts: paths.Parts, size: int) -> None:
        """Create ``root/parts`` (never an existing one: ``O_EXCL``), sized ``size`` (sparse),
        durable, and record it. ``FileExistsError`` when the name is taken."""
        created: list[paths.Parts] = []
        try:
            fd = paths.open_file(
                root,
                parts,
                os.O_RDWR | os.O_CREAT | os.O_EXCL,
                create_dirs=True,
                created=created,
            )
        finally:
            self.record_dirs(created)
        try:
            self.record_fd(fd)
            if size:
                os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        with paths.open_parent(root, parts, create=False) as dfd:
            os.fsync(dfd)

    def unlink(self, root: Path, parts: paths.Parts) -> bool:
        """Remove ``root/parts`` only if this torrent created it (proof: its device and inode
        are recorded). False when it is absent or not ours (then it is left alone)."""
        try:
            with paths.open_parent(root, parts, create=False) as dfd:
                try:
                    st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    return False
                if not self.owns_file(st, f"/proc/self/fd/{dfd}/{parts[-1]}"):
                    return False
                os.unlink(parts[-1], dir_fd=dfd)
                if st.st_nlink <= 1:
                    with self._lock:
                        self.files.discard((st.st_dev, st.st_ino))
                        self.marked.discard((st.st_dev, st.st_ino))
                return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def rename(self, root: Path, src: paths.Parts, dst: paths.Parts) -> None:
        """Rename a file this torrent created, never over an existing name.
        ``FileNotFoundError`` when ``src`` is absent."""
        st = paths.lstat(root, src)
        if st is None:
            raise FileNotFoundError(f"{'/'.join(src)!r} does not exist")
        if not self.owns_file(st, str(paths.join(root, src))):
            raise ConflictError(src, "was not created by qbsync: not renaming it")
        paths.rename(root, src, dst)

    def disown(self, ids: set[tuple[int, int]]) -> None:
        """Give up the files ``ids`` (device, inode): a finalized torrent's files belong to
        the destination qBittorrent from then on, so no later request (a resync, an Abort,
        the reaper) may ever delete, truncate, rename or write them: they are foreign."""
        with self._lock:
            self.files -= ids
            self.marked -= ids
            self.handed |= ids

    def remove_empty_dirs(self, root: Path, parts: paths.Parts, *, keep: int) -> None:
        paths.remove_empty_dirs(root, parts, keep=keep, only=self.dirs)

    # -- persistence -----------------------------------------------------------------------

    def dump(self) -> bytes:
        with self._lock:
            doc = {
                "files": sorted([d, i] for d, i in self.files),
                "marked": sorted([d, i] for d, i in self.marked),
                "dirs": sorted("/".join(p) for p in self.dirs),
                "adopted": sorted("/".join(p) for p in self.adopted),
                "handed": sorted([d, i] for d, i in self.handed),
            }
        return json.dumps(doc, indent=1).encode() + b"\n"

    def save(self, meta_dir: Path) -> None:

        with self._save_lock:  # dump under it too: a later save never writes an older dump
            atomic_write(meta_dir, OWNED_NAME, self.dump())

    @classmethod
    def load(cls, meta_dir: Path) -> Ledger:
        """The persisted ledger; an absent or unreadable one owns nothing (fail closed)."""
        try:
            raw = statetree.read(meta_dir, OWNED_NAME)
            if raw is None:
                return cls()
            doc = json.loads(raw)
            files = {(int(d), int(i)) for d, i in doc.get("files", [])}
            marked = {(int(d), int(i)) for d, i in doc.get("marked", [])}
            dirs = {tuple(p.split("/")) for p in doc.get("dirs", []) if isinstance(p, str) and p}
            adopted = {
                tuple(p.split("/")) for p in doc.get("adopted", []) if isinstance(p, str) and p
            }
            handed = {(int(d), int(i)) for d, i in doc.get("handed", [])}
        except (OSError, ValueError, TypeError, AttributeError):
            return cls()
        return cls(files, dirs, marked, adopted, handed)
