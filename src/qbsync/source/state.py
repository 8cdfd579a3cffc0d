"""The tracked set: torrents currently being streamed, shared by monitor, senders and orchestrator.

Only the orchestrator adds or removes entries: the monitor never starts streaming torrents on
its own, bypassing the exclusion tags and the completion cache
(docs/design-decisions.md#only-the-orchestrator-tracks). The
monitor and the senders look entries up by hash and must cope with an entry disappearing
between two awaits: every ``Tracked`` carries ``active``, cleared when it is untracked, and
pieces of an inactive entry are dropped.
"""

from __future__ import annotations

import itertools

import attrs
import trio

from .meta import SourceMeta
from .tracker import BACKLOG, LIVE, URGENT, PieceQueue, PieceTracker, QueueItem

# Piece-state polls after a torrent changed: now, then follow-ups that catch pieces qBittorrent
# reported as "downloading" (1) while their last blocks were being written, which turn into
# "downloaded" (2) without another progress change.
FOLLOW_UPS = (0.0, 1.0, 3.0)


@attrs.define(eq=False)
class Tracked:
    info_hash: str
    meta: SourceMeta
    tracker: PieceTracker
    since: float  # wall-clock time the download completed (or tracking started)
    seq: int  # tracking order: earlier = the destination had more of it
    active: bool = True
    init_generation: int = -1  # pool generation of the last full InitTorrent; -1 = none
    resync_pending: bool = False  # the next InitTorrent must carry resync=True
    init_lock: trio.Lock = attrs.field(factory=trio.Lock)
    first_poll_done: bool = False
    poll_times: list[float] = attrs.field(factory=list)  # monotonic times a poll is due
    finalize_failures: int = 0
    finalize_polls: int = 0
    next_finalize_at: float = 0.0  # monotonic
    finalize_started: float = 0.0
    read_failures: int = 0
    last_error: tuple[str, str, float] | None = None  # (code, message, unix time), for /status
    urgent: bool = False  # carries --handoff-tag: its pieces go before every other torrent's
    owned_elsewhere: bool = False  # the destination said another source syncs it: untrack, wait

    @property
    def name(self) -> str:
        return self.meta.name

    def schedule_polls(self, now: float, offsets: tuple[float, ...] = FOLLOW_UPS) -> None:
        self.poll_times = sorted({*self.poll_times, *(now + o for o in offsets)})

    def poll_due(self, now: float) -> bool:
        return bool(self.poll_times) and self.poll_times[0] <= now

    def consume_polls(self, now: float) -> None:
        self.poll_times = [t for t in self.poll_times if t > now]


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

    def add(self, meta: SourceMeta, tracker: PieceTracker, since: float) -> Tracked:
        old = self._by_hash.pop(meta.info_hash, None)
        if old is not None:
            old.active = False
        t = Tracked(meta.info_hash, meta, tracker, since=since, seq=next(self._seq))
        t.schedule_polls(trio.current_time())
        self._by_hash[meta.info_hash] = t
        return t

    def remove(self, info_hash: str) -> Tracked | None:
        t = self._by_hash.pop(info_hash, None)
        if t is not None:
            t.active = False
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
            t.urgent = True
            self.queue.push(t.info_hash, sorted(t.tracker.pending), URGENT)

    def notify_changed(self) -> None:
        self.changed.set()
