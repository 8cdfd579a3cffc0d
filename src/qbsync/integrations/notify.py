"""``--notify-url``: POST a small JSON event when a torrent is synced, fails for good or is
handed off.

People want to *react* to a sync: a chat message, or telling Sonarr/Radarr that a download
arrived on the media server. The daemons already know when that happens; this module tells
a webhook, without ever putting the data path at risk:

* :meth:`Notifier.emit` is synchronous and O(1): it appends to a bounded queue and returns.
  When the queue is full the *oldest* event is dropped (counted in
  ``qbsync_notifications_total{result="dropped"}``) -- a dead webhook must not grow memory.
* One background task (:meth:`Notifier.run`) posts the events in order, each attempt under a
  timeout (a receiver that accepts and never answers costs ``timeout`` seconds, nothing
  more), with a bounded number of retries and backoff for network errors, 429 and 5xx.
  Other 4xx answers are not retried (the request will not get better).
* The payload has a fixed set of fields (:func:`payload`): no token, no qBittorrent
  credentials, no configuration. The URL itself may hold a webhook secret, so it is never
  logged -- only its scheme and host are.

The payload is documented in the README (section "Notifications").
"""

from __future__ import annotations

import collections
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Literal

import trio

from .. import __version__, metrics
from ..log import kv, redact_url

log = logging.getLogger("qbsync.integrations.notify")

Event = Literal["synced", "failed", "handed_off"]
EVENTS: tuple[Event, ...] = ("synced", "failed", "handed_off")
PAYLOAD_SCHEMA = 1

# (url, body, timeout) -> HTTP status; raises OSError for network errors and timeouts.
Poster = Callable[[str, bytes, float], int]


def payload(
    event: Event,
    role: str,
    info_hash: str,
    name: str,
    *,
    size: int | None = None,
    path: str | None = None,
    code: str | None = None,
    message: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The JSON body. Only these fields, ever: nothing secret can end up in it."""
    return {
        "schema": PAYLOAD_SCHEMA,
        "event": event,
        "role": role,
        "hash": info_hash,
        "name": name,
        "size": size,
        "path": path,
        "code": code,
        "message": message[:500] if message else message,
        "time": round(time.time() if now is None else now, 3),
        "version": __version__,
        "text": _text(event, name, code, message),
    }


def _text(event: Event, name: str, code: str | None, message: str | None) -> str:
    """A one-line human summary (chat webhooks such as Slack's and Mattermost's show
    ``text``; Discord needs ``content`` -- see the README)."""
    if event == "synced":
        return f"qbsync: {name} synced and verified"
    if event == "handed_off":
        return f"qbsync: {name} handed off to the destination"
    return f"qbsync: {name} failed to sync ({code or 'error'}: {message or 'no details'})"


def safe_target(url: str) -> str:
    """What may be logged of the URL: scheme and host (path and query may hold a secret)."""
    return redact_url(url, keep_path=False)


def http_post(url: str, body: bytes, timeout: float) -> int:
    """POST ``body`` as JSON; the status code (also for 4xx/5xx). Runs in a worker thread."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": f"qbsync/{__version__}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            resp.read(65536)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


class Notifier:
    """Posts events to ``url`` (``""`` disables it: :meth:`emit` then does nothing)."""

    def __init__(
        self,
        url: str,
        role: str,
        *,
        queue_size: int = 100,
        timeout: float = 10.0,
        attempts: int = 3,
        backoff: float = 2.0,
        poster: Poster = http_post,
    ) -> None:
        self.url = url
        self.role = role
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self._poster = poster
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=queue_size)
        self._wake = trio.Event()
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def emit(
        self,
        event: Event,
        info_hash: str,
        name: str,
        **fields: Any,
    ) -> None:
        """Queue an event and return at once (safe to call from any task on the Trio thread)."""
        if not self.url:
            return
        if len(self._queue) == self._queue.maxlen:
            dropped = self._queue[0]  # the deque drops the oldest on append
            self.dropped += 1
            metrics.notifications.labels(dropped["event"], "dropped").inc()
            log.warning(
                "event=notify_dropped code=queue-full dropped_event=%s hash=%s",
                dropped["event"],
                dropped["hash"],
            )
        self._queue.append(payload(event, self.role, info_hash, name, **fields))
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver queued events one at a time until cancelled."""
        task_status.started()
        if not self.url:
            await trio.sleep_forever()
        log.info("event=notify_enabled target=%s", kv(safe_target(self.url)))
        while True:
            while not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            await self._deliver(self._queue.popleft())

    async def _deliver(self, body: dict[str, Any]) -> None:
        data = json.dumps(body, sort_keys=True).encode()
        event = body["event"]
        reason = ""
        for attempt in range(1, self.attempts + 1):
            retry = True
            try:
                with trio.fail_after(self.timeout + 5):  # the thread's own timeout comes first
                    status = await trio.to_thread.run_sync(
                        self._poster, self.url, data, self.timeout, abandon_on_cancel=True
                    )
            except (OSError, trio.TooSlowError) as exc:
                reason = f"{type(exc).__name__}: {exc}"[:200]
            else:
                if 200 <= status < 300:
                    self.sent += 1
                    metrics.notifications.labels(event, "sent").inc()
                    log.info(
                        "event=notify_sent notify_event=%s hash=%s status=%d attempt=%d",
                        event,
                        body["hash"],
                        status,
                        attempt,
                    )
                    return
                reason = f"HTTP {status}"
                retry = status == 429 or status >= 500
            if not retry or attempt == self.attempts:
                break
            await trio.sleep(self.backoff * 2 ** (attempt - 1))
        self.failed += 1
        metrics.notifications.labels(event, "failed").inc()
        log.warning(
            "event=notify_failed code=notify notify_event=%s hash=%s target=%s attempts=%d "
            "error=%s",
            event,
            body["hash"],
            kv(safe_target(self.url)),
            attempt,
            kv(reason),
        )


DISABLED = Notifier("", "none")
"""The notifier of a daemon without ``--notify-url`` (and the default of every call site)."""
