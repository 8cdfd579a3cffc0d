"""Path safety: every file name that arrives from the network must land under ``--data``.

Torrent file names are attacker-controlled: a source (or anything that got hold of the token)
can send ``../../etc/cron.d/x``, ``/root/.ssh/authorized_keys``, ``C:\\x`` or a name with a NUL
byte. The same class of bug hit libtorrent (CVE-2009-1760), Transmission (CVE-2010-0012) and
several clients since; the Go reference joins names unchecked. This module is the one place
that decides whether a name may be written, in two layers:

1. **Lexical validation** (pure, no I/O): :func:`split_relative` turns a ``/``-separated
   relative path into components and refuses anything that is not a plain relative path:
   empty, ``.`` or ``..`` components, absolute paths, backslashes, Windows drive letters, NUL
   bytes, components over 255 bytes, paths over 4096 bytes, names that do not encode as
   UTF-8. Components are checked, never substrings, so ``foo... bar`` and ``.hidden`` are fine.
   :func:`check_layout` then refuses collisions inside one torrent (duplicates, a file that is
   also another file's directory, ``x`` next to ``x.partial`` or ``x.partial/...``) and names
   that would reach into the daemon's own ``.qbsync`` state directory.

2. **Filesystem containment** (I/O, used by the destination when it touches a file):
   :func:`open_parent` walks the directories below the root one component at a time with
   ``O_NOFOLLOW | O_DIRECTORY`` relative to the previous directory's descriptor, creating them
   on request. A symlink anywhere below the root therefore stops the walk (``ELOOP`` /
   ``ENOTDIR``) instead of being followed, even if it is planted between a check and a use;
   files are then opened relative to the returned directory descriptor with ``O_NOFOLLOW``.
   Symlinks *inside* the data tree are refused even when they point back inside it: nothing
   the daemon writes needs them, and refusing them makes the rule trivially auditable.
   The root itself (``--data``) may be a symlink; it is the operator's choice.

:func:`precheck_no_symlinks` is a read-only pre-pass so that a torrent with one bad entry is
refused before *any* directory is created for its other entries.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import stat
from collections.abc import Container, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

MAX_COMPONENT_BYTES = 255  # NAME_MAX on every common Linux filesystem
MAX_PATH_BYTES = 4096  # PATH_MAX
STATE_DIR_NAME = ".qbsync"  # the destination's own state lives in <data>/.qbsync/
PARTIAL_SUFFIX = ".partial"

_DRIVE_RE = re.compile(r"^[A-Za-z]:")

Parts = tuple[str, ...]


class UnsafePathError(ValueError):
    """A path from the network would escape the data directory, or is not a plain name.

    The destination maps it to the stable wire code ``unsafe-path``.
    """


# --- lexical layer (pure) -------------------------------------------------------------------


def validate_component(name: str) -> None:
    """Raise :class:`UnsafePathError` unless ``name`` is one plain, non-special file name."""
    if name in ("", ".", ".."):
        raise UnsafePathError(f"path component {name!r} is not allowed")
    if "/" in name or "\\" in name:
        raise UnsafePathError(f"path component {name!r} contains a separator")
    if "\x00" in name:
        raise UnsafePathError("path component contains a NUL byte")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError("path component is not valid UTF-8") from None
    if len(encoded) > MAX_COMPONENT_BYTES:
        raise UnsafePathError(
            f"path component is {len(encoded)} bytes (limit {MAX_COMPONENT_BYTES})"
        )


def split_relative(path: str, *, allow_empty: bool = False) -> Parts:
    """Split a ``/``-separated relative path into validated components.

    ``allow_empty`` admits ``""`` (meaning "no sub-directory") and returns ``()``. A trailing
    or doubled slash is an empty component and is refused: the sender never produces one, so
    seeing one means the input was not made by qbsync.
    """
    if path == "":
        if allow_empty:
            return ()
        raise UnsafePathError("empty path")
    if "\x00" in path:
        raise UnsafePathError("path contains a NUL byte")
    if "\\" in path:
        raise UnsafePathError(f"path {path!r} contains a backslash")
    if path.startswith("/"):
        raise UnsafePathError(f"path {path!r} is absolute")
    if _DRIVE_RE.match(path):
        raise UnsafePathError(f"path {path!r} starts with a drive letter")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise UnsafePathError("path is not valid UTF-8") from None
    if size > MAX_PATH_BYTES:
        raise UnsafePathError(f"path is {size} bytes (limit {MAX_PATH_BYTES})")
    parts = tuple(path.split("/"))
    for part in parts:
        validate_component(part)
    return parts


def check_layout(sub: Parts, files: Sequence[Parts]) -> None:
    """Refuse a file table whose entries would collide or reach into the state directory.

    ``sub`` is the validated sub-directory, ``files`` the validated relative paths (torrent
    order). Every entry is checked as the full ``sub + rel`` path below the data root.
    """
    full = [sub + rel for rel in files]
    for parts in full:
        if not parts:
            raise UnsafePathError("empty file path")
        if parts[0] == STATE_DIR_NAME:
            raise UnsafePathError(f"path {'/'.join(parts)!r} is inside the state directory")
        if len("/".join(parts).encode("utf-8")) + len(PARTIAL_SUFFIX) > MAX_PATH_BYTES:
            raise UnsafePathError("path too long")
        if len(parts[-1].encode("utf-8")) + len(PARTIAL_SUFFIX) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(f"file name {parts[-1]!r} too long for its .partial name")
    seen: set[Parts] = set()
    for parts in full:
        if parts in seen:
            raise UnsafePathError(f"duplicate file path {'/'.join(parts)!r}")
        seen.add(parts)
    dirs: set[Parts] = {parts[:i] for parts in full for i in range(1, len(parts))}
    for parts in full:
        if parts in dirs:
            raise UnsafePathError(f"file {'/'.join(parts)!r} is also a directory of another file")
        partial = partial_parts(parts)
        if partial in seen or partial in dirs:
            raise UnsafePathError(
                f"file {'/'.join(partial)!r} collides with the .partial name of another file"
            )


def join(root: Path, parts: Parts) -> Path:
    """``root/parts...`` for already validated parts (lexical only)."""
    return root.joinpath(*parts) if parts else root


def partial_parts(parts: Parts) -> Parts:
    """The ``.partial`` twin of a file path."""
    return (*parts[:-1], parts[-1] + PARTIAL_SUFFIX)


def is_within(root: str, candidate: str) -> bool:
    """True when the absolute path ``candidate`` is ``root`` or below it (no I/O)."""
    root = os.path.normpath(root)
    candidate = os.path.normpath(candidate)
    return candidate == root or candidate.startswith(root.rstrip(os.sep) + os.sep)


# --- filesystem layer -----------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_child_dir(parent_fd: int, name: str, *, create: bool) -> tuple[int, bool]:
    """Open (creating on request) a child directory; also whether this call created it.
    A directory made here is made durable at once (``fsync`` of its parent): a file whose
    bytes were synced is only reachable after a crash if every directory above it is."""
    made = False
    if create:
        try:
            os.mkdir(name, 0o755, dir_fd=parent_fd)
            made = True
        except FileExistsError:
            pass
        if made:
            os.fsync(parent_fd)
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd), made
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            # O_NOFOLLOW|O_DIRECTORY on a symlink gives ELOOP (or ENOTDIR for a symlink to a
            # file on some kernels); a plain file in the way gives ENOTDIR.
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except OSError:
                raise exc from None
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePathError(f"symlink in path at {name!r}") from None
        raise


@contextlib.contextmanager
def open_parent(
    root: Path, parts: Parts, *, create: bool, created: list[Parts] | None = None
) -> Iterator[int]:
    """Yield a descriptor of the directory that holds ``root/parts``, never following a symlink
    below ``root``. With ``create`` missing directories are made (0755), each ``fsync``'ed
    into its parent, and listed in ``created`` (so the caller can record that it owns them).
    Raises :class:`UnsafePathError` for a symlink, ``FileNotFoundError`` when a directory is
    missing and ``create`` is false, or another ``OSError``.
    """
    if not parts:
        raise UnsafePathError("empty file path")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, name in enumerate(parts[:-1], start=1):
            child, made = _open_child_dir(fd, name, create=create)
            if made and created is not None:
                created.append(parts[:depth])
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def open_file(
    root: Path,
    parts: Parts,
    flags: int,
    mode: int = 0o644,
    *,
    create_dirs: bool = False,
    created: list[Parts] | None = None,
) -> int:
    """Open ``root/parts`` relative to its safely opened parent, with ``O_NOFOLLOW``."""
    with open_parent(root, parts, create=create_dirs, created=created) as dfd:
        try:
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"symlink at {'/'.join(parts)!r}") from None
            raise


def lstat(root: Path, parts: Parts) -> os.stat_result | None:
    """``lstat`` of ``root/parts`` through the safe walk; ``None`` when it does not exist.

    A symlink as the last component is reported as what it is (callers refuse it)."""
    try:
        with open_parent(root, parts, create=False) as dfd:
            return os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def regular_size(root: Path, parts: Parts) -> int | None:
    """Size of the regular file ``root/parts``; ``None`` when absent or not a regular file."""
    st = lstat(root, parts)
    if st is None or not stat.S_ISREG(st.st_mode):
        return None
    return st.st_size


def rename(root: Path, src: Parts, dst: Parts) -> None:
    """Rename within the data tree, **never replacing** an existing ``dst`` (``FileExistsError``
    instead). Both must share a parent (``x.partial`` -> ``x``). A rename that silently
    replaced a name would destroy whatever file someone else had put there."""
    if src[:-1] != dst[:-1]:
        raise ValueError("rename across directories is not supported here")
    with open_parent(root, src, create=False) as dfd:
        rename_noreplace(dfd, src[-1], dst[-1])
        os.fsync(dfd)


_RENAME_NOREPLACE = 1  # linux/fs.h
_renameat2: Any = None


def rename_noreplace(dir_fd: int, src: str, dst: str) -> None:
    """``renameat2(RENAME_NOREPLACE)`` inside one directory; where the kernel or filesystem
    lacks it, ``link`` then ``unlink`` (``link`` fails with ``EEXIST`` too, and a crash in
    between leaves two names of one inode, never a lost file)."""
    global _renameat2
    if _renameat2 is None:
        libc = ctypes.CDLL(None, use_errno=True)
        _renameat2 = getattr(libc, "renameat2", False)
        if _renameat2:
            _renameat2.argtypes = [
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_uint,
            ]
            _renameat2.restype = ctypes.c_int
    if _renameat2:
        rc = _renameat2(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), src)
    os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    os.unlink(src, dir_fd=dir_fd)


def unlink(root: Path, parts: Parts) -> bool:
    """Remove a file (not a directory); False when it did not exist."""
    try:
        with open_parent(root, parts, create=False) as dfd:
            os.unlink(parts[-1], dir_fd=dfd)
            return True
    except (FileNotFoundError, NotADirectoryError):
        return False


def remove_empty_dirs(
    root: Path, parts: Parts, *, keep: int = 0, only: Container[Parts] | None = None
) -> None:
    """Remove the now-empty parent directories of ``parts``, deepest first, stopping at the
    first one that is not empty (or, with ``only``, not listed there: the destination removes
    only directories it created). The first ``keep`` components are never removed."""
    for depth in range(len(parts) - 1, keep, -1):
        if only is not None and parts[:depth] not in only:
            return
        try:
            with open_parent(root, parts[:depth], create=False) as dfd:
                os.rmdir(parts[depth - 1], dir_fd=dfd)
        except OSError:
            return


def precheck_no_symlinks(root: Path, files: Iterable[Parts]) -> None:
    """Read-only walk: refuse (``UnsafePathError``) when any existing component below ``root``
    on the way to one of ``files`` is a symlink or a non-directory where a directory is needed.
    Missing components are fine (they will be created)."""
    checked: set[Parts] = set()
    for parts in files:
        for depth in range(1, len(parts) + 1):
            prefix = parts[:depth]
            if prefix in checked:
                continue
            checked.add(prefix)
            try:
                st = os.lstat(join(root, prefix))
            except FileNotFoundError:
                break
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePathError(f"symlink in path at {'/'.join(prefix)!r}")
            if depth < len(parts) and not stat.S_ISDIR(st.st_mode):
                raise UnsafePathError(f"{'/'.join(prefix)!r} is not a directory")
