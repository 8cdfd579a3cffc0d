"""sd_notify for systemd ``Type=notify`` units (no dependency: one datagram per message).

``READY=1`` once the daemon serves, ``STOPPING=1`` when it begins to stop, ``STATUS=...`` for
``systemctl status``, and ``WATCHDOG=1`` pings while the daemon is live (``WatchdogSec=``):
the pings come from :func:`watchdog`, which only pings while every supervised loop's
heartbeat is fresh, so a wedged daemon is restarted by systemd. Everything is a no-op when
``NOTIFY_SOCKET`` is not set (not under systemd).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

import trio

log = logging.getLogger("qbsync.integrations.systemd")


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd. True if it was sent."""
    env = os.environ if env is None else env
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("event=sd_notify_failed error=%s", exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Half the watchdog timeout systemd asked for, in seconds (None: no watchdog)."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def watchdog(live: Callable[[], Awaitable[bool]], interval: float) -> None:
    """Ping the watchdog every ``interval`` seconds while ``live()`` says so."""
    while True:
        if await live():
            notify("WATCHDOG=1")
        await trio.sleep(interval)
