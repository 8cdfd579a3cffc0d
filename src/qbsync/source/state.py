"""The tracked set: torrents currently being streamed, shared by monitor, senders and orchestrator.

Only the orchestrator adds or removes entries: the monitor never starts streaming torrents on
its own, bypassing the exclusion tags and the completion cache
(docs/design-decisions.md#only-the-orchestrator-tracks). The
monitor and the senders look entries up by hash and must cope with an entry disappearing
between two awaits: every ``Tracked`` carries ``active``, cleared when it is untracked, and
pieces of an inactive entry are dropped.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Any

import attrs
import trio

from .meta import SourceMeta
from .tracker import BACKLOG, LIVE, URGENT, PieceQueue, PieceTracker, QueueItem

# Piece-state polls after a torrent changed: now, then follow-ups that catch pieces qBittorrent
# reported as "downloading" (1) while their last blocks were being written, which turn into
# "downloaded" (2) without another progress change.
FOLLOW_UPS = (0.0, 1.0, 3.0)


class SourcePhase(enum.Enum):
    INITIALIZING = "initializing"  # tracked; no InitTorrent acknowledged on this connection
    STREAMING = "streaming"  # the destination said what it needs; pieces flow
    FINALIZING = "finalizing"  # every piece acknowledged; Finalize asked (polls, retries)
    UNTRACKED = "untracked"  # synced, failed, excluded or removed: the record is dead


class IllegalTransition(RuntimeError):
    """A phase change SOURCE_TRANSITIONS does not allow: always a bug, never input."""


# The only phase changes of a tracked torrent (docs/architecture.md has the same table).
# INITIALIZING again from STREAMING/FINALIZING: the destination lost its state (restart,
# ``not-initialized``, finalize answered ``not-found``). FINALIZING -> STREAMING: a re-init
# found pieces missing on the destination (``incomplete``), streaming resumes.
SOURCE_TRANSITIONS: dict[SourcePhase, frozenset[SourcePhase]] = {
    SourcePhase.INITIALIZING: frozenset({SourcePhase.STREAMING, SourcePhase.UNTRACKED}),
    SourcePhase.STREAMING: frozenset(
        {SourcePhase.INITIALIZING, SourcePhase.FINALIZING, SourcePhase.UNTRACKED}
    ),
    SourcePhase.FINALIZING: frozenset(
        {SourcePhase.INITIALIZING, SourcePhase.STREAMING, SourcePhase.UNTRACKED}
    ),
    SourcePhase.UNTRACKED: frozenset(),
}


@attrs.define(eq=False)
class Tracked:
    """One torrent being streamed: its phase and everything the orchestrator, the senders
    and the monitor learn about it. Fields are read freely; they change only through the
    methods below (``tests/test_state_machines.py`` greps for assignments elsewhere)."""

    info_hash: str
    meta: SourceMeta
    tracker: PieceTracker
    since: float  # wall-clock time the download completed (or tracking started)
    seq: int  # tracking order: earlier = the destination had more of it
    _phase: SourcePhase = SourcePhase.INITIALIZING
    _init_generation: int = -1  # pool generation of the last full InitTorrent; -1 = none
    _resync_pending: bool = False  # the next InitTorrent must carry resync=True
    init_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _first_poll_done: bool = False
    poll_times: list[float] = attrs.field(factory=list)  # monotonic times a poll is due
    _finalize_failures: int = 0
    _finalize_polls: int = 0
    _next_finalize_at: float = 0.0  # monotonic
    _finalize_started: float = 0.0  # monotonic; 0 = no Finalize asked yet
    _read_failures: int = 0
    _last_error: tuple[str, str, float] | None = None  # (code, message, unix time), /status
    # Removed from the source after every piece was streamed: finalized anyway, then handed
    # over to the destination (docs/design-decisions.md#finalize-streamed-removals).
    _removed_from_source: bool = False
    # The monitor's last view of the torrent (category, tags, paths): a removed torrent is
    # finalized from it.
    _last_info: dict[str, Any] | None = None
    tracked_at: float = attrs.field(factory=time.time)  # wall clock; the activity log's duration
    _urgent: bool = False  # carries --handoff-tag: its pieces go before every other torrent's
    # The destination said another source syncs it: untrack, wait, probe again.
    _owned_elsewhere: bool = False

    @property
    def name(self) -> str:
        return self.meta.name

    # -- read-only views -------------------------------------------------------------------

    @property
    def phase(self) -> SourcePhase:
        return self._phase

    @property
    def active(self) -> bool:
        """Still tracked: pieces of an untracked record are dropped."""
        return self._phase is not SourcePhase.UNTRACKED

    @property
    def init_generation(self) -> int:
        return self._init_generation

    @property
    def resync_pending(self) -> bool:
        return self._resync_pending

    @property
    def first_poll_done(self) -> bool:
        return self._first_poll_done

    @property
    def finalize_failures(self) -> int:
        return self._finalize_failures

    @property
    def finalize_polls(self) -> int:
        return self._finalize_polls

    @property
    def next_finalize_at(self) -> float:
        return self._next_finalize_at

    @property
    def finalize_started(self) -> float:
        return self._finalize_started

    @property
    def read_failures(self) -> int:
        return self._read_failures

    @property
    def last_error(self) -> tuple[str, str, float] | None:
        return self._last_error

    @property
    def removed_from_source(self) -> bool:
        return self._removed_from_source

    @property
    def last_info(self) -> dict[str, Any] | None:
        return self._last_info

    @property
    def urgent(self) -> bool:
        return self._urgent

    @property
    def owned_elsewhere(self) -> bool:
        return self._owned_elsewhere

    # -- phase transitions -----------------------------------------------------------------

    def _move(self, new: SourcePhase) -> None:
        if new is self._phase:
            return
        if new not in SOURCE_TRANSITIONS[self._phase]:
            raise IllegalTransition(
                f"{self.info_hash}: phase {self._phase.value} -> {new.value} is not allowed"
            )
        self._phase = new

    def initialized(self, generation: int) -> None:
        """The destination acknowledged an InitTorrent of connection ``generation``: stream
        (again) unless every piece is acknowledged and finalization already began."""
        self._init_generation = generation
        self._resync_pending = False
        if self._phase is SourcePhase.UNTRACKED:
            return
        if self._phase is SourcePhase.INITIALIZING or not self.tracker.complete:
            self._move(SourcePhase.STREAMING)

    def uninitialized(self) -> None:
        """The destination lost this torrent's state: the next request must init it again."""
        self._init_generation = -1
        self._finalize_polls = 0
        if self._phase is not SourcePhase.UNTRACKED:
            self._move(SourcePhase.INITIALIZING)

    def begin_finalize(self, now: float) -> None:
        """A Finalize is about to be asked (``now`` monotonic): STREAMING -> FINALIZING."""
        self._move(SourcePhase.FINALIZING)
        if not self._finalize_started:
            self._finalize_started = now

    def untrack(self) -> None:
        """Synced, failed, excluded or removed: the record is dead (idempotent)."""
        self._move(SourcePhase.UNTRACKED)

    # -- other facts -------------------------------------------------------------------------

    def request_resync(self, resync: bool) -> None:
        self._resync_pending = resync

    def first_poll_finished(self) -> None:
        self._first_poll_done = True

    def finalize_later(self, at: float) -> None:
        """Ask (again) no sooner than monotonic time ``at``."""
        self._next_finalize_at = at

    def finalize_verifying(self, next_at: float) -> int:
        """The destination is still verifying: poll again at ``next_at``; returns how many
        polls this finalization has made."""
        self._finalize_polls += 1
        self._next_finalize_at = next_at
        return self._finalize_polls

    def finalize_failed(self, code: str, message: str) -> int:
        """A Finalize failed (counted towards --sync-failed-tag); returns the count."""
        self._finalize_failures += 1
        self._last_error = (code, message, time.time())
        self._finalize_polls = 0
        return self._finalize_failures

    def read_failed(self, message: str) -> None:
        self._read_failures += 1
        self._last_error = ("io", message, time.time())

    def mark_removed_from_source(self) -> None:
        self._removed_from_source = True

    def remember_info(self, info: dict[str, Any]) -> None:
        self._last_info = info

    def mark_urgent(self, urgent: bool = True) -> None:
        """It carries ``--handoff-tag``: its pieces jump the queue (see ``PieceQueue``)."""
        self._urgent = urgent

    def owned_by_other_source(self) -> None:
        """The destination answered ``owned-by-other-source``: another source syncs it."""
        self._owned_elsewhere = True

    def schedule_polls(self, now: float, offsets: tuple[float, ...] = FOLLOW_UPS) -> None:
        self.poll_times = sorted({*self.poll_times, *(now + o for o in offsets)})

    def poll_due(self, now: float) -> bool:
        return bool(self.poll_times) and self.poll_times[0] <= now

    def consume_polls(self, now: float) -> None:
        self.poll_times = [t for t in self.poll_times if t > now]

    def status_label(self, downloading: bool = False, connected: bool = True) -> str:
        """The one mapping from the phase to the words ``/status``, the page and
        ``qbsync status`` show (``qbsync.http.status.STATES``; extend it here rather than
        re-deriving a state there). ``downloading``: qBittorrent still downloads it;
        ``connected``: the pool has a destination connection."""
        if self._phase is SourcePhase.UNTRACKED:
            return "untracked"
        if self._finalize_failures:
            return "retrying"
        if self._phase is SourcePhase.FINALIZING or self.tracker.complete:
            return "verifying" if self._finalize_polls else "finalizing"
        if self._phase is SourcePhase.INITIALIZING or not connected:
            return "waiting"
        return "downloading + streaming" if downloading else "streaming"


class Registry:
    """hash -> :class:`Tracked`, plus the one piece queue all senders pull from."""

    def __init__(self) -> None:
        self._by_hash: dict[str, Tracked] = {}
        self._seq = itertools.count()
        self.queue = PieceQueue(self._is_live)
        self.changed = trio.Event()  # set when a torrent may have become complete

    def _is_live(self, item: QueueItem) -> bool:
        t = self._by_hash.get(item.info_hash)
        return t is not None and item.index in t.tracker.pending

    def __contains__(self, info_hash: object) -> bool:
        return info_hash in self._by_hash

    def __len__(self) -> int:
        return len(self._by_hash)

    def get(self, info_hash: str) -> Tracked | None:
        return self._by_hash.get(info_hash)

    def all(self) -> list[Tracked]:
        return list(self._by_hash.values())

    def add(
        self, meta: SourceMeta, tracker: PieceTracker, since: float, *, resync: bool = False
    ) -> Tracked:
        old = self._by_hash.pop(meta.info_hash, None)
        if old is not None:
            old.untrack()
        t = Tracked(meta.info_hash, meta, tracker, since=since, seq=next(self._seq))
        t.request_resync(resync)
        t.schedule_polls(trio.current_time())
        self._by_hash[meta.info_hash] = t
        return t

    def remove(self, info_hash: str) -> Tracked | None:
        t = self._by_hash.pop(info_hash, None)
        if t is not None:
            t.untrack()
            t.tracker.pending.clear()
            if len(self.queue) > 4 * max(1, t.tracker.num_pieces):
                self.queue.compact()
        return t

    def enqueue(self, t: Tracked, indices: list[int]) -> None:
        """Queue pieces that the tracker just moved to pending."""
        if indices and t.active:
            if t.urgent:
                self.queue.push(t.info_hash, indices, URGENT)
            elif t.first_poll_done:
                self.queue.push(t.info_hash, indices, LIVE)
            else:
                self.queue.push(t.info_hash, indices, BACKLOG, key=t.seq)

    def requeue(self, t: Tracked, index: int) -> None:
        """A failed piece goes back to the front class (it is already late)."""
        if t.active and index in t.tracker.pending:
            self.queue.push(t.info_hash, [index], URGENT if t.urgent else LIVE)

    def make_urgent(self, t: Tracked) -> None:
        """The torrent got --handoff-tag while tracked: its waiting pieces jump the queue. The
        older entries stay in the heap and are skipped when popped (the piece is no longer
        pending by then)."""
        if t.active and not t.urgent:
            t.mark_urgent()
            self.queue.push(t.info_hash, sorted(t.tracker.pending), URGENT)

    def notify_changed(self) -> None:
        self.changed.set()
