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

SCHEMA_VERSION = 1
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
    ) -> dict[str, Any]:
        """The schema-``SCHEMA_VERSION`` document; ``legacy`` keys (the fields earlier versions
        served) are kept at the top level so existing consumers keep working."""
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


def source_torrents(registry: Any) -> list[TorrentStatus]:
    """Tracked torrents of a source ``Registry``: verified = acknowledged by the destination
    (it acknowledges a piece only after its SHA-1 matched); streamed = verified + in flight."""
    out = []
    for t in sorted(registry.all(), key=lambda t: t.seq):
        tr = t.tracker
        if t.finalize_failures:
            state = "retrying"
        elif tr.complete:
            state = "finalizing"
        elif tr.inflight:
            state = "streaming"
        else:
            state = "waiting"
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
                state=state.phase.value,
                last_error=_error(getattr(state, "last_error", None)),
            )
        )
    return out


def destination_daemon(budget: Any, ports: Sequence[int]) -> DaemonStatus:
    return DaemonStatus(
        connections=_gauge("qbsync_wire_connections", {"role": "destination"}),
        queue=_gauge("qbsync_write_workers_busy"),
        budget_used_bytes=int(budget.used),
        budget_limit_bytes=int(budget.limit),
        peer="listening on " + ",".join(str(p) for p in ports) if ports else "",
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
body{font:15px/1.4 system-ui,sans-serif;margin:0;padding:12px;background:#f6f7f9;color:#1d232b}
h1{font-size:1.2em;margin:0 0 8px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0 0 12px}
dt{color:#5b6573}dd{margin:0}
.t{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:10px;margin:0 0 10px}
.t h2{font-size:1em;margin:0 0 6px;overflow-wrap:anywhere}
progress{width:100%;height:14px}
.k{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:.9em;color:#3c4550}
.err{color:#a1261a;font-size:.9em;margin-top:4px;overflow-wrap:anywhere}
.muted{color:#5b6573}
""".strip()


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
        f"<h1>qbsync {e(role)}</h1>",
    ]
    if not doc:
        parts.append('<p class="muted" id="empty">Starting; no status yet.</p>')
    else:
        parts.append('<dl id="daemon">')
        for key, value in _daemon_line(doc):
            slug = key.replace(" ", "-")
            parts.append(f'<dt>{e(key)}</dt><dd id="d-{e(slug)}">{e(value)}</dd>')
        parts.append("</dl>")
        sources = _source_lines(doc)
        if sources:
            parts.append('<dl id="sources">')
            for name, value in sources:
                parts.append(f"<dt>{e(name)}</dt><dd>{e(value)}</dd>")
            parts.append("</dl>")
        rows = _rows(doc)
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
                f'<span class="state">{e(r["state"])}</span>',
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
        updated = time.strftime("%H:%M:%S", time.localtime(float(doc.get("time") or 0)))
        parts.append(
            f'<p class="muted">Updated {e(updated)}; refreshes every {REFRESH_SECONDS}s. '
            '<a href="/status">JSON</a></p>'
        )
    parts.append("</body></html>\n")
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


def render_table(doc: Mapping[str, Any], out: IO[str]) -> None:
    """Print the document as a table (``rich`` when ``out`` is a terminal, plain otherwise)."""
    daemon = _daemon_line(doc)
    rows = _rows(doc)
    cols = ["name", "state", "verified", "pct", "streamed", "size", "rate", "eta", "error"]
    if out.isatty():
        from rich.console import Console
        from rich.table import Table

        console = Console(file=out)
        console.print("  ".join(f"[bold]{k}[/bold] {v}" for k, v in daemon), highlight=False)
        for name, value in _source_lines(doc):
            console.print(f"{name}: {value}", highlight=False, markup=False)
        table = Table(*cols, expand=False)
        for r in rows:
            table.add_row(*(r[c] for c in cols))
        console.print(table)
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
    try:
        while True:
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
