"""qBittorrent's WebUI API for Trio: threads, deadlines, retries and a circuit breaker.

``qbittorrent-api`` is synchronous and built on ``requests``. Each call therefore runs in a
worker thread (``trio.to_thread.run_sync``) under one :class:`trio.CapacityLimiter` per
qBittorrent instance, and each worker thread owns its own ``Client`` (``requests.Session`` is
not documented as thread-safe). Calls are abandoned on cancellation so a deadline never waits
on a hung HTTP request; the request's own socket timeout bounds the abandoned thread.

Version differences are handled here and nowhere else. Each connection to a qBittorrent asks
``app/webapiVersion`` once (again after a connection error) and picks endpoint and parameter
names from the answer (:class:`WebApi`), never by trying one name and catching the error: a
renamed *parameter* is silently ignored by qBittorrent, so trial and error cannot even see the
failure. 4.x's
``paused*`` states are reported as 5.x's ``stopped*``. Login (5.2 answers 204, or 401 on bad
credentials, with a ``QBT_SID_<port>`` cookie) and API keys (``Authorization: Bearer``) are
qbittorrent-api's job; the contract tests in tests/qbittorrent/test_qb_versions.py hold it to that.

What qbittorrent-api does by itself, and why qbsync names these calls: its ``torrents_stop``/
``torrents_start`` ask ``app/webapiVersion`` on *every* call to choose ``stop`` or ``pause``,
and its ``torrents_add`` sends both ``paused`` and ``stopped``, and both ``skip_checking`` and
``seedMode``, whatever the version (tests/qbittorrent/test_qb_versions.py pins that
behaviour). qbsync sends only the names the server reads, from one version lookup per
connection.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
import qbittorrentapi
import trio
from qbittorrentapi.definitions import APINames

from .. import metrics
from ..http import liveness
from ..log import redact_url

log = logging.getLogger("qbsync.qbittorrent.api")

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


def completion_time(info: Mapping[str, Any]) -> float | None:
    """When qBittorrent finished downloading the torrent (``completion_on``, Unix time), or
    None when it has not or does not say: 0 and -1 mean "not completed", and so does -1 read
    as an unsigned 32-bit number."""
    try:
        value = float(info.get("completion_on") or 0)
    except (TypeError, ValueError):
        return None
    return value if 0 < value < 2**32 - 1 else None


def split_tags(tags: str | None) -> list[str]:
    """qBittorrent returns tags as one ``", "``-joined string."""
    return [t.strip() for t in (tags or "").split(",") if t.strip()]


def parse_version(text: str) -> tuple[int, ...]:
    """``"2.11.2"`` -> ``(2, 11, 2)``; anything unparsable is ``(0,)`` (oldest behaviour)."""
    parts: list[int] = []
    for piece in text.strip().lstrip("v").split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group(0)))
    return tuple(parts) or (0,)


@attrs.frozen
class WebApi:
    """The names one qBittorrent speaks, from its Web API version (``app/webapiVersion``).

    Landmarks (qBittorrent -> Web API): 4.5.x = 2.8.19, 5.0.x = 2.11.2, 5.2.x = 2.15.1,
    5.3.0 = 2.16.2. The renames: ``pause``/``resume`` -> ``stop``/``start`` and the add
    parameter ``paused`` -> ``stopped`` at 2.11.0 (5.0); ``torrents/add`` answers JSON from
    2.14.0 (5.2); the add parameter ``skip_checking`` -> ``seedMode`` at 2.16.0 (5.3), the old
    name being ignored without an error.
    """

    version: tuple[int, ...]

    @property
    def text(self) -> str:
        return ".".join(str(p) for p in self.version)

    @property
    def stop_method(self) -> str:
        return "stop" if self.version >= (2, 11, 0) else "pause"

    @property
    def start_method(self) -> str:
        return "start" if self.version >= (2, 11, 0) else "resume"

    @property
    def stopped_param(self) -> str:
        return "stopped" if self.version >= (2, 11, 0) else "paused"

    @property
    def skip_checking_param(self) -> str:
        return "seedMode" if self.version >= (2, 16, 0) else "skip_checking"

    @property
    def api_keys(self) -> bool:
        return self.version >= (2, 14, 1)

    @property
    def add_returns_json(self) -> bool:
        return self.version >= (2, 14, 0)


def _bool(value: bool) -> str:
    return "true" if value else "false"


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
    if isinstance(exc, qbittorrentapi.LoginFailed):
        return "login failed: wrong --qb-username/--qb-password (qBittorrent 5.2+ answers 401)"
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
    if isinstance(exc, qbittorrentapi.LoginFailed):
        # qbittorrent-api derives it from APIConnectionError, but wrong credentials stay wrong.
        return False, False
    if isinstance(exc, qbittorrentapi.HTTP5XXError):
        return True, False  # 502/503/504 included
    if isinstance(exc, qbittorrentapi.HTTPError):
        # Checked before APIConnectionError, which qbittorrent-api makes its base class: a 403
        # (bad API key) or 409 answers the same way on every retry.
        status = getattr(exc, "http_status_code", None)
        return status == 429, False
    if isinstance(exc, qbittorrentapi.APIConnectionError):
        return True, False  # refused/reset/timeouts
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
        api_key: str = "",
    ) -> None:
        self.url = url
        self._username = username
        self._password = password
        # qBittorrent 5.2+ API key, sent as ``Authorization: Bearer``; never logged.
        self._api_key = api_key
        self._webapi: WebApi | None = None
        self._webapi_lock = threading.Lock()
        self._detected: str | None = None  # last Web API version logged (one line per change)
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
            api_key=self._api_key or None,
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

    def webapi(self, client: qbittorrentapi.Client) -> WebApi:
        """The :class:`WebApi` of this qBittorrent, asked once per connection.

        Call only from inside a :meth:`call` function (a worker thread). A connection error
        forgets it (see :meth:`_run`): the qBittorrent that answers after a restart may be
        another version, and a stale name would fail silently (renamed parameters) or 404.
        """
        with self._webapi_lock:
            api = self._webapi
        if api is None:
            api = WebApi(parse_version(str(client.app_web_api_version())))
            with self._webapi_lock:
                self._webapi = api
            if self._detected != api.text:
                self._detected = api.text
                metrics.qb_webapi_info.labels(self.mode, api.text).set(1)
                log.info(
                    "event=qb_webapi_detected mode=%s url=%s webapi=%s stop=%s start=%s "
                    "add_stopped=%s add_skip_checking=%s auth=%s",
                    self.mode,
                    redact_url(self.url),
                    api.text,
                    api.stop_method,
                    api.start_method,
                    api.stopped_param,
                    api.skip_checking_param,
                    "api_key" if self._api_key else "password" if self._username else "none",
                )
                if self._api_key and not api.api_keys:
                    # Older servers ignore the Bearer header; with the WebUI's localhost bypass
                    # they would even answer as if it had been accepted.
                    log.warning(
                        "event=qb_api_key_unsupported mode=%s url=%s webapi=%s reason=%s",
                        self.mode,
                        redact_url(self.url),
                        api.text,
                        "API keys need qBittorrent 5.2 (Web API 2.14.1); use a username and "
                        "password",
                    )
        return api

    def _run(self, fn: Callable[[qbittorrentapi.Client], T]) -> T:
        try:
            return fn(self._client())
        except (qbittorrentapi.LoginFailed, qbittorrentapi.HTTPError):
            raise  # qBittorrent answered: same process, same version
        except qbittorrentapi.APIConnectionError:
            with self._webapi_lock:
                self._webapi = None
            raise

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
                                lambda: self._run(fn), abandon_on_cancel=True
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

    def _post(self, c: qbittorrentapi.Client, method: str, **data: str) -> None:
        c._post(_name=APINames.Torrents, _method=method, data=data)

    async def stop(self, info_hash: str) -> None:
        """``torrents/stop`` (5.0+) or ``torrents/pause`` (4.x), by the session's version."""
        await self.call(
            "torrents_stop", lambda c: self._post(c, self.webapi(c).stop_method, hashes=info_hash)
        )

    async def start(self, info_hash: str) -> None:
        """``torrents/start`` (5.0+) or ``torrents/resume`` (4.x), by the session's version."""
        await self.call(
            "torrents_start",
            lambda c: self._post(c, self.webapi(c).start_method, hashes=info_hash),
        )

    async def add_torrent(
        self,
        torrent: bytes,
        *,
        filename: str,
        save_path: str,
        category: str | None,
        tags: list[str],
        stopped: bool,
        skip_checking: bool,
        content_layout: str = "Original",
        auto_tmm: bool = False,
        sequential: bool = False,
    ) -> list[str] | None:
        """``torrents/add`` of one ``.torrent`` with each parameter under the name this
        qBittorrent reads (``paused``/``stopped``, ``skip_checking``/``seedMode``): sending
        only the other name would be ignored silently (a torrent that starts seeding, or a
        full recheck). Returns the added ids when qBittorrent says (5.2+ answers JSON), else
        None. A refusal is logged, not raised: the caller checks the torrent is listed.
        """

        def run(c: qbittorrentapi.Client) -> list[str] | None:
            api = self.webapi(c)
            data = {
                "savepath": save_path,
                api.stopped_param: _bool(stopped),
                api.skip_checking_param: _bool(skip_checking),
                "contentLayout": content_layout,
                "autoTMM": _bool(auto_tmm),
                "sequentialDownload": _bool(sequential),
            }
            if category:
                data["category"] = category
            if tags:
                data["tags"] = ",".join(tags)
            resp = c._post(
                _name=APINames.Torrents,
                _method="add",
                data=data,
                files={"torrents": (filename, torrent)},
            )
            text = str(resp.text)
            if api.add_returns_json and text.lstrip().startswith("{"):
                body = resp.json()
                ids = [str(i) for i in body.get("added_torrent_ids") or []]
                if not body.get("success_count") and not body.get("pending_count"):
                    log.warning(
                        "event=qb_add_refused url=%s answer=%s", redact_url(self.url), text[:200]
                    )
                return ids
            if text.strip() not in ("", "Ok."):
                log.warning(
                    "event=qb_add_refused url=%s answer=%s", redact_url(self.url), text[:200]
                )
            return None

        return await self.call("torrents_add", run)

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
