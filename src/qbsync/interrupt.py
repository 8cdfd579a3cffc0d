"""Ctrl-C ends a long-running command wherever it lands, and nothing is started after it.

Why this exists: a shell without job control (a CI script, ``cmd &`` in ``sh -c``) starts its
background jobs with SIGINT *ignored*, and Python installs its ``KeyboardInterrupt`` handler
only over the default disposition. Every command started from such a job then ignores Ctrl-C
(and SIGINT from a test or a supervisor) silently: ``qbsync status --watch`` went on polling,
``qbsync demo`` ran to the end. The daemons were not affected because ``trio``'s signal
receiver installs its own handler; the synchronous commands use this module for the same.

:func:`interruptible` installs a handler for SIGINT and SIGTERM (whatever the inherited
disposition) that records the first signal and raises ``KeyboardInterrupt`` (later ones
are recorded by that first one only); the command calls
:meth:`Interrupt.check` before each request it makes, so even code that swallowed the
exception cannot make a request after the signal.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


class Interrupt:
    """The first stop signal received while :func:`interruptible` is active."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` when a stop signal has arrived (call before a request)."""
        if self.signum is not None:
            raise KeyboardInterrupt

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        # Only the first signal raises: a second Ctrl-C must not cut short the clean-up the
        # first one started (stopping child processes by PID); SIGKILL still ends everything.
        if self.signum is None:
            self.signum = signum
            raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible(
    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[Interrupt]:
    """Within the block, each of ``signals`` raises ``KeyboardInterrupt`` (even when the
    process inherited it ignored); the previous handlers come back on exit."""
    stop = Interrupt()
    previous = {sig: signal.signal(sig, stop._handler) for sig in signals}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
