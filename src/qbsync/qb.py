"""qBittorrent's WebUI API for Trio: threads, deadlines, retries and a circuit breaker.

``qbittorrent-api`` is synchronous and built on ``requests``. Each call therefore runs in a
worker thread (``trio.to_thread.run_sync``) under one :class:`trio.CapacityLimiter` per
qBittorrent instance, and each worker thread owns its own ``Client`` (``requests.Session`` is
not documented as thread-safe). Calls are abandoned on cancellation so a deadline never waits
on a hung HTTP request; the request's own socket timeout bounds the abandoned thread.

Version differences are handled here and nowhere else: 4.x's ``paused*`` states are reported
as 5.x's ``stopped*``, and ``stop``/``start`` map to ``pause``/``resume`` on Web API < 2.11
(qbittorrent-api does that mapping itself).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import qbittorrentapi
import trio

from . import liveness, metrics
from .log import redact_url

log = logging.getLogger("qbsync.qb")

T = TypeVar("T")

REQUEST_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds for one HTTP request
RETRY_ATTEMPTS = 3
RETRY_BASE = 0.5
RETRY_MAX = 5.0
BREAKER_THRESHOLD = 5
BREAKER_COOLDOWN = 30.0

CHECKING_STATES = frozenset({"checkingUP", "checkingDL", "checkingResumeData", "moving"})
# States in which a torrent at 100 % is complete and seedable (5.x names; 4.x mapped below).
SEEDING_STATES = frozenset({"uploading", "stalledUP", "forcedUP", "stoppedUP", "queuedUP"})
ERROR_STATES = frozenset({"error", "missingFiles"})


def normalize_state(state: str) -> str:
    """qBittorrent 4.x ``pausedUP``/``pausedDL`` are 5.x ``stoppedUP``/``stoppedDL``."""
    return "stopped" + state[len("paused") :] if state.startswith("paused") else state


def split_tags(tags: str | None) -> list[str]:
    """qBittorrent returns tags as one ``", "``-joined string."""
    return [t.strip() for t in (tags or "").split(",") if t.strip()]


class QBError(Exception):
    """A qBittorrent call failed. ``transient`` says whether retrying later may help."""

    def __init__(self, operation: str, message: str, *, transient: bool, not_found: bool = False):
        super().__init__(f"qbittorrent {operation}: {message}")
        self.operation = operation
        self.transient = transient
        self.not_found = not_found


class CircuitOpen(QBError):
    def __init__(self, operation: str) -> None:
        super().__init__(operation, "circuit breaker open", transient=True)


_ERRNO_RE = re.compile(r"\[Errno -?\d+\] [^'\"()]+")


def _describe(exc: BaseException) -> str:
    """A one-line reason: requests nests the useful part ("[Errno 111] Connection refused")
    several exceptions deep inside a long repr, so pick it out when it is there."""
    text = str(exc)
    found = _ERRNO_RE.search(text)
    if isinstance(exc, qbittorrentapi.APIConnectionError) and found:
        return f"cannot connect: {found.group(0).strip()}"
    if isinstance(exc, qbittorrentapi.HTTPError):
        status = getattr(exc, "http_status_code", None)
        return f"HTTP {status}: {text[:200]}" if status else text[:200]
    return f"{type(exc).__name__}: {text[:300]}".strip()


def _classify(exc: BaseException) -> tuple[bool, bool]:
    """(transient, benign_not_found) for an exception raised by qbittorrent-api."""
    if isinstance(exc, qbittorrentapi.NotFound404Error):
        return False, True
    if isinstance(exc, qbittorrentapi.HTTP5XXError | qbittorrentapi.APIConnectionError):
        # APIConnectionError covers refused/reset/timeouts; 5xx includes 502/503/504.
        return True, False
    if isinstance(exc, qbittorrentapi.HTTPError):
        status = getattr(exc, "http_status_code", None)
        return status == 429, False
    text = str(exc).lower()
    transient = any(
        s in text
        for s in (
            "connection refused",
            "connection reset",
            "timed out",
            "broken pipe",
            "temporary failure",
            "eof",
        )
    )
    return transient, "not found" in text


class QB:
    """One qBittorrent instance. Every method is async and safe to call from many tasks."""

    def __init__(
        self,
        url: str,
        username: str = "",
        password: str = "",
        *,
        mode: str,
        max_threads: int = 4,
    ) -> None:
        self.url = url
        self._username = username
        self._password = password
        self.mode = mode
        self._limiter = trio.CapacityLimiter(max_threads)
        self._local = threading.local()
        self._failures = 0
        self._opened_at: float | None = None
        self._sync_lock = threading.Lock()
        self._sync_client: qbittorrentapi.Client | None = None

    # -- plumbing -----------------------------------------------------------------------------

    def _new_client(self) -> qbittorrentapi.Client:
        return qbittorrentapi.Client(
            host=self.url,
            username=self._username or None,
            password=self._password or None,
            REQUESTS_ARGS={"timeout": REQUEST_TIMEOUT},
            VERIFY_WEBUI_CERTIFICATE=True,
            # Use the scheme the user gave; otherwise a refused http:// connection makes
            # qbittorrent-api probe https:// too, doubling every failure.
            FORCE_SCHEME_FROM_HOST=True,
            RAISE_NOTIMPLEMENTEDERROR_FOR_UNIMPLEMENTED_API_ENDPOINTS=False,
            DISABLE_LOGGING_DEBUG_OUTPUT=True,
        )

    def _client(self) -> qbittorrentapi.Client:
        client: qbittorrentapi.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._new_client()
        return client

    def _breaker_allows(self) -> bool:
        if self._opened_at is None:
            return True
        # Half-open after the cooldown: let one call through; its result closes or reopens.
        return time.monotonic() - self._opened_at >= BREAKER_COOLDOWN

    def _record(self, ok: bool) -> None:
        if ok:
            if self._opened_at is not None:
                log.info("event=qb_circuit_closed mode=%s url=%s", self.mode, redact_url(self.url))
            self._failures = 0
            self._opened_at = None
            metrics.qb_circuit_open.labels(self.mode).set(0)
            return
        self._failures += 1
        if self._failures >= BREAKER_THRESHOLD and (
            self._opened_at is None or self._breaker_allows()
        ):
            self._opened_at = time.monotonic()
            metrics.qb_circuit_open.labels(self.mode).set(1)
            log.warning(
                "event=qb_circuit_open mode=%s url=%s failures=%d",
                self.mode,
                redact_url(self.url),
                self._failures,
            )

    async def call(self, operation: str, fn: Callable[[qbittorrentapi.Client], T]) -> T:
        """Run ``fn(client)`` in a worker thread with retries and the circuit breaker.

        Raises :class:`QBError` (``not_found=True`` for 404s, which are not failures).
        """
        start = time.monotonic()
        try:
            for attempt in range(1, RETRY_ATTEMPTS + 1):
                if not self._breaker_allows():
                    metrics.qb_api_calls.labels(self.mode, operation, "circuit_open").inc()
                    raise CircuitOpen(operation)
                try:
                    with liveness.waiting_on_dependency():
                        async with self._limiter:
                            result = await trio.to_thread.run_sync(
                                lambda: fn(self._client()), abandon_on_cancel=True
                            )
                except Exception as exc:
                    transient, not_found = _classify(exc)
                    if not_found:
                        metrics.qb_api_calls.labels(self.mode, operation, "not_found").inc()
                        raise QBError(
                            operation, str(exc) or "not found", transient=False, not_found=True
                        ) from exc
                    self._record(False)
                    metrics.qb_api_calls.labels(self.mode, operation, "error").inc()
                    if transient and attempt < RETRY_ATTEMPTS and self._breaker_allows():
                        metrics.qb_client_retries.labels(self.mode).inc()
                        delay = min(RETRY_MAX, RETRY_BASE * 2 ** (attempt - 1))
                        await trio.sleep(delay * random.uniform(0.9, 1.1))
                        continue
                    raise QBError(operation, _describe(exc), transient=transient) from exc
                self._record(True)
                metrics.qb_api_calls.labels(self.mode, operation, "ok").inc()
                return result
            raise AssertionError("unreachable")
        finally:
            metrics.qb_api_call_duration.labels(self.mode, operation).observe(
                time.monotonic() - start
            )

    # -- operations used by both daemons ----------------------------------------------------

    async def version(self) -> str:
        return await self.call("app_version", lambda c: str(c.app_version()))

    async def web_api_version(self) -> str:
        return await self.call("app_webapi_version", lambda c: str(c.app_web_api_version()))

    async def preferences(self) -> dict[str, Any]:
        return await self.call("app_preferences", lambda c: dict(c.app_preferences()))

    async def torrents(
        self, hashes: list[str] | None = None, **filters: Any
    ) -> list[dict[str, Any]]:
        """``torrents/info``; each torrent's ``state`` normalized to 5.x names."""

        def run(c: qbittorrentapi.Client) -> list[dict[str, Any]]:
            if hashes is not None:
                filters["torrent_hashes"] = "|".join(hashes)
            return [dict(t) for t in c.torrents_info(**filters)]

        out = await self.call("torrents_info", run)
        for t in out:
            t["state"] = normalize_state(str(t.get("state", "")))
        return out

    async def torrent(self, info_hash: str) -> dict[str, Any] | None:
        found = await self.torrents([info_hash])
        return found[0] if found else None

    async def files(self, info_hash: str) -> list[dict[str, Any]]:
        return await self.call(
            "torrents_files",
            lambda c: sorted(
                (dict(f) for f in c.torrents_files(torrent_hash=info_hash)),
                key=lambda f: int(f["index"]),
            ),
        )

    async def properties(self, info_hash: str) -> dict[str, Any]:
        return await self.call(
            "torrents_properties", lambda c: dict(c.torrents_properties(torrent_hash=info_hash))
        )

    async def piece_states(self, info_hash: str) -> list[int]:
        return await self.call(
            "torrents_piece_states",
            lambda c: [int(s) for s in c.torrents_piece_states(torrent_hash=info_hash)],
        )

    async def export(self, info_hash: str) -> bytes:
        return await self.call(
            "torrents_export", lambda c: bytes(c.torrents_export(torrent_hash=info_hash))
        )

    async def add_tags(self, info_hash: str, tags: list[str]) -> None:
        tags = [t for t in tags if t]
        if tags:
            await self.call(
                "torrents_add_tags",
                lambda c: c.torrents_add_tags(tags=tags, torrent_hashes=info_hash),
            )

    async def remove_tags(self, info_hash: str, tags: list[str]) -> None:
        tags = [t for t in tags if t]
        if tags:
            await self.call(
                "torrents_remove_tags",
                lambda c: c.torrents_remove_tags(tags=tags, torrent_hashes=info_hash),
            )

    async def stop(self, info_hash: str) -> None:
        await self.call("torrents_stop", lambda c: c.torrents_stop(torrent_hashes=info_hash))

    async def start(self, info_hash: str) -> None:
        await self.call("torrents_start", lambda c: c.torrents_start(torrent_hashes=info_hash))

    async def add_torrent(
        self,
        torrent: bytes,
        *,
        info_hash: str,
        save_path: str,
        category: str = "",
        tags: list[str] | None = None,
        skip_checking: bool,
    ) -> None:
        """Add a ``.torrent`` *stopped*, with ``contentLayout=Original`` and automatic torrent
        management off. ``skip_checking`` marks every piece as present without reading the
        files: only for data this process has already verified piece by piece. The single
        place an add goes through, so the name of that parameter can follow the version."""
        await self.call(
            "torrents_add",
            lambda c: c.torrents_add(
                torrent_files={f"{info_hash}.torrent": torrent},
                save_path=save_path,
                category=category or None,
                tags=list(tags or ()) or None,
                is_paused=True,
                content_layout="Original",
                use_auto_torrent_management=False,
                is_sequential_download=False,
                is_skip_checking=skip_checking,
            ),
        )

    async def recheck(self, info_hash: str) -> None:
        await self.call("torrents_recheck", lambda c: c.torrents_recheck(torrent_hashes=info_hash))

    async def delete(self, info_hash: str, *, delete_files: bool) -> None:
        await self.call(
            "torrents_delete",
            lambda c: c.torrents_delete(delete_files=delete_files, torrent_hashes=info_hash),
        )

    async def ping(self) -> None:
        """A cheap request proving qBittorrent answers (used by /readyz)."""
        await self.web_api_version()

    async def maindata(self, rid: int = 0) -> dict[str, Any]:
        """``sync/maindata?rid=``: the incremental change feed (plain dicts, states normalized).

        qBittorrent keeps the ``rid`` baseline *per session*: a call through another session
        (another ``Client``, i.e. another worker thread here) gets a full update every time.
        So these calls use one dedicated client, serialized by a lock, whatever thread runs
        them.
        """

        def run(_: qbittorrentapi.Client) -> dict[str, Any]:
            with self._sync_lock:
                if self._sync_client is None:
                    self._sync_client = self._new_client()
                raw: Any = self._sync_client.sync_maindata(rid=rid)
            out: dict[str, Any] = dict(raw)
            torrents = {str(h): dict(t) for h, t in (raw.get("torrents") or {}).items()}
            for t in torrents.values():
                if "state" in t:
                    t["state"] = normalize_state(str(t["state"]))
            out["torrents"] = torrents
            out["torrents_removed"] = [str(h) for h in raw.get("torrents_removed") or []]
            out["server_state"] = dict(raw.get("server_state") or {})
            return out

        return await self.call("sync_maindata", run)
