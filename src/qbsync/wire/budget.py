"""The destination's global budget of in-memory piece bytes (``--max-stream-buffer``).

One :class:`ByteBudget` is shared by every connection :func:`~qbsync.wire.serve` accepts: a
piece's size is charged *before* its body is read and released once its handler returns, so
memory is bounded by configuration however many sources push at once.
"""

from __future__ import annotations

import collections
from typing import Any

import trio

from .hooks import NO_HOOKS, WireHooks


class ByteBudget:
    """The destination's global budget of piece bytes held in memory (``--max-stream-buffer``),
    shared by every connection.

    A FIFO byte semaphore: waiters are served strictly in arrival order, so a large piece is not
    starved by a stream of small ones. A request larger than :attr:`limit` is charged as
    :attr:`limit` (it then waits for the budget to be completely free), so any single piece up
    to the protocol maximum can make progress; memory stays bounded by ``max(limit, largest
    piece)``.

    It also recycles piece buffers (:meth:`take_buffer` / :meth:`recycle`). Allocating a fresh
    multi-MiB ``bytearray`` per piece costs a page fault per 4 KiB and a zero-fill, which
    measured at ~3x the cost of receiving the bytes; reusing buffers of the same size (pieces of
    a torrent all have one size) removes that. Pooled buffers count against the limit too
    (``used + pooled <= limit``, the pool is trimmed as charges grow) and the pool is capped at
    :data:`POOL_MAX` so an idle daemon does not sit on a burst's worth of memory.
    """

    POOL_MAX = 64 * 1024 * 1024

    def __init__(self, limit: int, *, hooks: WireHooks = NO_HOOKS) -> None:
        if limit <= 0:
            raise ValueError("the byte budget must be positive")
        self.limit = limit
        self.used = 0  # bytes of received-but-not-yet-handled piece payload
        self.peak = 0  # high-water mark of ``used`` (for tests and the benchmark)
        self.pooled = 0  # bytes of idle buffers kept for reuse
        self._pool: dict[int, list[bytearray]] = {}
        self._pool_max = min(self.POOL_MAX, limit // 4)
        self._waiters: collections.deque[list[Any]] = collections.deque()
        self._hooks = hooks
        hooks.buffer_limit(limit)

    def take_buffer(self, nbytes: int) -> bytearray:
        """A buffer of exactly ``nbytes`` (recycled if possible; contents are undefined)."""
        free = self._pool.get(nbytes)
        if free:
            self.pooled -= nbytes
            buf = free.pop()
            if not free:
                del self._pool[nbytes]
            return buf
        return bytearray(nbytes)

    def recycle(self, buf: bytearray) -> None:
        """Offer a buffer nobody references any more back for reuse (call before releasing its
        charge)."""
        n = len(buf)
        if n and self.pooled + n <= self._pool_max and self.pooled + self.used <= self.limit:
            self._pool.setdefault(n, []).append(buf)
            self.pooled += n

    def _trim_pool(self) -> None:
        while self._pool and self.pooled + self.used > self.limit:
            size = next(iter(self._pool))
            free = self._pool[size]
            free.pop()
            self.pooled -= size
            if not free:
                del self._pool[size]

    def charge_for(self, nbytes: int) -> int:
        return min(nbytes, self.limit)

    @property
    def available(self) -> int:
        return self.limit - self.used

    async def acquire(self, nbytes: int) -> int:
        """Wait until ``nbytes`` (capped at :attr:`limit`) fit, take them, and return the
        amount actually charged: pass exactly that to :meth:`release`."""
        charge = self.charge_for(nbytes)
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._waiters and self.used + charge <= self.limit:
            # Fast path without a scheduler round trip: the caller's next step is I/O (a
            # checkpoint), and this runs once per piece.
            self._take(charge)
            return charge
        entry: list[Any] = [charge, trio.Event()]
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():  # granted just as we were cancelled: give it back
                self.release(charge)
            else:
                self._waiters.remove(entry)
                self._wake()
            raise
        return charge

    def release(self, charge: int) -> None:
        if not 0 <= charge <= self.used:
            raise ValueError(f"releasing {charge} bytes with {self.used} in use")
        self.used -= charge
        self._hooks.buffer_used(self.used)
        self._wake()

    def _take(self, charge: int) -> None:
        self.used += charge
        self.peak = max(self.peak, self.used)
        self._trim_pool()
        self._hooks.buffer_used(self.used)

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            charge, event = self._waiters.popleft()
            self._take(charge)
            event.set()
