"""Shared pytest configuration.

Hypothesis profiles: ``dev`` (default, 100 examples, quick local runs), ``ci`` (500
examples, no per-example deadline because a loaded 2-core CI box makes timings meaningless)
and ``quick`` (20 examples: ``make check``'s inner loop, a smoke test of every property, not
a search). ``make test`` selects ``ci`` with ``HYPOTHESIS_PROFILE=ci``.
"""

from __future__ import annotations

import os
import signal

from hypothesis import HealthCheck, settings

from qbsync.qbittorrent.instance import PORT_SLOTS, use_port_slot

# Tests stop the demo and `qbsync status --watch` with Ctrl-C (SIGINT). A shell that starts
# pytest in the background (`make test &`, some CI runners) sets SIGINT to "ignored", and
# every child inherits that: the Ctrl-C would be lost and those tests would wait for their
# full run and fail. Restore the default for this process, so its children get it too.
signal.signal(signal.SIGINT, signal.default_int_handler)

settings.register_profile(
    "ci", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100)
settings.register_profile("quick", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Each pytest-xdist worker (gw0, gw1, ...) takes its own slot of ports, so two workers running
# integration tests side by side are never handed the same port (see free_port).
_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
use_port_slot(int(_worker[2:]) % PORT_SLOTS if _worker[2:].isdigit() else 0)
