"""What a daemon is doing, at a glance: the ``/status`` document, the ``/`` page, ``qbsync status``.

One model, three views. Each runner builds a :class:`StatusBuilder` and hands the HTTP server a
provider that returns :meth:`StatusBuilder.document`; the JSON at ``/status`` is that document,
the HTML at ``/`` renders it on the server (no script, no external asset, refreshing itself),
and ``qbsync status`` fetches it and prints a table. The schema is documented in
``docs/status.md``; :data:`SCHEMA_VERSION` changes only when a field changes meaning or goes
away (new fields may appear at any time).

Why rates and ETAs are computed here, from successive status requests, instead of in the data
path: the senders and the writer stay untouched, and a rate is only interesting while someone
looks. The first request after a quiet period therefore reports ``null`` for rate and ETA.

The ``source_*`` and ``destination_*`` accessor functions read the existing state objects
(registry, pool, store, budget) without changing them.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

import attrs

from .. import __version__, metrics
from ..interrupt import interruptible

SCHEMA_VERSION = 2  # 2: torrent ``state`` holds the user-facing words of :data:`STATES`
RATE_WINDOW = 30.0  # seconds of samples a rate is averaged over
REFRESH_SECONDS = 5  # the HTML page reloads itself this often


@attrs.frozen
class ErrorInfo:
    """The last error of a torrent or daemon: a stable code (see ``wire/errors.py``), a message
    and when it happened (Unix time)."""

    code: str
    message: str
    time: float

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message[:300], "time": round(self.time, 3)}


@attrs.frozen
class TorrentStatus:
    hash: str
    name: str
    size: int  # bytes of the torrent (selected files only on the source)
    pieces_total: int
    pieces_streamed: int  # sent (source) or received and written (destination)
    pieces_verified: int  # SHA-1 checked on the destination
    state: str
    last_error: ErrorInfo | None = None
    extra: Mapping[str, Any] = attrs.field(factory=dict)  # role-specific details, kept as is


@attrs.frozen
class DaemonStatus:
    connections: int  # authenticated wire connections
    queue: int  # source: pieces waiting to be sent; destination: pieces being written
    budget_used_bytes: int  # piece bytes held in memory now
    budget_limit_bytes: int
    peer: str = ""  # source: the destination's address; destination: listen ports
    last_error: ErrorInfo | None = None


class _Rate:
    """Bytes verified over the last :data:`RATE_WINDOW` seconds of observations."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def observe(self, now: float, value: int) -> float | None:
        s = self.samples
        if s and value < s[-1][1]:  # went backwards (a resync): start over
            s.clear()
        s.append((now, value))
        while len(s) > 2 and now - s[1][0] >= RATE_WINDOW:
            s.popleft()
        span = now - s[0][0]
        if span < 1.0:
            return None
        return max(0.0, (value - s[0][1]) / span)


class StatusBuilder:
    """Turns the role's state into the ``/status`` document. ``clock`` is monotonic seconds."""

    def __init__(self, role: str, *, clock: Any = time.monotonic, wall: Any = time.time) -> None:
        self.role = role
        self._clock = clock
        self._wall = wall
        self.started = clock()
        self._rates: dict[str, _Rate] = {}

    def document(
        self,
        daemon: DaemonStatus,
        torrents: Iterable[TorrentStatus],
        legacy: Mapping[str, Any] | None = None,
        *,
        sections: Sections | None = None,
    ) -> dict[str, Any]:
        """The schema-``SCHEMA_VERSION`` document; ``legacy`` keys (the fields earlier versions
        served) are kept at the top level so existing consumers keep working; ``sections``
        are the dashboard's parts (activity, totals, throughput, disk, peers, candidates)."""
        now = self._clock()
        items = []
        seen = set()
        for t in torrents:
            seen.add(t.hash)
            items.append(self._torrent(t, now))
        for h in list(self._rates):
            if h not in seen:
                del self._rates[h]
        doc: dict[str, Any] = dict(legacy or {})
        doc.update(
            {
                "schema": SCHEMA_VERSION,
                "role": self.role,
                "version": __version__,
                "time": round(self._wall(), 3),
                "daemon": {
                    "uptime_seconds": round(now - self.started, 1),
                    "connections": daemon.connections,
                    "queue": daemon.queue,
                    "budget_used_bytes": daemon.budget_used_bytes,
                    "budget_limit_bytes": daemon.budget_limit_bytes,
                    "peer": daemon.peer,
                    "last_error": daemon.last_error.to_json() if daemon.last_error else None,
                },
                "torrents": items,
            }
        )
        doc.update((sections or Sections()).to_json(self._wall()))
        return doc

    def _torrent(self, t: TorrentStatus, now: float) -> dict[str, Any]:
        piece = t.size / t.pieces_total if t.pieces_total else 0.0
        verified_bytes = min(t.size, round(t.pieces_verified * piece))
        rate = self._rates.setdefault(t.hash, _Rate()).observe(now, verified_bytes)
        remaining = t.size - verified_bytes
        eta: float | None
        if remaining <= 0:
            eta = 0.0
        elif rate:
            eta = round(remaining / rate, 1)
        else:
            eta = None
        out = dict(t.extra)
        out.update(
            {
                "hash": t.hash,
                "name": t.name,
                "size": t.size,
                "pieces_total": t.pieces_total,
                "pieces_streamed": t.pieces_streamed,
                "pieces_verified": t.pieces_verified,
                "rate_bytes_per_second": None if rate is None else round(rate, 1),
                "eta_seconds": eta,
                "state": t.state,
                "last_error": t.last_error.to_json() if t.last_error else None,
            }
        )
        return out


@attrs.frozen
class Peer:
    """A connected peer as the user sees it: where it is and who it says it is.

    ``fingerprint`` is the peer's admitted identity key (``SHA256:...``); ``auth`` says what
    admitted it: ``key + token`` (its key, proved, and the shared token) or ``key`` (its
    key, pinned or listed with ``--peer-fingerprint``)."""

    address: str
    role: str  # the peer's role: "destination" (on a source) or "source"
    connections: int
    since: float | None = None  # Unix time its oldest open connection was established
    software: str = ""
    auth: str = "key"
    tls: bool = False
    fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "role": self.role,
            "connections": self.connections,
            "since": None if self.since is None else round(self.since, 3),
            "software": self.software,
            "auth": self.auth,
            "tls": self.tls,
            "fingerprint": self.fingerprint,
        }


@attrs.frozen
class Sections:
    """The dashboard's parts of the document, each optional (unknown = omitted as null)."""

    activity: Any = None  # an ActivityLog
    throughput: Any = None  # a Throughput
    peers: Sequence[Peer] = ()
    free_bytes: int | None = None  # free space where the daemon's data lives
    min_space_bytes: int | None = None  # source: --min-space
    handoff_candidates: Sequence[Mapping[str, Any]] = ()

    def to_json(self, now: float) -> dict[str, Any]:
        activity = (
            self.activity.status() if self.activity is not None else {"recent": [], "totals": None}
        )
        return {
            "activity": activity,
            "throughput": self.throughput.status(now) if self.throughput is not None else None,
            "peers": [p.to_json() for p in self.peers],
            "disk": {"free_bytes": self.free_bytes, "min_space_bytes": self.min_space_bytes},
            "handoff_candidates": [dict(c) for c in self.handoff_candidates],
        }


# The words a torrent's ``state`` may hold, in /status, on the page and in ``qbsync status``:
# what a user sees happen, not the internal phase. One place maps each role's fields to them
# (:func:`source_state`, :func:`destination_state`); the activity log adds the finished ones.
STATES = (
    "waiting",  # source: nothing to send now (no connection to the destination, or queued)
    "downloading + streaming",  # source: qBittorrent still downloads; done pieces stream
    "streaming",  # source: downloaded; pieces stream; destination: pieces arrive
    "verifying",  # destination checks the copy (qBittorrent recheck, or scanning files found)
    "finalizing",  # every piece is there; the destination renames and adds it to qBittorrent
    "retrying",  # a finalize attempt failed; it is retried
)
FINISHED_STATES = ("seeding on destination", "handed off", "failed")  # activity kinds, shown


def source_state(t: Any, info: Mapping[str, Any] | None, connected: bool) -> str:
    """The user-facing state of a source ``Tracked`` (see :data:`STATES`); ``info`` is
    qBittorrent's entry for it (None when unknown). The words come from the tracked torrent's
    own phase (``source.state.Tracked.status_label``); this only says whether qBittorrent
    still downloads it."""
    progress = float((info or {}).get("progress") or 0.0)
    return str(t.status_label(downloading=info is not None and progress < 1.0, connected=connected))


def destination_state(phase: str) -> str:
    """The user-facing state of a destination torrent phase (``destination.state.Phase``)."""
    return {
        "active": "streaming",
        "scanning": "verifying",
        "finalizing": "finalizing",
        "closed": "finalizing",
    }.get(phase, phase)


# ---------------------------------------------------------------------------------------------
# Accessors: read the runners' existing state objects.


def _gauge(name: str, labels: Mapping[str, str] | None = None) -> int:
    value = metrics.REGISTRY.get_sample_value(name, dict(labels or {}))
    return int(value or 0)


def _error(value: Any) -> ErrorInfo | None:
    """``(code, message)`` or ``(code, message, time)`` as the state objects keep them."""
    if not value:
        return None
    code, message, *rest = value
    return ErrorInfo(str(code), str(message), float(rest[0]) if rest else time.time())


def source_torrents(
    registry: Any,
    infos: Mapping[str, Mapping[str, Any]] | None = None,
    connected: bool = True,
) -> list[TorrentStatus]:
    """Tracked torrents of a source ``Registry``: verified = acknowledged by the destination
    (it acknowledges a piece only after its SHA-1 matched); streamed = verified + in flight.
    ``infos``: qBittorrent's entries by hash (the monitor's), for the state's words."""
    out = []
    for t in sorted(registry.all(), key=lambda t: t.seq):
        tr = t.tracker
        state = source_state(t, (infos or {}).get(t.info_hash), connected)
        out.append(
            TorrentStatus(
                hash=t.info_hash,
                name=t.name,
                size=int(t.meta.selected_size),
                pieces_total=tr.num_pieces - len(tr.mask),
                pieces_streamed=tr.done_count - len(tr.mask) + len(tr.inflight),
                pieces_verified=tr.done_count - len(tr.mask),
                state=state,
                last_error=_error(getattr(t, "last_error", None)),
            )
        )
    return out


def source_daemon(pool: Any, registry: Any, senders: Any | None) -> DaemonStatus:
    budget = getattr(senders, "budget", None)
    return DaemonStatus(
        connections=int(pool.connected),
        queue=len(registry.queue),
        budget_used_bytes=int(budget.used) if budget is not None else 0,
        budget_limit_bytes=int(budget.limit) if budget is not None else 0,
        peer=str(pool.address),
        last_error=_error(pool.last_error),
    )


def destination_torrents(store: Any) -> list[TorrentStatus]:
    """Unfinished torrents of a destination ``Store``: streamed = written; verified = written
    minus boundary pieces whose SHA-1 could not be checked yet (they wait for a neighbour)."""
    out = []
    for state in list(store.torrents.values()):
        written = state.written.count()
        out.append(
            TorrentStatus(
                hash=state.info_hash,
                name=state.meta.name,
                size=int(state.geometry.total_size),
                pieces_total=int(state.num_pieces),
                pieces_streamed=written,
                pieces_verified=written - state.unverified.count(),
                state=destination_state(state.phase.value),
                last_error=_error(getattr(state, "last_error", None)),
            )
        )
    return out


def source_peers(pool: Any, *, auth: str, tls: bool) -> list[Peer]:
    """The destination a source's pool is connected to (one entry: every connection goes to
    ``--destination-addr``), with what its handshake told us."""
    conns = list(pool.connections())
    if not conns:
        return []
    software = next((str(c.peer_software) for c in conns if getattr(c, "peer_software", "")), "")
    key = next((str(c.peer_fingerprint) for c in conns if getattr(c, "peer_fingerprint", "")), "")
    return [
        Peer(
            address=str(pool.address),
            role="destination",
            connections=len(conns),
            since=getattr(pool, "connected_since", None),
            software=software,
            auth=auth,
            tls=tls,
            fingerprint=key or None,
        )
    ]


def destination_peers(open_peers: Any) -> list[Peer]:
    """The sources connected to a destination (``wire.OpenPeers``), one entry per source: its
    connections come from different ports of one address and prove the same key (two sources
    behind one NAT address are told apart by their keys)."""
    by_source: dict[tuple[str, str], list[Any]] = {}
    for p in open_peers.all():
        host = str(p.peer.address).rpartition(":")[0] or str(p.peer.address)
        key = str(getattr(p.peer, "fingerprint", "") or "")
        by_source.setdefault((host, key), []).append(p)
    return [
        Peer(
            address=host,
            role="source",
            connections=len(ps),
            since=min(p.opened for p in ps),
            software=str(ps[0].software),
            auth="key + token" if ps[0].auth else "key",
            tls=bool(ps[0].tls),
            fingerprint=key or None,
        )
        for (host, key), ps in sorted(by_source.items())
    ]


def free_bytes(path: Any) -> int | None:
    """Free space for unprivileged writers on the filesystem holding ``path``."""
    import os

    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return int(st.f_bavail * st.f_frsize)


def destination_daemon(
    budget: Any, ports: Sequence[int], peers: Sequence[Peer] = ()
) -> DaemonStatus:
    """``peer`` names the connected sources; only while none is connected does it say where
    the destination listens."""
    if peers:
        peer = ", ".join(p.address for p in peers)
    elif ports:
        peer = "no source connected; listening on " + ",".join(str(p) for p in ports)
    else:
        peer = ""
    return DaemonStatus(
        connections=_gauge("qbsync_wire_connections", {"role": "destination"}),
        queue=_gauge("qbsync_write_workers_busy"),
        budget_used_bytes=int(budget.used),
        budget_limit_bytes=int(budget.limit),
        peer=peer,
    )


def merge_legacy_torrents(doc: dict[str, Any], legacy: Sequence[Mapping[str, Any]]) -> None:
    """Keep the destination's earlier per-torrent fields inside the new torrent entries."""
    by_hash = {t.get("hash"): t for t in legacy}
    for t in doc["torrents"]:
        for k, v in by_hash.get(t["hash"], {}).items():
            t.setdefault(k, v)


# ---------------------------------------------------------------------------------------------
# Formatting shared by the page and the table.


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _pct(done: int, total: int) -> float:
    return 100.0 * done / total if total else 100.0


def _rows(doc: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for t in doc.get("torrents") or []:
        total = int(t.get("pieces_total") or 0)
        err = t.get("last_error")
        rows.append(
            {
                "name": str(t.get("name", "")),
                "hash": str(t.get("hash", ""))[:12],
                "size": human_bytes(t.get("size")),
                "streamed": f"{t.get('pieces_streamed', 0)}/{total}",
                "verified": f"{t.get('pieces_verified', 0)}/{total}",
                "pct": f"{_pct(int(t.get('pieces_verified') or 0), total):.1f}%",
                "rate": human_bytes(t.get("rate_bytes_per_second")) + "/s"
                if t.get("rate_bytes_per_second") is not None
                else "-",
                "eta": human_seconds(t.get("eta_seconds")),
                "state": str(t.get("state", "")),
                "error": f"{err.get('code')}: {err.get('message')}" if err else "",
            }
        )
    return rows


def _daemon_line(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    d = doc.get("daemon") or {}
    err = d.get("last_error")
    used, limit = d.get("budget_used_bytes"), d.get("budget_limit_bytes")
    return [
        ("role", str(doc.get("role", "?"))),
        ("version", str(doc.get("version", "?"))),
        ("uptime", human_seconds(d.get("uptime_seconds"))),
        ("connections", str(d.get("connections", "-"))),
        ("queue", str(d.get("queue", "-"))),
        ("budget", f"{human_bytes(used)} / {human_bytes(limit)}"),
        ("peer", str(d.get("peer") or "-")),
        ("last error", f"{err.get('code')}: {err.get('message')}" if err else "none"),
    ]


def _source_lines(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Extra lines under the daemon line: a destination's sources (several sources, one
    destination: name -> counts), a source's refused ``--handoff-tag`` hand-offs."""
    out = []
    handoff = doc.get("handoff_tag")
    if isinstance(handoff, Mapping):
        for h, r in (handoff.get("refused") or {}).items():
            if isinstance(r, Mapping):
                out.append(
                    (
                        f"handoff {str(h)[:12]}",
                        f"refused ({r.get('reason', '?')}), attempts {r.get('attempts', 0)}; "
                        "still seeding here, retried while the tag stays",
                    )
                )
    for s in doc.get("sources") or []:
        if not isinstance(s, Mapping):
            continue
        state = "connected" if s.get("connected") else "disconnected"
        out.append(
            (
                f"source {s.get('name', '?')}",
                f"{state}, connections {s.get('connections', 0)}, "
                f"torrents {s.get('torrents', 0)}, pieces in flight {s.get('pieces_inflight', 0)}",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# The HTML page for "/".

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'"

_CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f3f5f8;
color:#1d232b}
header{background:#1f2a37;color:#fff;padding:12px 16px}
header h1{font-size:1.25em;margin:0}
header p{margin:2px 0 0;color:#c9d3df;font-size:.92em}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:12px;padding:12px;
max-width:1100px;margin:0 auto}
.card{background:#fff;border:1px solid #dde1e6;border-radius:10px;padding:12px 14px;min-width:0}
.wide{grid-column:1/-1}
.card>h2{font-size:.8em;text-transform:uppercase;letter-spacing:.06em;color:#5b6573;margin:0 0 8px}
.t{border-top:1px solid #eef0f3;padding:8px 0 4px}
.t:first-of-type{border-top:0;padding-top:0}
.t h2{font-size:1.02em;margin:0 0 6px;overflow-wrap:anywhere}
progress{width:100%;height:12px;accent-color:#2f6fde}
.k{display:flex;flex-wrap:wrap;gap:2px 14px;font-size:.9em;color:#3c4550;margin-top:4px}
.chip{display:inline-block;border-radius:999px;padding:0 8px;font-size:.82em;font-weight:600;
background:#e6edf7;color:#1f4f96;white-space:nowrap}
.chip.ok{background:#e3f4e8;color:#1b6b35}.chip.ho{background:#efe7fa;color:#5b2f98}
.chip.bad{background:#fbe6e4;color:#a1261a}
.err{color:#a1261a;font-size:.9em;margin-top:4px;overflow-wrap:anywhere}
.muted{color:#5b6573}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0}
dt{color:#5b6573}dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%}
th,td{text-align:right;padding:3px 6px;font-variant-numeric:tabular-nums;white-space:nowrap}
th:first-child,td:first-child{text-align:left;color:#5b6573;font-weight:400}
thead th{font-size:.8em;color:#5b6573;font-weight:600}
ol,ul{list-style:none;margin:0;padding:0}
.ev{display:grid;grid-template-columns:auto 1fr;gap:0 10px;padding:7px 0;
border-top:1px solid #eef0f3}
.ev:first-child{border-top:0}
.ev time{color:#5b6573;font-size:.85em;font-variant-numeric:tabular-nums;padding-top:2px}
.ev b{overflow-wrap:anywhere;font-weight:600}
.ev .d{font-size:.88em;color:#3c4550}
svg{display:block;width:100%;height:120px}
.ax{display:flex;justify-content:space-between;font-size:.8em;color:#5b6573}
.cand li{padding:3px 0;overflow-wrap:anywhere}
.big{font-size:1.35em;font-weight:650}
""".strip()

_KIND_LABEL = {
    "synced": ("synced · ready to seed", "ok"),
    "handed off": ("handed off · seeding on destination", "ho"),
    "failed": ("failed", "bad"),
}


def _when(t: float | None, now: float) -> str:
    """A short local time: ``14:03`` today, ``Dec 5 14:03`` before."""
    if not t:
        return "-"
    lt = time.localtime(t)
    if time.strftime("%Y-%m-%d", lt) == time.strftime("%Y-%m-%d", time.localtime(now)):
        return time.strftime("%H:%M", lt)
    return time.strftime("%b %d %H:%M", lt)


def chart_svg(throughput: Mapping[str, Any] | None) -> str:
    """The last hour's throughput as an inline SVG bar chart (one bar per bucket), drawn here:
    no script, no external asset (the CSP allows neither). ``data-peak`` carries the peak rate
    (bytes/s), so "non-empty" is observable without reading pixels."""
    rates = [float(r) for r in (throughput or {}).get("bytes_per_second") or []]
    peak = max(rates, default=0.0)
    w, h, top = 360.0, 100.0, 8.0
    parts = [
        f'<svg id="chart" viewBox="0 0 {w:.0f} {h:.0f}" preserveAspectRatio="none" '
        f'role="img" aria-label="throughput over the last hour, peak '
        f'{html.escape(human_bytes(peak))}/s" data-peak="{peak:.1f}" data-points="{len(rates)}">',
        f'<rect x="0" y="0" width="{w:.0f}" height="{h:.0f}" fill="#f7f9fc"/>',
    ]
    for frac in (0.5, 1.0):
        y = h - frac * (h - top)
        parts.append(
            f'<line x1="0" x2="{w:.0f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#dfe4ea" '
            'stroke-width="1" stroke-dasharray="3 3" vector-effect="non-scaling-stroke"/>'
        )
    if rates and peak > 0:
        bw = w / len(rates)
        bars = []
        for i, r in enumerate(rates):
            if r <= 0:
                continue
            y = h - max(1.5, (r / peak) * (h - top))
            bars.append(f"M{i * bw:.2f},{h:.0f}V{y:.1f}H{(i + 1) * bw - 0.4:.2f}V{h:.0f}Z")
        parts.append(f'<path class="bars" d="{"".join(bars)}" fill="#2f6fde"/>')
    parts.append(
        f'<line x1="0" x2="{w:.0f}" y1="{h - 0.5:.1f}" y2="{h - 0.5:.1f}" stroke="#9aa5b4" '
        'stroke-width="1" vector-effect="non-scaling-stroke"/>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _summary(doc: Mapping[str, Any]) -> str:
    d = doc.get("daemon") or {}
    peers = doc.get("peers") or []
    n = len(doc.get("torrents") or [])
    if peers:
        who = ", ".join(str(p.get("address")) for p in peers)
        link = f"connected to {who}"
    elif doc.get("role") == "source":
        link = f"not connected to {d.get('peer') or 'the destination'}"
    else:
        link = str(d.get("peer") or "no source connected")
    work = f"{n} torrent{'s' if n != 1 else ''} syncing" if n else "idle"
    return f"{link} · {work} · up {human_seconds(d.get('uptime_seconds'))}"


def _torrent_cards(doc: Mapping[str, Any]) -> list[str]:
    e = html.escape
    rows = _rows(doc)
    parts = ['<section class="card wide" id="now"><h2>Now</h2>']
    if not rows:
        parts.append('<p class="muted" id="empty">No torrent is being synced right now.</p>')
    for r, t in zip(rows, doc.get("torrents") or [], strict=False):
        total = int(t.get("pieces_total") or 0)
        verified = int(t.get("pieces_verified") or 0)
        parts += [
            f'<section class="t" data-hash="{e(str(t.get("hash", "")))}">',
            f"<h2>{e(r['name'])}</h2>",
            f'<progress max="{max(total, 1)}" value="{min(verified, max(total, 1))}">'
            f"{e(r['pct'])}</progress>",
            '<div class="k">',
            f'<span class="chip state">{e(r["state"])}</span>',
            f'<span class="verified">verified {e(r["verified"])} ({e(r["pct"])})</span>',
            f'<span class="streamed">streamed {e(r["streamed"])}</span>',
            f'<span class="size">{e(r["size"])}</span>',
            f'<span class="rate">{e(r["rate"])}</span>',
            f'<span class="eta">ETA {e(r["eta"])}</span>',
            f'<span class="hash muted">{e(r["hash"])}</span>',
            "</div>",
        ]
        if r["error"]:
            parts.append(f'<div class="err">last error {e(r["error"])}</div>')
        parts.append("</section>")
    parts.append("</section>")
    return parts


def _chart_card(doc: Mapping[str, Any]) -> list[str]:
    tp = doc.get("throughput") or {}
    rates = [float(r) for r in tp.get("bytes_per_second") or []]
    peak = max(rates, default=0.0)
    last = rates[-1] if rates else 0.0
    total = float(tp.get("bytes") or 0)
    now = float(doc.get("time") or time.time())
    since = tp.get("since")
    started = (
        f'<span class="muted">counted since {html.escape(_when(float(since), now))}</span>'
        if since is not None and now - float(since) < 3600
        else ""
    )
    return [
        '<section class="card wide" id="throughput"><h2>Throughput, last hour</h2>',
        chart_svg(tp),
        '<div class="ax"><span>60 min ago</span><span>30 min</span><span>now</span></div>',
        f'<div class="k"><span>moved {html.escape(human_bytes(total))}</span>'
        f"<span>peak {html.escape(human_bytes(peak))}/s</span>"
        f"<span>latest 30 s {html.escape(human_bytes(last))}/s</span>{started}</div>",
        "</section>",
    ]


def _totals_card(doc: Mapping[str, Any]) -> list[str]:
    e = html.escape
    totals = (doc.get("activity") or {}).get("totals") or {}
    today, alltime = totals.get("today") or {}, totals.get("all") or {}
    since = totals.get("since")
    since_txt = time.strftime("%Y-%m-%d", time.localtime(since)) if since else "-"
    rows = [
        ("moved", human_bytes(today.get("bytes", 0)), human_bytes(alltime.get("bytes", 0))),
        ("synced", str(today.get("synced", 0)), str(alltime.get("synced", 0))),
        ("handed off", str(today.get("handed_off", 0)), str(alltime.get("handed_off", 0))),
        ("failed", str(today.get("failed", 0)), str(alltime.get("failed", 0))),
    ]
    parts = [
        '<section class="card" id="totals"><h2>Totals</h2><table>',
        "<thead><tr><th></th><th>today</th><th>all time</th></tr></thead>",
        "<tbody>",
    ]
    for name, a, b in rows:
        slug = name.replace(" ", "-")
        parts.append(
            f'<tr id="total-{slug}"><td>{name}</td><td class="today">{html.escape(a)}</td>'
            f'<td class="all">{html.escape(b)}</td></tr>'
        )
    parts.append(
        f'</tbody></table><p class="muted" id="since">all time = since {e(since_txt)}</p></section>'
    )
    return parts


def _disk_card(doc: Mapping[str, Any]) -> list[str]:
    e = html.escape
    disk = doc.get("disk") or {}
    free, minimum = disk.get("free_bytes"), disk.get("min_space_bytes")
    parts = ['<section class="card" id="disk"><h2>Disk</h2>']
    if free is None:
        parts.append('<p class="muted">Free space not known yet.</p>')
    else:
        parts.append(f'<div class="big" id="free">{e(human_bytes(free))} free</div>')
        if minimum:
            low = free < minimum
            verdict = "below: handing off synced torrents" if low else "above: nothing to free"
            parts.append(
                f'<p class="muted" id="min-space">--min-space {e(human_bytes(minimum))}, '
                f"{verdict}</p>"
            )
        elif doc.get("role") == "source":
            parts.append('<p class="muted" id="min-space">--min-space 0: no hand-off on space</p>')
    if doc.get("role") == "source":
        cands = doc.get("handoff_candidates") or []
        parts.append("<h2>Next hand-off candidates</h2>")
        parts += _list_or_none(
            '<ol class="cand" id="candidates">',
            [_candidate_item(c) for c in cands[:5]],
            '<p class="muted" id="no-candidates">None: no synced torrent here.</p>',
        )
    parts.append("</section>")
    return parts


def _list_or_none(opening: str, items: list[str], none: str) -> list[str]:
    """A card's list: ``opening`` (an ``<ol ...>`` or ``<ul ...>`` tag), the ``<li>`` items and
    the closing tag; with no items, the paragraph ``none`` instead (each card says in its own
    words why it is empty)."""
    if not items:
        return [none]
    return [opening, *items, f"</{opening[1:3]}>"]


def _candidate_item(c: Mapping[str, Any]) -> str:
    e = html.escape
    wait = " · waits for --min-seeding-time" if c.get("waiting_seeding") else ""
    return (
        f'<li data-hash="{e(str(c.get("hash", "")))}"><b>{e(str(c.get("name")))}</b>'
        f' <span class="muted">{e(human_bytes(c.get("size")))} · seeded '
        f"{e(human_seconds(c.get('seeding_time')))} · "
        f"{int(c.get('peers') or 0)} in swarm{e(wait)}</span></li>"
    )


def _peers_card(doc: Mapping[str, Any], now: float) -> list[str]:
    e = html.escape
    peers = doc.get("peers") or []
    want = "destination" if doc.get("role") == "source" else "sources"
    d = doc.get("daemon") or {}
    return [
        f'<section class="card" id="peers"><h2>Connected {want}</h2>',
        *_list_or_none(
            "<ul>",
            [_peer_item(p, now) for p in peers],
            f'<p class="muted" id="no-peers">None. {e(str(d.get("peer") or ""))}</p>',
        ),
        "</section>",
    ]


def _peer_item(p: Mapping[str, Any], now: float) -> str:
    e = html.escape
    ident = [f"{p.get('connections')} connection{'s' if p.get('connections') != 1 else ''}"]
    ident.append("TLS" if p.get("tls") else "no TLS")
    ident.append(str(p.get("auth") or "key"))
    if p.get("fingerprint"):
        ident.append(f"key {p.get('fingerprint')}")
    if p.get("software"):
        ident.append(str(p.get("software")))
    since = p.get("since")
    if since:
        ident.append(f"since {_when(float(since), now)}")
    return (
        f'<li class="peer" data-address="{e(str(p.get("address")))}">'
        f"<b>{e(str(p.get('address')))}</b><br>"
        f'<span class="muted">{e(" · ".join(ident))}</span></li>'
    )


def _activity_card(doc: Mapping[str, Any], now: float) -> list[str]:
    recent = (doc.get("activity") or {}).get("recent") or []
    return [
        '<section class="card wide" id="activity"><h2>Recent activity</h2>',
        *_list_or_none(
            "<ol>",
            [_event_item(ev, doc.get("role") == "destination", now) for ev in recent],
            '<p class="muted" id="no-activity">Nothing synced yet.</p>',
        ),
        "</section>",
    ]


def _event_item(ev: Mapping[str, Any], on_destination: bool, now: float) -> str:
    e = html.escape
    kind = str(ev.get("kind", ""))
    label, cls = _KIND_LABEL.get(kind, (kind, ""))
    bits = [human_bytes(ev.get("size"))]
    if ev.get("duration_seconds") is not None:
        bits.append(f"took {human_seconds(ev.get('duration_seconds'))}")
    if ev.get("since_complete_seconds") is not None:
        target = "seeding" if kind == "handed off" else "ready"
        bits.append(
            f"complete on source → {target} here in "
            f"{human_seconds(ev.get('since_complete_seconds'))}"
            if on_destination
            else f"complete → {target} on destination in "
            f"{human_seconds(ev.get('since_complete_seconds'))}"
        )
    if ev.get("code"):
        bits.append(f"{ev.get('code')}: {ev.get('message') or ''}")
    elif ev.get("message"):
        bits.append(str(ev.get("message")))
    return (
        f'<li class="ev" data-kind="{e(kind)}" data-hash="{e(str(ev.get("hash", "")))}">'
        f"<time>{e(_when(float(ev.get('time') or 0), now))}</time>"
        f'<div><span class="chip {cls}">{e(label)}</span> <b>{e(str(ev.get("name")))}</b>'
        f'<div class="d">{e(" · ".join(bits))}</div></div></li>'
    )


def render_html(doc: Mapping[str, Any] | None) -> str:
    """The read-only status page: rendered here, no script, refreshes every few seconds."""
    e = html.escape
    role = str(doc.get("role", "")) if doc else ""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        f"<title>qbsync {e(role)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header>",
        f"<h1>qbsync {e(role)}</h1>",
    ]
    if not doc:
        parts.append('</header><main><p class="muted" id="empty">Starting; no status yet.</p>')
        parts.append("</main></body></html>\n")
        return "\n".join(parts)
    now = float(doc.get("time") or time.time())
    parts.append(f'<p id="summary">{e(_summary(doc))}</p></header><main>')
    parts += _torrent_cards(doc)
    parts += _chart_card(doc)
    parts += _activity_card(doc, now)
    parts += _totals_card(doc)
    parts += _disk_card(doc)
    parts += _peers_card(doc, now)
    parts.append('<section class="card" id="details"><h2>Daemon</h2><dl id="daemon">')
    for key, value in _daemon_line(doc):
        slug = key.replace(" ", "-")
        parts.append(f'<dt>{e(key)}</dt><dd id="d-{e(slug)}">{e(value)}</dd>')
    parts.append("</dl>")
    sources = _source_lines(doc)
    if sources:
        parts.append('<h2>Sources</h2><dl id="sources">')
        for name, value in sources:
            parts.append(f"<dt>{e(name)}</dt><dd>{e(value)}</dd>")
        parts.append("</dl>")
    updated = time.strftime("%H:%M:%S", time.localtime(now))
    parts.append(
        f'<p class="muted">Updated {e(updated)}; refreshes every {REFRESH_SECONDS}s. '
        '<a href="/status">JSON</a></p></section>'
    )
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# ``qbsync status``.

DEFAULT_URL = "http://127.0.0.1:8080"


def fetch(url: str, timeout: float = 5.0) -> dict[str, Any]:
    target = url.rstrip("/")
    if not target.endswith("/status"):
        target += "/status"
    with urllib.request.urlopen(target, timeout=timeout) as resp:
        doc = json.loads(resp.read())
    if not isinstance(doc, dict):
        raise ValueError("the /status answer is not a JSON object")
    return doc


def terminal_safe(text: str) -> str:
    """``text`` with every control or format character (ESC, C1, bidi overrides, ...) shown as
    a ``\\x..``/``\\u....`` escape: a torrent name or an error message comes from a peer or
    a ``.torrent`` and must not drive the terminal (OSC 8 links, cursor moves, reordering)."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def _recent_lines(doc: Mapping[str, Any], limit: int = 5) -> list[str]:
    """The activity log's newest events and the totals, in the page's words."""
    act = doc.get("activity") or {}
    now = float(doc.get("time") or time.time())
    lines = []
    totals = act.get("totals") or {}
    if totals:
        today, alltime = totals.get("today") or {}, totals.get("all") or {}
        lines.append(
            f"totals: today {human_bytes(today.get('bytes', 0))} moved, "
            f"{today.get('synced', 0)} synced, {today.get('handed_off', 0)} handed off, "
            f"{today.get('failed', 0)} failed; all {human_bytes(alltime.get('bytes', 0))}, "
            f"{alltime.get('synced', 0)} synced, {alltime.get('handed_off', 0)} handed off, "
            f"{alltime.get('failed', 0)} failed"
        )
    for ev in (act.get("recent") or [])[:limit]:
        kind = str(ev.get("kind", ""))
        label = _KIND_LABEL.get(kind, (kind, ""))[0]
        extra = f"  {ev.get('code')}" if ev.get("code") else ""
        lines.append(
            f"{_when(float(ev.get('time') or 0), now)}  {label}  {ev.get('name')}  "
            f"{human_bytes(ev.get('size'))}{extra}"
        )
    return lines


def render_table(doc: Mapping[str, Any], out: IO[str]) -> None:
    """Print the document as a table (``rich`` when ``out`` is a terminal, plain otherwise),
    then the totals and the newest activity.

    Every value is data, never markup: names like ``[link=https://...]Ubuntu[/link]`` print
    as written (rich ``Text`` cells are not parsed), and control characters are escaped."""
    daemon = [(k, terminal_safe(v)) for k, v in _daemon_line(doc)]
    rows = [{k: terminal_safe(v) for k, v in r.items()} for r in _rows(doc)]
    recent = [terminal_safe(line) for line in _recent_lines(doc)]
    cols = ["name", "state", "verified", "pct", "streamed", "size", "rate", "eta", "error"]
    if out.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        console = Console(file=out)
        head = Text()
        for i, (k, v) in enumerate(daemon):
            head.append(("  " if i else "") + k, style="bold")
            head.append(" " + v)
        console.print(head, highlight=False)
        for name, value in _source_lines(doc):
            console.print(Text(f"{terminal_safe(name)}: {terminal_safe(value)}"), highlight=False)
        table = Table(*cols, expand=False)
        for r in rows:
            table.add_row(*(Text(r[c]) for c in cols))
        console.print(table, highlight=False)
        for text in recent:
            console.print(Text(text), highlight=False)
        return
    out.write("  ".join(f"{k}: {v}" for k, v in daemon) + "\n")
    for name, value in _source_lines(doc):
        out.write(f"{name}: {value}\n")
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in cols}
    out.write("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip() + "\n")
    for r in rows:
        out.write("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip() + "\n")
    if not rows:
        out.write("(no torrent is being synced)\n")
    for line in recent:
        out.write(line + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qbsync status",
        description="Show what a running qbsync daemon is doing, from its /status endpoint.",
    )
    p.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"The daemon's health address (--health-addr) (default {DEFAULT_URL})",
    )
    p.add_argument("--watch", action="store_true", help="Refresh every --interval seconds")
    p.add_argument("--interval", type=float, default=2.0, help="Seconds between refreshes")
    p.add_argument("--json", action="store_true", help="Print the raw JSON document")
    return p


def main(argv: Sequence[str], out: IO[str] | None = None) -> int:
    """``qbsync status``: 0 when the document was shown (``--watch``: until Ctrl-C), 1 when
    the daemon could not be read."""
    args = build_parser().parse_args(list(argv))
    out = out or sys.stdout
    # Ctrl-C (or SIGTERM) stops it wherever it lands, also when inherited ignored, and
    # `stop.check()` makes sure no request starts after it (qbsync.interrupt says why).
    with interruptible() as stop:
        try:
            while True:
                stop.check()
                shown = _show(args, out)
                if not args.watch:
                    return 0 if shown else 1
                time.sleep(max(0.2, args.interval))
        except KeyboardInterrupt:
            return 0


def _show(args: argparse.Namespace, out: IO[str]) -> bool:
    try:
        doc = fetch(args.url)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        print(f"qbsync status: cannot read {args.url}/status: {exc}", file=sys.stderr)
        return False
    if args.watch and out.isatty():
        from rich.console import Console

        Console(file=out).clear()
    if args.json:
        out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        render_table(doc, out)
    out.flush()
    return True
