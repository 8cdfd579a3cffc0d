"""Which supervised loop the running task belongs to, for ``/livez``.

A loop proves it is alive by calling ``Health.heartbeat(name)``; ``/livez`` fails when a loop
stops doing so. But a loop that is waiting on qBittorrent is not wedged: it is waiting on a
dependency whose every call is bounded by request timeouts and retries, and restarting qbsync
would not make qBittorrent answer faster. So ``/livez`` must not depend on qBittorrent, even a
qBittorrent that accepts connections and then hangs.

The heartbeat binds the calling task to its loop through a context variable (Trio gives each
task its own context, inherited by the tasks it spawns); :func:`waiting_on_dependency` then
pauses that loop's staleness for the duration of a dependency call, wherever in the call stack
the call happens, without the qBittorrent wrapper having to know which loop called it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Waiter(Protocol):
    def begin_wait(self) -> None: ...

    def end_wait(self) -> None: ...


_CURRENT: contextvars.ContextVar[Waiter | None] = contextvars.ContextVar(
    "qbsync_supervised_loop", default=None
)


def bind(loop: Waiter) -> None:
    """Make ``loop`` the supervised loop of the calling task (and of tasks it spawns later)."""
    _CURRENT.set(loop)


@contextmanager
def waiting_on_dependency() -> Iterator[None]:
    """Within this block the calling task's loop counts as alive (it is waiting, not stuck)."""
    loop = _CURRENT.get()
    if loop is None:
        yield
        return
    loop.begin_wait()
    try:
        yield
    finally:
        loop.end_wait()
