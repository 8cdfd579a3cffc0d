"""The destination's state tree (``--state-dir``, default ``<data>/.qbsync``), opened so that
nobody else can plant or redirect it.

Issue 15, finding 3: ``<data>`` is often group-writable (a shared qBittorrent group, the
compose examples), so another local account could put a symlink at ``.qbsync/<hash>`` (state
writes and ``clear_state_dir`` then went through it, out of ``--data``) or a made-up
``owned.json`` (qbsync then treated a user's file as its own). The rules here:

* **Directory descriptors, ``O_NOFOLLOW`` at every level.** The state root and every
  ``<hash>`` directory are opened with ``O_DIRECTORY | O_NOFOLLOW`` (a symlink fails with
  ``ELOOP``), each checked after opening (:func:`_trusted`); files are opened relative to
  their directory's descriptor with ``O_NOFOLLOW``; trees are removed with the fd-based
  ``shutil.rmtree(dir_fd=...)``, which never follows a link.
* **Ownership and modes.** Directories are created 0700 and files 0600 (the ``.torrent`` copy
  holds a private tracker's passkey). A directory must be owned by the daemon's user and not
  writable by others. *Group rule:* it may be group-writable only when its group is one the
  daemon itself runs in (its primary or a supplementary group). That keeps Kubernetes
  ``fsGroup`` volumes working (the kubelet makes the volume ``g+rwxs`` for the pod's own
  group, which it also gives the daemon) and is safe because nothing a group member writes is
  believed: every state file must be a regular file owned by the daemon's user *and* carry an
  authentication tag (below), so a member can at worst delete state (qbsync then knows less
  and refuses more; it never deletes more). (Where the kubelet made the key file group-
  readable, the pod's group could forge tags: that group is the pod's own processes.) A group
  the daemon is not in is refused: then strangers could write there. Use ``--state-dir``
  outside ``--data`` whenever accounts other than the daemon's can write ``--data``.
* **Authentication tags.** Every state file ends with a trailer
  ``\\n#qbsync-tag:v1:<64 hex>\\n``: HMAC-SHA256, keyed by the 32-byte key ``.state-key`` in
  the state root (0600, created on first start), over ``<hash dir>/<file name>\\0<content>``
  (so a file moved to another torrent's directory does not verify either). A file that is not
  regular, not owned by the daemon's user, or whose tag is missing or wrong is ignored as if
  absent and logged once (``event=state_file_ignored``): "unreadable means start over, never
  trust" (docs/state-format.md).
* **Upgrade.** State written by an earlier version carries no tags. On the first start with a
  state root that has no key, every ``<hash>`` directory and file owned by the daemon's user
  (the daemon's own state; anything else is left and then ignored) is re-written with its
  tag and 0700/0600 modes, once (``event=state_adopted``), before anything reads it. The key
  is written to ``.state-key.adopting`` first and renamed to ``.state-key`` when adoption is
  complete, so a crash in the middle resumes it instead of losing a finalized torrent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Container, Iterator
from pathlib import Path

from .. import atomicfile

log = logging.getLogger("qbsync.destination.statetree")

KEY_NAME = ".state-key"
ADOPTING_NAME = ".state-key.adopting"
KEY_BYTES = 32
TAG_PREFIX = b"\n#qbsync-tag:v1:"
_TAG_LEN = len(TAG_PREFIX) + 64 + 1  # prefix, hex digest, newline
DIR_MODE = 0o700
FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
TMP_PREFIX = atomicfile.TMP_PREFIX

# (root device, root inode, key inode, key mtime) -> key
_keys: dict[tuple[int, int, int, int], bytes] = {}
_keys_lock = threading.Lock()
_logged: set[tuple[str, str, int]] = set()


class StateTreeError(OSError):
    """The state tree is not safe to use (a symlink, another owner, writable by others)."""


# --- checks --------------------------------------------------------------------------------


def _groups() -> set[int]:
    return {os.getegid(), *os.getgroups()}


def problem(st: os.stat_result) -> str | None:
    """Why a directory with this ``lstat`` must not hold the daemon's state, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by the daemon's uid {os.geteuid()}"
    if st.st_mode & stat.S_IWOTH:
        return "is writable by others (o+w)"
    if st.st_mode & stat.S_IWGRP and st.st_gid not in _groups():
        return (
            f"is writable by group {st.st_gid}, which the daemon does not run in "
            "(see docs/data-safety.md: the group rule)"
        )
    return None


def _trusted(fd: int, where: Path | str) -> int:
    why = problem(os.fstat(fd))
    if why is not None:
        os.close(fd)
        raise StateTreeError(errno.EPERM, f"state directory {str(where)!r} {why}")
    return fd


def _open_dir(name: str | Path, where: Path | str, *, dir_fd: int | None = None) -> int:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StateTreeError(
                exc.errno, f"state directory {str(where)!r} is a symlink or not a directory"
            ) from None
        raise
    return _trusted(fd, where)


@contextlib.contextmanager
def open_root(root: Path) -> Iterator[int]:
    """A checked descriptor of the state root (the root itself is never a symlink)."""
    fd = _open_dir(root, root)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_dir(mdir: Path, *, create: bool = False) -> Iterator[int]:
    """A checked descriptor of ``<root>/<hash>`` (``mdir``), opened relative to the root's,
    created 0700 on request (the root too, for stores built without :func:`prepare_root`)."""
    root = mdir.parent
    if create and not os.path.lexists(root):
        _mkdir_chain(root)
    with open_root(root) as rfd:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(mdir.name, DIR_MODE, dir_fd=rfd)
                os.fsync(rfd)
        fd = _open_dir(mdir.name, mdir, dir_fd=rfd)
        try:
            yield fd
        finally:
            os.close(fd)


def _mkdir_chain(path: Path) -> None:
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE if d == path else 0o755)
        except FileExistsError:
            continue
        fd = os.open(d.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- the key --------------------------------------------------------------------------------


def _read_key(rfd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=rfd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        # Group bits only for a group the daemon runs in (the kubelet adds g+rw to every file
        # of an fsGroup volume): the same group rule as for the directories.
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.geteuid()
            or st.st_mode & stat.S_IRWXO
            or (st.st_mode & stat.S_IRWXG and st.st_gid not in _groups())
        ):
            raise StateTreeError(
                errno.EPERM,
                f"{name} is not a regular file of the daemon's user that others cannot read",
            )
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise StateTreeError(errno.EINVAL, f"{name} is not a {KEY_BYTES}-byte key")
    return key


def _read_all(fd: int) -> bytes:
    """The rest of an open file, however large (a state file is read whole)."""
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _key(rfd: int, *, create: bool = True) -> bytes | None:
    """The root's key (created on first write when the root has none: a store built without
    :func:`prepare_root`, as unit tests do; adoption only ever happens there). A read never
    creates it (``create`` False: None), so a dry run leaves an older version's state to be
    adopted by the first real start. Cached by the identity of the root and of the key file,
    so a re-created root or key is never served an old key."""
    for name in (KEY_NAME, ADOPTING_NAME):
        try:
            kst = os.stat(name, dir_fd=rfd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        rst = os.fstat(rfd)
        ident = (rst.st_dev, rst.st_ino, kst.st_ino, kst.st_mtime_ns)
        key = _keys.get(ident)
        if key is None:
            key = _read_key(rfd, name)
            if key is None:
                continue  # removed meanwhile
            _keys[ident] = key
        return key
    if not create:
        return None
    with _keys_lock, contextlib.suppress(FileExistsError):  # else another thread made it
        atomicfile.create(rfd, KEY_NAME, secrets.token_bytes(KEY_BYTES), mode=FILE_MODE)
    return _key(rfd, create=False)


def _tag(key: bytes, dirname: str, name: str, body: bytes) -> bytes:
    mac = hmac.new(key, f"{dirname}/{name}".encode() + b"\0", hashlib.sha256)
    mac.update(body)
    return TAG_PREFIX + mac.hexdigest().encode() + b"\n"


# --- files ----------------------------------------------------------------------------------


def write(mdir: Path, name: str, data: bytes) -> None:
    """Atomically (temp file 0600, ``fsync``, rename, ``fsync`` of the directory) write
    ``mdir/name`` with its authentication tag; the directory is created 0700 if missing."""
    with open_dir(mdir, create=True) as dfd:
        key = _key_of(mdir)
        assert key is not None
        atomicfile.replace(dfd, name, data + _tag(key, mdir.name, name, data), mode=FILE_MODE)


def _key_of(mdir: Path, *, create: bool = True) -> bytes | None:
    with open_root(mdir.parent) as rfd:
        return _key(rfd, create=create)


def _ignored(mdir: Path, name: str, ino: int, reason: str) -> None:
    mark = (str(mdir), name, ino)
    if mark in _logged:
        return
    _logged.add(mark)
    log.warning("event=state_file_ignored dir=%s file=%s reason=%s", mdir.name, name or "-", reason)


def read(mdir: Path, name: str) -> bytes | None:
    """The content of ``mdir/name`` without its tag; None when it is absent or cannot be
    trusted (not a regular file, another owner, no or a wrong tag: logged once)."""
    try:
        with open_dir(mdir) as dfd:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    _ignored(mdir, name, 0, "symlink")
                    return None
                raise
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    _ignored(mdir, name, st.st_ino, "not_a_regular_file")
                    return None
                if st.st_uid != os.geteuid():
                    _ignored(mdir, name, st.st_ino, "not_owned_by_daemon")
                    return None
                raw = _read_all(fd)
            finally:
                os.close(fd)
            key = _key_of(mdir, create=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except StateTreeError as exc:
        _ignored(mdir, "", 0, f"unsafe_directory:{exc.errno}")
        return None
    if key is None:
        _ignored(mdir, name, st.st_ino, "no_state_key")
        return None
    body, ok = _untag(key, mdir.name, name, raw)
    if not ok:
        _ignored(mdir, name, st.st_ino, "bad_or_missing_tag")
        return None
    return body


def _untag(key: bytes, dirname: str, name: str, raw: bytes) -> tuple[bytes, bool]:
    if len(raw) < _TAG_LEN or not raw[-_TAG_LEN:].startswith(TAG_PREFIX):
        return raw, False
    body = raw[:-_TAG_LEN]
    return body, hmac.compare_digest(raw[-_TAG_LEN:], _tag(key, dirname, name, body))


def exists(mdir: Path, name: str) -> bool:
    """``mdir/name`` exists and is authentic (see :func:`read`)."""
    return read(mdir, name) is not None


def names(mdir: Path) -> list[str]:
    """The entries of ``mdir`` (empty when it does not exist or cannot be trusted)."""
    try:
        with open_dir(mdir) as dfd:
            return sorted(os.listdir(dfd))
    except (FileNotFoundError, NotADirectoryError, StateTreeError):
        return []


def is_dir(mdir: Path) -> bool:
    try:
        with open_dir(mdir):
            return True
    except (FileNotFoundError, NotADirectoryError, StateTreeError):
        return False


def root_names(root: Path) -> list[str]:
    """The entries of the state root (empty when it does not exist)."""
    try:
        with open_root(root) as rfd:
            return sorted(os.listdir(rfd))
    except FileNotFoundError:
        return []


def clear(mdir: Path, *, keep: Container[str] = ()) -> None:
    """Empty ``mdir`` except ``keep``; never follows a symlink (a planted one is removed,
    not what it points to)."""
    try:
        with open_dir(mdir) as dfd:
            for entry in os.listdir(dfd):
                if entry in keep:
                    continue
                st = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(entry, dir_fd=dfd)
                else:
                    os.unlink(entry, dir_fd=dfd)
            os.fsync(dfd)
    except (FileNotFoundError, NotADirectoryError):
        return


def remove(mdir: Path) -> None:
    """Remove ``mdir`` and everything in it, through the root's descriptor (a symlink at
    ``mdir`` is removed itself; nothing it points to is touched)."""
    try:
        with open_root(mdir.parent) as rfd:
            try:
                st = os.stat(mdir.name, dir_fd=rfd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(mdir.name, dir_fd=rfd)
            else:
                os.unlink(mdir.name, dir_fd=rfd)
            os.fsync(rfd)
    except FileNotFoundError:
        return


def newest_mtime(mdir: Path) -> float:
    """The newest mtime of ``mdir`` and its entries (0.0 when unknown)."""
    newest = 0.0
    with contextlib.suppress(OSError), open_dir(mdir) as dfd:
        newest = os.fstat(dfd).st_mtime
        for entry in os.listdir(dfd):
            with contextlib.suppress(OSError):
                st = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
                newest = max(newest, st.st_mtime)
    return newest


def drop_tmp(mdir: Path) -> None:
    """Remove leftovers of interrupted writes."""
    with contextlib.suppress(OSError), open_dir(mdir) as dfd:
        for entry in os.listdir(dfd):
            if entry.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(entry, dir_fd=dfd)


# --- startup ----------------------------------------------------------------------------------


def check_or_prepare(root: Path, *, dry_run: bool = False) -> int:
    """Startup: :func:`prepare_root`, or in a dry run (which writes nothing) only the checks
    of an existing root."""
    if not dry_run:
        return prepare_root(root)
    if os.path.lexists(root):
        why = problem(os.lstat(root))
        if why is not None:
            raise StateTreeError(errno.EPERM, f"state directory {str(root)!r} {why}")
    return 0


def prepare_root(root: Path) -> int:
    """Startup: make sure ``root`` is a state tree the daemon may use; adopt an earlier
    version's state once. Returns the number of ``<hash>``
    directories adopted. Raises :class:`StateTreeError` (the daemon refuses to start).

    A missing root is left missing: the first state write creates it (0700, and its key),
    so a destination that never receives a torrent leaves ``--data`` as it found it."""
    if not os.path.lexists(root):
        return 0
    st = os.lstat(root)
    why = problem(st)
    if why is not None:
        raise StateTreeError(errno.EPERM, f"state directory {str(root)!r} {why}")
    with open_root(root) as rfd:
        st = os.fstat(rfd)
        if st.st_mode & 0o077 and not st.st_mode & stat.S_IWGRP:
            os.fchmod(rfd, DIR_MODE)  # an earlier version made it 0755
        if _read_key(rfd, KEY_NAME) is not None:
            return 0
        key = _read_key(rfd, ADOPTING_NAME)
        if key is None:
            key = secrets.token_bytes(KEY_BYTES)
            atomicfile.create(rfd, ADOPTING_NAME, key, mode=FILE_MODE)
        adopted = 0
        for entry in sorted(os.listdir(rfd)):
            if entry.startswith("."):
                continue
            if _adopt_dir(rfd, entry, key):
                adopted += 1
        os.rename(ADOPTING_NAME, KEY_NAME, src_dir_fd=rfd, dst_dir_fd=rfd)
        os.fsync(rfd)
    return adopted


def _adopt_dir(rfd: int, name: str, key: bytes) -> bool:
    try:
        dfd = os.open(name, _DIR_FLAGS, dir_fd=rfd)
    except OSError:
        return False  # a symlink or a file: not the daemon's state; left alone, never read
    try:
        st = os.fstat(dfd)
        if st.st_uid != os.geteuid():
            log.warning("event=state_dir_ignored dir=%s reason=not_owned_by_daemon", name)
            return False
        if not st.st_mode & stat.S_IWGRP:
            os.fchmod(dfd, DIR_MODE)
        count = 0
        for entry in sorted(os.listdir(dfd)):
            if entry.startswith(TMP_PREFIX):
                continue
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue
            try:
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode) or fst.st_uid != os.geteuid():
                    log.warning(
                        "event=state_file_ignored dir=%s file=%s reason=not_adopted", name, entry
                    )
                    continue
                raw = _read_all(fd)
            finally:
                os.close(fd)
            body, ok = _untag(key, name, entry, raw)
            if not ok:
                body = raw
            atomicfile.replace(dfd, entry, body + _tag(key, name, entry, body), mode=FILE_MODE)
            count += 1
        log.info("event=state_adopted dir=%s files=%d", name, count)
        return True
    finally:
        os.close(dfd)
