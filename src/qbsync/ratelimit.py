"""Pure timing helpers: the global token bucket, the ``--rate-limit`` timetable and the
reconnect backoff.

They take the current time as an argument (or an injected clock) instead of reading one, so
they can be tested without sleeping; the async callers pass ``trio.current_time()``.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Callable

import attrs

MiB = 1024 * 1024
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MINUTES_PER_DAY = 24 * 60

log = logging.getLogger("qbsync.ratelimit")


class TokenBucket:
    """``--rate-limit``: a token bucket over piece payload bytes, shared by every sender.

    Tokens accrue at ``rate`` bytes/s up to ``burst``. :meth:`reserve` takes ``n`` tokens at
    once and may drive the balance negative ("debt"); the caller then sleeps for the returned
    delay. Debt makes a piece larger than the burst work without chunking, keeps callers in
    FIFO order (each reservation waits behind the debt of earlier ones) and keeps the long-run
    rate exact.
    """

    def __init__(self, rate: float, burst: float = MiB, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(max(burst, 1))
        self.tokens = self.burst
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
            self._last = now

    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` tokens; return how long to wait before using them (0 if available)."""
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@attrs.frozen
class RateSchedule:
    """An rclone-style bandwidth timetable: ``"08:00,10M 23:00,off"``.

    Space-separated ``HH:MM,RATE`` entries, each in force from its time until the next one
    (the last one carries over midnight to the first). ``RATE`` is a byte count per second with
    an optional binary suffix (``512K``, ``10M``, ``1.5G``); ``off`` or ``0`` means unlimited.
    With a weekday in front of every entry (``Mon-08:00,10M Sat-00:00,off``) the table spans
    a week instead of a day. Times are the daemon's local time (set ``TZ`` in a container).

    ``entries`` holds ``(minute of the day or of the week, bytes/s)`` sorted by time.
    """

    entries: tuple[tuple[int, int], ...]
    weekly: bool
    text: str

    @classmethod
    def parse(cls, raw: str, parse_rate: Callable[[str], int]) -> RateSchedule:
        items = raw.split()
        if not items:
            raise ValueError("empty timetable")
        entries: dict[int, int] = {}
        weekly_flags = set()
        for item in items:
            when, sep, rate_text = item.partition(",")
            if not sep:
                raise ValueError(f"timetable entry {item!r} is not TIME,RATE (e.g. 08:00,10M)")
            day = 0
            weekly = "-" in when
            weekly_flags.add(weekly)
            if weekly:
                day_text, _, when = when.partition("-")
                if day_text.lower()[:3] not in DAYS or len(day_text) < 3:
                    raise ValueError(f"unknown weekday {day_text!r} in {item!r} (Mon..Sun)")
                day = DAYS.index(day_text.lower()[:3])
            hh, colon, mm = when.partition(":")
            if not (colon and hh.isdigit() and mm.isdigit() and len(mm) == 2 and len(hh) <= 2):
                raise ValueError(f"bad time {when!r} in {item!r} (use HH:MM)")
            hour, minute = int(hh), int(mm)
            if hour > 23 or minute > 59:
                raise ValueError(f"bad time {when!r} in {item!r} (00:00..23:59)")
            rate = parse_rate(rate_text)
            if rate < 0:
                raise ValueError(f"negative rate in {item!r}")
            key = day * MINUTES_PER_DAY + hour * 60 + minute
            if key in entries:
                raise ValueError(f"time {when!r} listed twice")
            entries[key] = rate
        if len(weekly_flags) > 1:
            raise ValueError("either every timetable entry names a weekday or none does")
        return cls(tuple(sorted(entries.items())), weekly_flags == {True}, " ".join(items))

    def rate_at(self, when: dt.datetime) -> int:
        """Bytes/s in force at local time ``when`` (0 = unlimited)."""
        key = when.hour * 60 + when.minute
        if self.weekly:
            key += when.weekday() * MINUTES_PER_DAY
        rate = self.entries[-1][1]  # before the first entry: the last one carries over
        for start, value in self.entries:
            if start > key:
                break
            rate = value
        return rate

    def __str__(self) -> str:
        return self.text


class ScheduledLimiter:
    """The senders' limiter for a timetable: a :class:`TokenBucket` whose rate follows the
    schedule. ``wall`` returns local time (injected in tests); ``reserve`` keeps the bucket's
    interface so the senders do not care which kind they have."""

    def __init__(
        self,
        schedule: RateSchedule,
        burst: float = MiB,
        wall: Callable[[], dt.datetime] = dt.datetime.now,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.schedule = schedule
        self.burst = burst
        self.wall = wall
        self.on_change = on_change
        self.rate: int | None = None  # in force now; None until the first reserve
        self.bucket: TokenBucket | None = None

    def reserve(self, n: int, now: float) -> float:
        rate = self.schedule.rate_at(self.wall())
        if rate != self.rate:
            self.rate = rate
            # A new period starts with a fresh bucket: debt from a slow period is forgiven
            # and a fast period does not inherit a slow one's queue.
            self.bucket = TokenBucket(rate, self.burst, now) if rate > 0 else None
            if self.on_change is not None:
                self.on_change(rate)
        return 0.0 if self.bucket is None else self.bucket.reserve(n, now)


def make_limiter(
    rate_limit: int | RateSchedule, wall: Callable[[], dt.datetime] = dt.datetime.now
) -> TokenBucket | ScheduledLimiter | None:
    """The senders' limiter for ``--rate-limit``: None (unlimited), a fixed token bucket, or a
    timetable-driven one (which logs and exports each change of rate)."""
    if isinstance(rate_limit, RateSchedule):
        return ScheduledLimiter(rate_limit, MiB, wall, _rate_changed)
    from . import metrics

    metrics.rate_limit.set(rate_limit)
    return TokenBucket(rate_limit, MiB) if rate_limit > 0 else None


def _rate_changed(rate: int) -> None:
    from . import metrics

    metrics.rate_limit.set(rate)
    log.info(
        "event=rate_limit_changed bytes_per_second=%d unlimited=%s", rate, str(rate == 0).lower()
    )


class Backoff:
    """Jittered exponential backoff for reconnects; it *does* reset
    (docs/design-decisions.md#reconnect-backoff-resets).

    ``next_delay()`` returns base, 2*base, 4*base ... capped at ``maximum``, each multiplied
    by a random factor in [1 - jitter, 1 + jitter] (and never above ``maximum``). Callers call
    :meth:`reset` after a healthy period, so one failure days later starts again at ``base``.
    """

    def __init__(
        self,
        base: float,
        maximum: float,
        *,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        self.base = base
        self.maximum = max(maximum, base)
        self.jitter = jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        raw = min(self.maximum, self.base * 2.0 ** min(self.failures, 30))
        self.failures += 1
        factor = 1 + self._rng.uniform(-self.jitter, self.jitter)
        return min(self.maximum, raw * factor)

    def reset(self) -> None:
        self.failures = 0
