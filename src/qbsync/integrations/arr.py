"""Sonarr/Radarr (v3 API): skip what they rejected, import what qbsync finished.

Two seams, both optional (``--arr-url`` / ``--arr-api-key``, on either daemon):

* **Source**: before a torrent starts syncing, its download's history is read
  (``GET /api/v3/history?downloadId=<HASH>``). If any instance recorded ``downloadFailed`` or
  ``downloadIgnored`` for it, qbsync does not sync it: the user (or *arr) threw it away, so
  copying it to the destination only wastes the link. When an instance cannot be asked, the
  torrent is synced anyway and a log line says so -- *arr being down must not stop syncing.
* **Destination**: once a torrent is finalized (every piece verified, files under their final
  names, added to qBittorrent and rechecked), the instance whose history knows the download is
  asked to import it: ``POST /api/v3/command`` with ``DownloadedEpisodesScan`` (Sonarr) or
  ``DownloadedMoviesScan`` (Radarr), the destination path and ``downloadClientId``. qbsync is
  the one place that knows the copy is complete, so *arr never imports a half-written file.

*arr stores download ids as the info-hash in upper case, so that is what is sent. The import
mode is ``Copy``: the destination qBittorrent seeds these files after the hand-off, so *arr
must not move them away (it hardlinks instead of copying when its settings allow).

HTTP runs in a worker thread (``urllib``) under a deadline; every failure is logged and
swallowed: *arr is a convenience, never a reason to fail a sync.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from .. import metrics
from ..config import split_list
from ..log import kv, redact_url

log = logging.getLogger("qbsync.integrations.arr")

REQUEST_TIMEOUT = 10.0  # seconds for one HTTP request
IMPORT_DEADLINE = 30.0  # seconds for the whole import request after a finalize
RECHECK_AFTER = 600.0  # seconds a history verdict is reused (a skipped torrent is asked again)
REJECTED_EVENTS = frozenset({"downloadFailed", "downloadIgnored"})
SCAN_COMMANDS = {"sonarr": "DownloadedEpisodesScan", "radarr": "DownloadedMoviesScan"}
IMPORT_MODE = "Copy"


class ArrError(Exception):
    """An *arr instance could not be asked (unreachable, HTTP error, unexpected answer)."""


def download_id(info_hash: str) -> str:
    """The id Sonarr/Radarr store for a qBittorrent download: the info-hash, upper case."""
    return info_hash.upper()


@attrs.define
class Arr:
    """One Sonarr or Radarr instance."""

    url: str
    api_key: str = attrs.field(repr=False)
    mode: str = "destination"
    app: str | None = None  # "sonarr" / "radarr", from /api/v3/system/status

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={
                "X-Api-Key": self.api_key,
                "Accept": "application/json",
                **({"Content-Type": "application/json"} if data is not None else {}),
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ArrError(f"HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ArrError(f"unreachable: {reason}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ArrError("answer is not JSON") from None

    async def call(
        self, operation: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> Any:
        try:
            result = await trio.to_thread.run_sync(
                self._request, method, path, body, abandon_on_cancel=True
            )
        except ArrError:
            metrics.arr_requests.labels(self.mode, operation, "error").inc()
            raise
        metrics.arr_requests.labels(self.mode, operation, "ok").inc()
        return result

    async def application(self) -> str:
        """``sonarr`` or ``radarr`` (asked once)."""
        if self.app is None:
            status = await self.call("system_status", "GET", "/api/v3/system/status")
            name = str((status or {}).get("appName") or "").lower()
            if name not in SCAN_COMMANDS:
                raise ArrError(f"not Sonarr or Radarr (appName {name!r})")
            self.app = name
        return self.app

    async def history(self, info_hash: str) -> list[dict[str, Any]]:
        """The history records of one download, newest first."""
        query = urllib.parse.urlencode(
            {
                "downloadId": download_id(info_hash),
                "page": 1,
                "pageSize": 50,
                "sortKey": "date",
                "sortDirection": "descending",
            }
        )
        page = await self.call("history", "GET", f"/api/v3/history?{query}")
        records = (page or {}).get("records") if isinstance(page, dict) else None
        if not isinstance(records, list):
            raise ArrError("history answer has no records list")
        return [r for r in records if isinstance(r, dict)]

    async def scan(self, path: str, info_hash: str) -> int | None:
        """Queue the import command; returns *arr's command id."""
        app = await self.application()
        body = {
            "name": SCAN_COMMANDS[app],
            "path": path,
            "downloadClientId": download_id(info_hash),
            "importMode": IMPORT_MODE,
        }
        answer = await self.call("command", "POST", "/api/v3/command", body)
        command_id = (answer or {}).get("id") if isinstance(answer, dict) else None
        return int(command_id) if isinstance(command_id, int) else None


class ArrSet:
    """Every configured instance; empty when ``--arr-url`` is not set (then nothing runs)."""

    def __init__(self, urls: Sequence[str], api_keys: Sequence[str], *, mode: str) -> None:
        self.instances = [Arr(u, k, mode) for u, k in zip(urls, api_keys, strict=True)]
        self.mode = mode
        self._skip_logged: set[str] = set()
        self._verdicts: dict[str, tuple[float, str | None]] = {}  # hash -> (until, reason)

    @classmethod
    def from_config(cls, urls: str, api_keys: str, *, mode: str) -> ArrSet:
        """From ``--arr-url`` / ``--arr-api-key`` (comma-separated, same order; config.py
        has checked the counts match)."""
        return cls(split_list(urls), split_list(api_keys), mode=mode)

    def __bool__(self) -> bool:
        return bool(self.instances)

    async def rejected(self, info_hash: str, name: str = "") -> str | None:
        """Why the source must not sync this torrent (an instance marked its download failed
        or ignored), or None. An unreachable instance never rejects (logged). A verdict is
        reused for ``RECHECK_AFTER`` seconds so discovery does not ask every cycle."""
        now = trio.current_time()
        cached = self._verdicts.get(info_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        reason, complete = await self._ask(info_hash, name)
        if complete:
            self._verdicts[info_hash] = (now + RECHECK_AFTER, reason)
        return reason

    async def _ask(self, info_hash: str, name: str) -> tuple[str | None, bool]:
        complete = True
        for arr in self.instances:
            try:
                records = await arr.history(info_hash)
            except ArrError as exc:
                log.warning(
                    "event=arr_unreachable url=%s hash=%s action=sync_anyway error=%s",
                    kv(redact_url(arr.url)),
                    info_hash,
                    kv(str(exc)),
                )
                complete = False
                continue
            for record in records:
                event = str(record.get("eventType") or "")
                if event in REJECTED_EVENTS:
                    reason = f"{event} in {redact_url(arr.url)} history"
                    if info_hash not in self._skip_logged:
                        self._skip_logged.add(info_hash)
                        metrics.arr_torrents_skipped.inc()
                        log.info(
                            "event=arr_skip hash=%s name=%s reason=%s",
                            info_hash,
                            kv(name),
                            kv(reason),
                        )
                    return reason, True
        return None, complete

    async def import_synced(self, info_hash: str, path: str) -> bool:
        """Ask the instance that knows this download to import ``path``. Never raises; gives
        up after ``IMPORT_DEADLINE`` (the finalize it follows is already complete)."""
        with trio.move_on_after(IMPORT_DEADLINE):
            return await self._import(info_hash, path)
        log.warning("event=arr_import_failed hash=%s error=%s", info_hash, kv("deadline passed"))
        metrics.arr_imports.labels("error").inc()
        return False

    async def _import(self, info_hash: str, path: str) -> bool:
        for arr in self.instances:
            try:
                if not await arr.history(info_hash):
                    continue  # not this instance's download
                command_id = await arr.scan(path, info_hash)
            except ArrError as exc:
                metrics.arr_imports.labels("error").inc()
                log.warning(
                    "event=arr_import_failed url=%s hash=%s path=%s error=%s",
                    kv(redact_url(arr.url)),
                    info_hash,
                    kv(path),
                    kv(str(exc)),
                )
                continue
            metrics.arr_imports.labels("ok").inc()
            log.info(
                "event=arr_import_requested url=%s app=%s hash=%s path=%s command_id=%s",
                kv(redact_url(arr.url)),
                arr.app,
                info_hash,
                kv(path),
                command_id,
            )
            return True
        metrics.arr_imports.labels("no_match").inc()
        log.info("event=arr_no_match hash=%s instances=%d", info_hash, len(self.instances))
        return False
