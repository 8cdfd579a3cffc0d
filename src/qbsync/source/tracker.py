"""Per-torrent piece bookkeeping and the shared piece queue.

The Go reference re-queued every downloaded-but-unacknowledged piece on every 500 ms poll,
including pieces already in flight, and relied on the destination to acknowledge the
duplicates. Here each piece is in exactly one of these states, and moves between them only
on explicit events (docs/design-decisions.md#each-piece-queued-once):

``waiting``  not downloaded yet (or not yet seen as downloaded)
``pending``  downloaded, queued, not yet taken by a sender
``inflight`` taken by a sender: being read, sent, or awaiting its acknowledgement
``done``     acknowledged, already present on the destination, or never needed (a piece that
             lies only in deselected files)

A piece goes back from ``inflight`` to ``pending`` only on a failed acknowledgement or a
timeout. Everything here is synchronous and Trio-free except :class:`PieceQueue`'s waiting, so
the state machine is unit-testable.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable

import attrs
import trio

from ..bitfield import Bitfield

# Queue priority classes: pieces qBittorrent finished while we were watching go before the
# backlog found when a torrent starts being tracked, so a live download keeps its sub-second
# lag even while an old torrent resumes in the background. A torrent carrying --handoff-tag
# goes before both: the user asked for it to move now.
URGENT = -1
LIVE = 0
BACKLOG = 1


class PieceTracker:
    """The state of every piece of one torrent (see the module docstring)."""

    __slots__ = (
        "_resync_acks",
        "done",
        "failures",
        "first_seen",
        "forced",
        "inflight",
        "mask",
        "num_pieces",
        "pending",
        "ready",
        "sends",
    )

    def __init__(self, num_pieces: int, mask: Iterable[int] = ()) -> None:
        self.num_pieces = num_pieces
        self.done = Bitfield(num_pieces)
        self.ready = Bitfield(num_pieces)  # qBittorrent reported state 2 at least once
        self.mask = frozenset(mask)  # pieces only in deselected files: never needed
        self.pending: set[int] = set()
        self.inflight: set[int] = set()
        self.failures: dict[int, int] = {}  # failed acks per piece (reset on success)
        self.first_seen: dict[int, float] = {}  # monotonic time a piece was first seen ready
        self.sends: dict[int, int] = {}  # how often each piece was sent (this process)
        self.forced: set[int] = set()  # given up on after repeated failures
        self._resync_acks: set[int] | None = None
        for i in self.mask:
            self.done[i] = True

    # -- queries ----------------------------------------------------------------------------

    @property
    def done_count(self) -> int:
        return self.done.count()

    @property
    def complete(self) -> bool:
        """Every piece is done and nothing is queued or in flight: ready to finalize."""
        return not self.pending and not self.inflight and self.done.all()

    def state(self, index: int) -> str:
        if self.done[index]:
            return "done"
        if index in self.inflight:
            return "inflight"
        if index in self.pending:
            return "pending"
        return "waiting"

    # -- transitions ------------------------------------------------------------------------

    def apply_needed(self, needed: Bitfield | None) -> None:
        """Adopt the destination's view (an InitResult): pieces it has are done.

        ``None`` means "the destination has everything" (COMPLETE). A piece the destination
        lacks but we believed done is undone (it will be queued again once ready), except
        pieces acknowledged while the init request was in flight: their ack is newer than
        the destination's answer.
        """
        acked_meanwhile = self._resync_acks or set()
        self._resync_acks = None
        for i in range(self.num_pieces):
            if i in self.mask or i in self.inflight:
                continue  # an in-flight piece is settled by its own ack
            if needed is None or not needed[i]:
                if not self.done[i]:
                    self.done[i] = True
                    self.pending.discard(i)
            elif self.done[i] and i not in acked_meanwhile:
                self.done[i] = False
                self.forced.discard(i)

    def begin_resync(self) -> None:
        """Call before sending an InitTorrent whose answer will go to :meth:`apply_needed`."""
        self._resync_acks = set()

    def mark_ready(self, states: Iterable[int], now: float) -> list[int]:
        """Record qBittorrent piece states (2 = downloaded); return pieces to queue, in order.

        A piece is returned once: when it is downloaded, not done, and neither queued nor in
        flight. Re-queueing after failures goes through :meth:`fail`, never through here.
        """
        out: list[int] = []
        for i, s in enumerate(states):
            if i >= self.num_pieces:
                break
            if s != 2:
                continue
            if not self.ready[i]:
                self.ready[i] = True
                self.first_seen.setdefault(i, now)
            if not self.done[i] and i not in self.pending and i not in self.inflight:
                self.pending.add(i)
                out.append(i)
        return out

    def requeue_ready(self) -> list[int]:
        """Ready pieces that are neither done, queued nor in flight (after a resync)."""
        out = []
        for i in self.ready.set_indices():
            if not self.done[i] and i not in self.pending and i not in self.inflight:
                self.pending.add(i)
                out.append(i)
        return out

    def take(self, index: int) -> bool:
        """A sender takes a queued piece. False if it is no longer pending (stale entry)."""
        if index not in self.pending:
            return False
        self.pending.discard(index)
        if self.done[index]:
            return False
        self.inflight.add(index)
        self.sends[index] = self.sends.get(index, 0) + 1
        return True

    def ack(self, index: int) -> bool:
        """A successful acknowledgement. False if the piece was not in flight (stale)."""
        if index not in self.inflight:
            return False
        self.inflight.discard(index)
        self.done[index] = True
        self.failures.pop(index, None)
        if self._resync_acks is not None:
            self._resync_acks.add(index)
        return True

    def fail(self, index: int, *, requeue: bool = True, count: bool = True) -> int:
        """A failed send/ack/timeout. Returns the piece's failure count.

        With ``requeue`` the piece goes back to pending (the caller pushes it on the queue);
        otherwise it returns to waiting and is queued again by the next state poll.
        """
        if index not in self.inflight:
            return self.failures.get(index, 0)
        self.inflight.discard(index)
        n = self.failures.get(index, 0)
        if count:
            n += 1
            self.failures[index] = n
        if requeue and not self.done[index]:
            self.pending.add(index)
        return n

    def give_up(self, index: int) -> None:
        """Stop retrying a piece (repeated hash mismatch): mark it done so finalize runs and
        the destination answers ``incomplete`` instead of the source looping forever."""
        self.inflight.discard(index)
        self.pending.discard(index)
        self.done[index] = True
        self.forced.add(index)

    def requeue(self, index: int) -> None:
        """Put a taken piece back without counting a failure (e.g. shutdown, no connection)."""
        if index in self.inflight:
            self.inflight.discard(index)
            if not self.done[index]:
                self.pending.add(index)


@attrs.frozen(order=True)
class QueueItem:
    cls: int  # LIVE before BACKLOG
    key: int  # within a class: lower first (backlog: tracking order of the torrent)
    seq: int  # then FIFO
    info_hash: str = attrs.field(order=False)
    index: int = attrs.field(order=False)


class PieceQueue:
    """The one queue of pieces to send, shared by all torrents.

    A heap ordered by (class, key, sequence): live pieces before backlog, the backlog of
    torrents the destination has most of first (their tracking order), then FIFO. Entries are
    never removed in place; a piece that was untracked, finalized or taken in the meantime is
    skipped when popped (``is_live`` decides), which keeps removal O(1).
    """

    def __init__(self, is_live: Callable[[QueueItem], bool]) -> None:
        self._heap: list[QueueItem] = []
        self._seq = itertools.count()
        self._is_live = is_live
        self._lot = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, info_hash: str, indices: Iterable[int], cls: int = LIVE, key: int = 0) -> None:
        pushed = False
        for i in indices:
            heapq.heappush(self._heap, QueueItem(cls, key, next(self._seq), info_hash, i))
            pushed = True
        if pushed:
            self._lot.unpark_all()

    def pop_nowait(self) -> QueueItem | None:
        while self._heap:
            item = heapq.heappop(self._heap)
            if self._is_live(item):
                return item
        return None

    async def get(self) -> QueueItem:
        while True:
            item = self.pop_nowait()
            if item is not None:
                return item
            await self._lot.park()

    def compact(self) -> None:
        """Drop stale entries (called rarely, e.g. after untracking a big torrent)."""
        self._heap = [it for it in self._heap if self._is_live(it)]
        heapq.heapify(self._heap)
