"""What a daemon did, kept across restarts: the recent-activity log, totals and throughput.

The status page forgot everything the moment a sync ended; this module remembers it. Each
daemon owns one :class:`ActivityLog`, persisted as ``activity.json`` in its state directory
(see :func:`state_dir` of each role: the source's ``--state-dir``, next to its completion
cache; the destination's ``<data>/.qbsync``). It holds

* the last :data:`MAX_EVENTS` events -- ``synced``, ``handed off``, ``failed`` -- each with the
  torrent's size, how long it took and, where the daemon knows it, the time from "complete on
  the source" to "seeding on the destination";
* totals (bytes moved, torrents synced, handed off and failed) since install and per day
  (local time; the last :data:`KEEP_DAYS` days are kept).

Why one small JSON document rewritten whole: events are rare (one per torrent), the document is
bounded (a few hundred events, tens of KiB), and an atomic rewrite (temp file, fsync, rename,
fsync of the directory) means a crash leaves the old or the new file, never a torn one. The
overwrite replaces only a file this module wrote, with the same content plus one event: its
proof is the in-memory copy loaded from it (or, when it was unreadable, the copy moved aside
first; see :meth:`ActivityLog.load`). The file is mode 0600: it names torrents.

Bad or planted content never stops the daemon: an unreadable, oversized, non-JSON or
wrong-shaped file, or a symlink in its place, is logged (``event=activity_ignored
code=bad-request``) and the log starts empty; single bad events are dropped one by one.

:class:`Throughput` keeps the bytes moved in the last hour in fixed buckets, sampled from the
daemon's byte counter (``qbsync_bytes_sent_total`` / ``qbsync_bytes_received_total``): the data
path stays untouched. It is not persisted (the chart is "the last hour").
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from .. import atomicfile
from ..log import kv
from ..wire.messages import COMPLETED_UNKNOWN

log = logging.getLogger("qbsync.http.activity")

FILE_NAME = "activity.json"
_TMP_NAME = re.compile(r"\.tmp-" + re.escape(FILE_NAME) + r"-[0-9a-f]{8}")
FORMAT = 1
MAX_EVENTS = 200
MAX_FILE_BYTES = 1 << 20  # far above MAX_EVENTS events; a bigger file is not ours
KEEP_DAYS = 8
KINDS = ("synced", "handed off", "failed")


@attrs.frozen
class Event:
    """One finished thing. ``time`` is Unix time; durations are seconds or None (unknown)."""

    time: float
    kind: str  # one of KINDS
    hash: str
    name: str
    size: int
    duration_seconds: float | None = None  # source: tracked -> synced; destination: first
    # piece -> finalized (synced) or start -> seeding (handed off)
    # From complete on the source to this event: handed off = to seeding on the destination;
    # synced = to verified and seeding-ready (stopped) on the destination. None: unknown.
    since_complete_seconds: float | None = None
    code: str | None = None  # failed: the stable error code
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "time": round(self.time, 3),
            "kind": self.kind,
            "hash": self.hash,
            "name": self.name,
            "size": self.size,
            "duration_seconds": _round(self.duration_seconds),
            "since_complete_seconds": _round(self.since_complete_seconds),
            "code": self.code,
            "message": self.message[:300],
        }

    @classmethod
    def from_json(cls, raw: Any) -> Event:
        """Raises ValueError for anything that is not an event this module wrote."""
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        kind = raw.get("kind")
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        code = raw.get("code")
        return cls(
            time=_num(raw.get("time")),
            kind=str(kind),
            hash=_str(raw.get("hash"), 64),
            name=_str(raw.get("name"), 1000),
            size=int(_num(raw.get("size"))),
            duration_seconds=_opt(raw.get("duration_seconds")),
            since_complete_seconds=_opt(raw.get("since_complete_seconds")),
            code=None if code is None else _str(code, 64),
            message=_str(raw.get("message", ""), 300),
        )


@attrs.define
class Totals:
    bytes: int = 0
    synced: int = 0
    handed_off: int = 0
    failed: int = 0

    def add(self, e: Event) -> None:
        if e.kind == "synced":
            self.synced += 1
            self.bytes += e.size
        elif e.kind == "handed off":
            self.handed_off += 1
        else:
            self.failed += 1

    def to_json(self) -> dict[str, int]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> Totals:
        if not isinstance(raw, dict):
            raise ValueError("totals: not an object")
        return cls(**{f.name: max(0, int(_num(raw.get(f.name, 0)))) for f in attrs.fields(cls)})


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"not a number: {v!r}")
    return float(v)


def _opt(v: Any) -> float | None:
    return None if v is None else _num(v)


def _str(v: Any, limit: int) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise ValueError("not a short string")
    return v


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def completed_ms_ago(completed_at: float | None, now: float) -> int:
    """``completed_ms_ago`` for a Finalize or StartTorrent (see
    ``qbsync.wire.messages.COMPLETED_UNKNOWN``): milliseconds from ``completed_at`` (Unix time
    qBittorrent finished the download, on this machine's clock) to ``now``. Unknown when
    qBittorrent does not know (0, -1) or gives a time after ``now`` (older versions report
    2**32 - 1 for "never")."""
    if completed_at is None or completed_at <= 0 or completed_at > now:
        return COMPLETED_UNKNOWN
    return round((now - completed_at) * 1000)


def since_complete(ms_ago: int, elapsed: float) -> float | None:
    """Seconds from "complete on the source" to now, for the destination: the source's
    ``completed_ms_ago`` when it asked, plus ``elapsed`` here since then. None when unknown."""
    if ms_ago < 0:
        return None
    return ms_ago / 1000 + max(elapsed, 0.0)


def day_of(t: float) -> str:
    """The local calendar day of Unix time ``t`` (what "today" means to the person looking)."""
    return time.strftime("%Y-%m-%d", time.localtime(t))


class ActivityLog:
    """The bounded event log and totals of one daemon. ``directory`` None: kept in memory only
    (dry run, unit tests without a disk). ``throughput``, when given, is saved with the log
    (at each event and by :meth:`save` at shutdown) and its last hour restored by
    :meth:`load`, so the chart survives a restart."""

    def __init__(
        self,
        directory: Path | None,
        *,
        wall: Callable[[], float] = time.time,
        throughput: Throughput | None = None,
    ) -> None:
        self.directory = directory
        self._wall = wall
        self.throughput = throughput
        self.events: list[Event] = []  # oldest first
        self.total = Totals()
        self.days: dict[str, Totals] = {}
        self.since = wall()  # "since install": the first time this log was written
        self._lock = trio.Lock()

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / FILE_NAME

    def load(self) -> None:
        """Read the file (blocking; call at startup). Anything wrong is logged and ignored."""
        path = self.path
        if path is None:
            return
        self._drop_leftovers()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as exc:  # a symlink planted in its place (ELOOP), permissions, ...
            self._ignored(path, f"cannot open: {exc.strerror or exc}")
            return
        try:
            with os.fdopen(fd, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            self._ignored(path, f"cannot read: {exc.strerror or exc}")
            return
        if len(raw) > MAX_FILE_BYTES:
            self._ignored(path, f"larger than {MAX_FILE_BYTES} bytes")
            return
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError(f"not a format-{FORMAT} activity document")
            total = Totals.from_json(doc.get("total"))
            days_raw = doc.get("days")
            if not isinstance(days_raw, dict):
                raise ValueError("days: not an object")
            days = {str(k)[:10]: Totals.from_json(v) for k, v in days_raw.items()}
            since = _num(doc.get("since"))
            events_raw = doc.get("events")
            if not isinstance(events_raw, list):
                raise ValueError("events: not a list")
            buckets_raw = doc.get("throughput", {})
            if not isinstance(buckets_raw, dict):
                raise ValueError("throughput: not an object")
            cutoff = self._wall() - HOUR - BUCKET_SECONDS
            buckets = {int(k): max(0.0, _num(v)) for k, v in buckets_raw.items()}
            buckets = {k: v for k, v in buckets.items() if k >= cutoff}
        except (ValueError, TypeError) as exc:
            self._ignored(path, str(exc))
            return
        events = []
        dropped = 0
        for item in events_raw[-MAX_EVENTS:]:
            try:
                events.append(Event.from_json(item))
            except (ValueError, TypeError):
                dropped += 1
        if dropped:
            log.warning(
                "event=activity_events_ignored code=bad-request path=%s dropped=%d",
                kv(str(path)),
                dropped,
            )
        self.events, self.total, self.days, self.since = events, total, days, since
        if self.throughput is not None:
            self.throughput.restore(buckets)

    def _drop_leftovers(self) -> None:
        """Remove temp files of writes a crash interrupted. Proof they are ours and hold
        nothing to keep: the name is the one :func:`_write_private` makes (``.tmp-`` + this
        file's name + 8 hex digits), it is a regular file (never followed), and a write that
        never reached its rename was not committed: the log is the old ``activity.json``."""
        assert self.directory is not None
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return
        for entry in entries:
            if not _TMP_NAME.fullmatch(entry.name):
                continue
            try:
                if stat.S_ISREG(entry.lstat().st_mode):
                    entry.unlink()
                    log.info("event=activity_leftover_removed path=%s", kv(str(entry)))
            except OSError:
                continue

    def _ignored(self, path: Path, why: str) -> None:
        log.warning(
            "event=activity_ignored code=bad-request path=%s error=%s action=%s",
            kv(str(path)),
            kv(why),
            kv("starting an empty activity log; the file is replaced at the next event"),
        )

    async def record(self, event: Event) -> None:
        """Remember ``event`` and persist (in a thread). A failed write is logged, never
        raised: the activity log is for people, the sync goes on."""
        async with self._lock:
            self.events.append(event)
            del self.events[:-MAX_EVENTS]
            self.total.add(event)
            day = day_of(event.time)
            self.days.setdefault(day, Totals()).add(event)
            for old in sorted(self.days)[:-KEEP_DAYS]:
                del self.days[old]
            await self._persist()

    async def save(self) -> None:
        """Persist now (at shutdown: the throughput buckets since the last event). Nothing to
        keep -- no event, no bucket -- writes nothing."""
        if not self.events and not (self.throughput is not None and self.throughput.buckets):
            return
        async with self._lock:
            await self._persist()

    async def _persist(self) -> None:
        if self.directory is None:
            return
        data = json.dumps(self._document(), separators=(",", ":")).encode()
        try:
            await trio.to_thread.run_sync(_write_private, self.directory, FILE_NAME, data)
        except OSError as exc:
            log.warning(
                "event=activity_write_failed code=io path=%s error=%s",
                kv(str(self.path)),
                kv(exc.strerror or str(exc)),
            )

    def _document(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "since": round(self.since, 3),
            "total": self.total.to_json(),
            "days": {k: v.to_json() for k, v in sorted(self.days.items())},
            "events": [e.to_json() for e in self.events],
            "throughput": {
                str(k): round(v)
                for k, v in sorted((self.throughput.buckets if self.throughput else {}).items())
            },
        }

    def status(self, limit: int = 25) -> dict[str, Any]:
        """The ``activity`` object of ``/status``: newest events first, and the totals."""
        today = self.days.get(day_of(self._wall()), Totals())
        return {
            "recent": [e.to_json() for e in reversed(self.events[-limit:])],
            "totals": {
                "today": today.to_json(),
                "all": self.total.to_json(),
                "since": round(self.since, 3),
            },
        }


def _write_private(directory: Path, name: str, data: bytes) -> None:
    """Atomic write of a mode-0600 file (temp file, fsync, rename, fsync of the directory).

    Not :func:`qbsync.destination.durable.atomic_write`: that one sits in a higher layer and
    adds the state tree's authentication tag. The rename replaces whatever is at ``name`` -- a
    planted symlink included -- never what it points to."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomicfile.replace_in(directory, name, data)


# ---------------------------------------------------------------------------------------------
# Throughput of the last hour.

BUCKET_SECONDS = 30
HOUR = 3600
SAMPLE_INTERVAL = 5.0


class Throughput:
    """Bytes moved per :data:`BUCKET_SECONDS` over the last hour, from a growing counter.

    :meth:`observe` takes the counter's current value; the increase since the previous
    observation is credited to the bucket of ``now``. A counter that goes backwards (a
    process-global registry reset in tests) restarts the baseline. ``counter``, when given,
    is read by :meth:`status` too, so the chart's last bucket is current when someone looks."""

    def __init__(self, counter: Callable[[], float] | None = None) -> None:
        self.counter = counter
        self._last: float | None = None
        self._started: float | None = None  # first observation: the current bucket's age
        self.buckets: dict[int, float] = {}  # bucket start (Unix s) -> bytes

    def restore(self, buckets: Mapping[int, float]) -> None:
        """Buckets saved before a restart: counting covers them (the current bucket's rate is
        then over its whole elapsed part, not only since this start)."""
        self.buckets.update(buckets)
        if buckets:
            first = float(min(buckets))
            self._started = first if self._started is None else min(self._started, first)

    def observe(self, now: float, total: float) -> None:
        last, self._last = self._last, total
        if self._started is None:
            self._started = now
        if last is None or total < last:
            return
        key = int(now // BUCKET_SECONDS) * BUCKET_SECONDS
        self.buckets[key] = self.buckets.get(key, 0.0) + (total - last)
        cutoff = now - HOUR - BUCKET_SECONDS
        for k in [k for k in self.buckets if k < cutoff]:
            del self.buckets[k]

    def status(self, now: float) -> dict[str, Any]:
        """The ``throughput`` object of ``/status``: one rate per bucket of the last hour,
        oldest first, in bytes per second (zero buckets included, so the chart's x axis is
        time). The current bucket's rate is over the part of it that has passed."""
        if self.counter is not None:
            self.observe(now, self.counter())
        end = int(now // BUCKET_SECONDS) * BUCKET_SECONDS
        start = end - HOUR + BUCKET_SECONDS
        rates = [
            round(self.buckets.get(k, 0.0) / BUCKET_SECONDS, 1)
            for k in range(start, end, BUCKET_SECONDS)
        ]
        elapsed = max(1.0, now - max(end, self._started or end))
        rates.append(round(self.buckets.get(end, 0.0) / min(BUCKET_SECONDS, elapsed), 1))
        moved = sum(v for k, v in self.buckets.items() if k >= start)
        since = min(
            [*self.buckets, *([self._started] if self._started is not None else [])], default=None
        )
        return {
            "bucket_seconds": BUCKET_SECONDS,
            "end": end,
            "since": None if since is None else round(since, 3),
            "bytes": int(moved),
            "bytes_per_second": rates,
        }


async def sample_forever(throughput: Throughput, *, wall: Callable[[], float] = time.time) -> None:
    """The daemon's sampler task: feed :class:`Throughput` its counter every
    :data:`SAMPLE_INTERVAL`, so the chart has every bucket even while nobody looks."""
    assert throughput.counter is not None
    while True:
        throughput.observe(wall(), throughput.counter())
        await trio.sleep(SAMPLE_INTERVAL)


def counter_value(name: str, labels: Mapping[str, str] | None = None) -> Callable[[], float]:
    """A reader of one Prometheus counter sample of the daemon's registry."""
    from .. import metrics

    def read() -> float:
        return float(metrics.REGISTRY.get_sample_value(name, dict(labels or {})) or 0.0)

    return read
