"""The destination's per-torrent model and its on-disk persistence format.

Layout of ``<state>/<hash>/`` (``--state-dir``, default ``<data>/.qbsync``; one directory per
torrent, hash = lower-case hex; every file 0600 and authenticated, read and written only
through :mod:`.statetree`):

``meta.json``
    :class:`TorrentMeta` through cattrs: the file table as the source sent it (torrent-relative
    names, sizes, selection, source (device, inode)), the sub-directory, and the schema version.
    Written once at init (atomically) and rewritten on a selection change.
``torrent``
    The raw ``.torrent`` bytes, exactly as received: the destination qBittorrent is given these
    bytes at finalize, and recovery re-parses them (geometry and piece hashes always come from
    the parsed metainfo, never from request fields).
``pieces``
    The written-pieces map: ``QBSP`` magic, format version, bit count, the *written* bitfield,
    the *unverified boundary* bitfield, and a CRC-32 over all of it. Anything that does not
    parse (torn, truncated, wrong size, bad CRC) loads as "nothing written": the map is a
    checkpoint, and losing it costs re-sending, never correctness.
``.finalized``
    JSON marker written when the torrent is verified (and registered in qBittorrent when one
    is configured). It replaces everything else in the directory (but ``owned.json``, see
    :mod:`.ownership`) and keeps the small (device, inode) -> path index the hardlink registry
    is rebuilt from, so link sources survive a restart.
``owned.json``
    The ownership ledger (:mod:`.ownership`): which files and directories qbsync created.

Every write is atomic: temp file in the same directory, ``fsync``, ``rename``, ``fsync`` of the
directory. The invariant the writer and flusher keep on top of this: **a bit persisted in
``pieces`` means its bytes are durable** — the data files touched since the previous flush are
``fdatasync``'ed before the bitmap that mentions them is written.
"""

from __future__ import annotations

import enum
import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
import trio

from ..bitfield import Bitfield
from ..paths import Parts, partial_parts
from ..torrent import Geometry, Metainfo
from ..wire.errors import WireError
from ..wire.messages import Finalize, FinalizeResult
from . import statetree
from .ownership import Ledger

SCHEMA_VERSION = 1
META_NAME = "meta.json"
TORRENT_NAME = "torrent"
PIECES_NAME = "pieces"
FINALIZED_NAME = ".finalized"
# Written (durably) just before qbsync adds the torrent to the destination qBittorrent: the
# proof that the entry is qbsync's. Without it (and without a ``.finalized`` marker) an entry
# of that hash is the user's own, and qbsync never stops, rechecks, renames or removes it.
QB_ADDED_NAME = "qb-added"
# Written once StartTorrent answered started=True: the source may have deleted its copy, so the
# torrent and its files now belong to the destination qBittorrent alone.
HANDED_OFF_NAME = "handed-off"

_PIECES_MAGIC = b"QBSP"
_PIECES_VERSION = 1
_PIECES_HEADER = struct.Struct(">4sBQ")  # magic, version, number of bits
_CRC = struct.Struct(">I")

converter = cattrs.Converter()


# --- persisted documents --------------------------------------------------------------------


@attrs.frozen
class FileMeta:
    """One file as the source sent it (torrent order, padding files excluded)."""

    path: str
    size: int
    selected: bool = True
    device: int = 0
    inode: int = 0


@attrs.frozen
class TorrentMeta:
    schema: int
    info_hash: str
    name: str
    save_sub_path: str
    files: tuple[FileMeta, ...]
    created: float = 0.0


@attrs.frozen
class FinalizedFile:
    path: str  # data-root-relative, "/"-joined (sub path included)
    size: int
    device: int = 0  # the source's (device, inode): the hardlink registry's key
    inode: int = 0
    # The verified file's own (device, inode) here, taken when the marker is written: a file
    # at that name with another inode is not the copy qbsync verified (0 = unknown, older
    # markers), and a hand-off is refused for it.
    disk_device: int = 0
    disk_inode: int = 0


@attrs.frozen
class FinalizedMarker:
    info_hash: str
    finalized_at: float
    save_sub_path: str = ""
    files: tuple[FinalizedFile, ...] = ()
    # Files whose names were given to another torrent after they vanished from disk: the
    # copy is no longer complete, so it is never handed seeding nor answered "complete".
    released: tuple[str, ...] = ()


def dump_json(obj: Any) -> bytes:
    return json.dumps(converter.unstructure(obj), indent=1, sort_keys=True).encode() + b"\n"


def load_meta(raw: bytes) -> TorrentMeta:
    """Parse ``meta.json``; raises ``ValueError`` on anything unusable."""
    try:
        meta = converter.structure(json.loads(raw), TorrentMeta)
    except (ValueError, TypeError, cattrs.BaseValidationError) as exc:
        raise ValueError(f"unreadable meta.json: {exc}") from None
    if meta.schema > SCHEMA_VERSION:
        raise ValueError(f"meta.json schema {meta.schema} is newer than {SCHEMA_VERSION}")
    return meta


def load_marker(raw: bytes) -> FinalizedMarker | None:
    try:
        return converter.structure(json.loads(raw), FinalizedMarker)
    except (ValueError, TypeError, cattrs.BaseValidationError):
        return None


def encode_pieces(written: Bitfield, unverified: Bitfield) -> bytes:
    body = (
        _PIECES_HEADER.pack(_PIECES_MAGIC, _PIECES_VERSION, written.size)
        + written.to_bytes()
        + unverified.to_bytes()
    )
    return body + _CRC.pack(zlib.crc32(body))


def decode_pieces(raw: bytes, size: int) -> tuple[Bitfield, Bitfield]:
    """Decode ``pieces``; anything malformed or of another size gives two empty maps."""
    nbytes = (size + 7) // 8
    empty = (Bitfield(size), Bitfield(size))
    if len(raw) != _PIECES_HEADER.size + 2 * nbytes + _CRC.size:
        return empty
    body, crc = raw[: -_CRC.size], raw[-_CRC.size :]
    if _CRC.unpack(crc)[0] != zlib.crc32(body):
        return empty
    magic, version, nbits = _PIECES_HEADER.unpack_from(body)
    if magic != _PIECES_MAGIC or version != _PIECES_VERSION or nbits != size:
        return empty
    start = _PIECES_HEADER.size
    try:
        written = Bitfield(size, body[start : start + nbytes])
        unverified = Bitfield(size, body[start + nbytes : start + 2 * nbytes])
    except ValueError:
        return empty
    return written, unverified


def read_optional(path: Path) -> bytes | None:
    """The authentic content of the state file ``path`` (``<state>/<hash>/<name>``), or None
    when it is absent or not one the daemon wrote (see :mod:`.statetree`)."""
    return statetree.read(path.parent, path.name)


# --- in-memory model ------------------------------------------------------------------------


class FileStatus(enum.Enum):
    SKIPPED = "skipped"  # deselected, or a BEP 47 padding file: never written here
    STREAMING = "streaming"  # being written into ``<path>.partial``
    EXISTING = "existing"  # final name on disk (found or hardlinked), not verified yet
    COMPLETE = "complete"  # final name, every piece touching it written and proven


class Phase(enum.Enum):
    ACTIVE = "active"  # accepting pieces
    SCANNING = "scanning"  # verifying files found on disk; pieces are answered ``busy``
    FINALIZING = "finalizing"  # a finalization runs or its result waits to be collected
    CLOSED = "closed"  # aborted, finalized or shut down; the object is dead


class IllegalTransition(RuntimeError):
    """A change of phase or file status that the tables below do not allow.

    Always a bug in qbsync, never bad input (h11's rule: a state machine that accepts any
    transition documents nothing). Raised before anything changes."""


# The only phase changes a torrent makes (docs/architecture.md has the same table). Finalizing
# starts only from ACTIVE: a scan must settle first (the server answers ``verifying``), and a
# closed torrent is dead. Closing an already closed torrent is a no-op, not a transition.
PHASE_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.ACTIVE: frozenset({Phase.SCANNING, Phase.FINALIZING, Phase.CLOSED}),
    Phase.SCANNING: frozenset({Phase.ACTIVE, Phase.CLOSED}),
    Phase.FINALIZING: frozenset({Phase.ACTIVE, Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}

# The only file-status changes. SKIPPED is fixed when the file list is built (a selection
# change builds a new torrent state); STREAMING is where every selected non-empty file starts.
FILE_TRANSITIONS: dict[FileStatus, frozenset[FileStatus]] = {
    FileStatus.SKIPPED: frozenset(),
    # laid out: an empty file or a finished earlier copy is COMPLETE; a full-size file found
    # or hardlinked at the final name is EXISTING (to be scanned); the last piece renamed: COMPLETE
    FileStatus.STREAMING: frozenset({FileStatus.EXISTING, FileStatus.COMPLETE}),
    # scanned: proven (COMPLETE) or demoted back to .partial (STREAMING)
    FileStatus.EXISTING: frozenset({FileStatus.COMPLETE, FileStatus.STREAMING}),
    # a read-back or recheck after the rename found corrupt pieces: back to .partial
    FileStatus.COMPLETE: frozenset({FileStatus.STREAMING}),
}


_S = TypeVar("_S", Phase, FileStatus)


def _check(kind: str, table: dict[_S, frozenset[_S]], old: _S, new: _S, who: str) -> None:
    if new not in table[old]:
        raise IllegalTransition(f"{who}: {kind} {old.value} -> {new.value} is not allowed")


@attrs.define(eq=False)
class DataFile:
    """One file of the torrent's geometry (metainfo order, padding files included).

    ``fd`` is the lazily opened write handle of the ``.partial`` file. Its lifetime is managed
    on the event loop: every use in a thread is bracketed by ``users`` +1/-1, and closing sets
    ``closing`` (no new users), waits until ``users`` is 0 and only then closes — so a file
    descriptor number can never be reused under a write in flight.
    """

    index: int  # index in the metainfo geometry
    request_index: int  # index in the source's (qBittorrent's) file list; -1 for padding
    parts: Parts  # sub path + torrent-relative path, validated
    size: int
    offset: int
    selected: bool
    pad: bool
    device: int = 0
    inode: int = 0
    # Read through ``status``; changed only by :meth:`become` (FILE_TRANSITIONS).
    _status: FileStatus = FileStatus.STREAMING
    linked: bool = False  # EXISTING because we hardlinked it from a verified file
    # Found at its final name, not created by qbsync: only read; adopted when every piece
    # it covers verifies, else the torrent is refused (``conflict``). Never written, renamed
    # or deleted (see :mod:`.ownership`).
    foreign: bool = False
    # Foreign because this torrent finalized it earlier (its ledger handed it over): pieces a
    # resync cannot check (they share bytes with a file not on disk) do not stop its adoption.
    handed: bool = False
    # Its .partial was created empty by this init: a scan must not read its zeros as data.
    created_empty: bool = False
    fd: int | None = None
    users: int = 0
    closing: bool = False
    # Pieces touching this file still unwritten (STREAMING only); read through ``remaining``,
    # changed only by :class:`TorrentState` (``mark_written``, ``recount_remaining``).
    _remaining: int = 0
    finalizing: bool = False  # an early (per-file) finalize runs
    finalize_done: trio.Event | None = None  # set when that early finalize ends
    open_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _idle: trio.Event | None = None

    @property
    def path(self) -> str:
        return "/".join(self.parts)

    @property
    def status(self) -> FileStatus:
        return self._status

    @property
    def remaining(self) -> int:
        return self._remaining

    def become(self, new: FileStatus) -> None:
        """Change the file's status; raises :class:`IllegalTransition` unless FILE_TRANSITIONS
        allows it. Setting the status it already has is a no-op (laying out a fresh file says
        "streaming" of a file that already streams)."""
        if new is self._status:
            return
        _check("file status", FILE_TRANSITIONS, self._status, new, self.path)
        self._status = new

    @property
    def working_parts(self) -> Parts:
        return partial_parts(self.parts) if self.status is FileStatus.STREAMING else self.parts

    def unavailable(self) -> bool:
        """Closing or being finalized: no new writer may pin it. (A method, not a property, so
        type checkers do not carry a narrowed value across awaits.)"""
        return self.closing or self.finalizing

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        while self.users:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()


@attrs.define(eq=False)
class FinalizeJob:
    """One finalization of a torrent (run by :mod:`.finalizer`), kept on its state until the
    source collects the result."""

    request: Finalize
    started: float = attrs.field(factory=time.monotonic)
    done: trio.Event = attrs.field(factory=trio.Event)
    result: FinalizeResult | None = None
    error: WireError | None = None


@attrs.define(eq=False)
class TorrentState:
    """Everything the destination knows about one torrent. Only touched on the event loop."""

    info_hash: str
    meta: TorrentMeta
    metainfo: Metainfo
    files: list[DataFile]
    written: Bitfield
    unverified: Bitfield  # subset of written: boundary pieces whose SHA-1 could not match
    meta_dir: Path
    dry_run: bool = False
    ledger: Ledger = attrs.field(factory=Ledger)  # names this torrent created (ownership)
    conflict: str = ""  # a foreign file failed its verification: the init is refused
    # Read through ``phase``; changed only by the transition methods below (PHASE_TRANSITIONS).
    _phase: Phase = Phase.ACTIVE
    # Bumped on every change of ``written``/``unverified``; read through ``version``.
    _version: int = 0
    _flushed_version: int = 0
    touched: set[int] = attrs.field(factory=set)  # files written since the last flush
    last_activity: float = attrs.field(factory=time.time)
    flush_lock: trio.Lock = attrs.field(factory=trio.Lock)
    scan_done: trio.Event | None = None
    finalize: FinalizeJob | None = None  # the running or finished finalization
    dry_seen: Bitfield | None = None  # dry run: pieces received and hash-checked (memory only)
    last_error: tuple[str, str, float] | None = None  # (code, message, unix time), for /status
    cancel_scopes: set[trio.CancelScope] = attrs.field(factory=set)
    tasks: int = 0
    _tasks_idle: trio.Event | None = None

    @property
    def geometry(self) -> Geometry:
        return self.metainfo.geometry

    @property
    def num_pieces(self) -> int:
        return self.geometry.num_pieces

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def version(self) -> int:
        return self._version

    @property
    def flushed_version(self) -> int:
        return self._flushed_version

    @property
    def dirty(self) -> bool:
        return self._version != self._flushed_version

    def mark_flushed(self, version: int) -> None:
        """The bitmap of ``version`` is durable in ``pieces``."""
        self._flushed_version = version

    def load_pieces(self, raw: bytes) -> None:
        """Resume: the persisted bitmap (``pieces``) replaces the empty one of a new state."""
        self.written, self.unverified = decode_pieces(raw, self.num_pieces)

    def _move(self, new: Phase) -> None:
        _check("phase", PHASE_TRANSITIONS, self._phase, new, self.info_hash)
        self._phase = new

    def touch(self) -> None:
        self.last_activity = time.time()

    def is_in(self, *phases: Phase) -> bool:
        """Phase test as a call, so type checkers re-read ``phase`` after every await."""
        return self.phase in phases

    # -- piece classification ------------------------------------------------------------------

    def piece_files(self, index: int) -> list[DataFile]:
        return [self.files[s.file_index] for s in self.geometry.spans(index)]

    def is_boundary(self, index: int) -> bool:
        """The piece touches a deselected (non-padding) file: its SHA-1 can only match when the
        deselected bytes happen to be what the source sent for them (zeros)."""
        return any(not f.selected and not f.pad for f in self.piece_files(index))

    def is_needed(self, index: int) -> bool:
        if self.written[index]:
            return False
        return any(f.status is FileStatus.STREAMING for f in self.piece_files(index))

    def needed(self) -> Bitfield:
        out = Bitfield(self.num_pieces)
        for f in self.files:
            if f.status is FileStatus.STREAMING:
                for i in self.geometry.file_pieces(f.index):
                    if not self.written[i]:
                        out[i] = True
        return out

    def missing_count(self) -> int:
        return self.needed().count()

    def selection_key(self) -> tuple[tuple[str, int, bool], ...]:
        return tuple((f.path, f.size, f.selected) for f in self.meta.files)

    def recount_remaining(self) -> None:
        for f in self.files:
            if f.status is FileStatus.STREAMING:
                f._remaining = sum(
                    1 for i in self.geometry.file_pieces(f.index) if not self.written[i]
                )
            else:
                f._remaining = 0

    # -- transitions: every change of written / unverified / version / phase goes through these,
    # so the invariants (``unverified`` is a subset of ``written``; ``version`` moves with
    # every change of either; ``remaining`` counts unwritten pieces) live in one place.

    def mark_written(self, index: int, files: list[DataFile], *, verified: bool) -> list[DataFile]:
        """Piece ``index`` was written into ``files`` (its streaming files). ``verified``
        False: a boundary piece whose SHA-1 could not match. Returns the files whose last
        missing piece this was."""
        self.written[index] = True
        if not verified:
            self.unverified[index] = True
        self._version += 1
        done = []
        for f in files:
            self.touched.add(f.index)
            f._remaining -= 1
            if f.remaining <= 0 and f.status is FileStatus.STREAMING and not f.finalizing:
                done.append(f)
        return done

    def mark_proven(self, pieces: set[int]) -> None:
        """Pieces found on disk whose SHA-1 matched (a scan): written and verified."""
        if not pieces:
            return
        for i in pieces:
            self.written[i] = True
            self.unverified[i] = False
        self._version += 1
        self.touched.update(f.index for f in self.files if f.status is not FileStatus.SKIPPED)

    def begin_scan(self) -> trio.Event:
        """ACTIVE -> SCANNING."""
        self._move(Phase.SCANNING)
        self.scan_done = trio.Event()
        return self.scan_done

    def end_scan(self) -> None:
        """SCANNING -> ACTIVE; a torrent closed while its scan ran stays CLOSED."""
        if self._phase is Phase.SCANNING:
            self._move(Phase.ACTIVE)
        if self.scan_done is not None:
            self.scan_done.set()

    def begin_finalize(self, job: FinalizeJob | None) -> None:
        """ACTIVE -> FINALIZING."""
        self._move(Phase.FINALIZING)
        self.finalize = job

    def finalize_failed(self, job: FinalizeJob | None) -> None:
        """A failed finalization was collected: FINALIZING -> ACTIVE (accept pieces again)."""
        if self.finalize is job:
            self.finalize = None
        if self._phase is Phase.FINALIZING:
            self._move(Phase.ACTIVE)

    def close(self) -> None:
        """Aborted, finalized or shut down: the object is dead (closing twice is a no-op)."""
        if self._phase is not Phase.CLOSED:
            self._move(Phase.CLOSED)

    def clear_pieces(self, pieces: range | list[int]) -> int:
        """Un-set pieces (data gone or bad); returns how many were set."""
        cleared = 0
        for i in pieces:
            if self.written[i]:
                self.written[i] = False
                cleared += 1
            self.unverified[i] = False
        if cleared:
            self._version += 1
        return cleared

    # -- task bookkeeping (abort cancels and waits for this torrent's background work) ----------

    def task_started(self, scope: trio.CancelScope) -> None:
        self.tasks += 1
        self.cancel_scopes.add(scope)

    def task_finished(self, scope: trio.CancelScope) -> None:
        self.cancel_scopes.discard(scope)
        self.tasks -= 1
        if self.tasks == 0 and self._tasks_idle is not None:
            self._tasks_idle.set()
            self._tasks_idle = None

    async def cancel_tasks(self) -> None:
        for scope in list(self.cancel_scopes):
            scope.cancel()
        while self.tasks:
            if self._tasks_idle is None:
                self._tasks_idle = trio.Event()
            await self._tasks_idle.wait()
