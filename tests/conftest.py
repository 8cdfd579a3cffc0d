"""Shared pytest configuration.

Hypothesis profiles: ``dev`` (default, 100 examples, quick local runs), ``ci`` (500
examples, no per-example deadline because a loaded 2-core CI box makes timings meaningless)
and ``quick`` (20 examples: ``make check``'s inner loop, a smoke test of every property, not
a search). ``make test`` selects ``ci`` with ``HYPOTHESIS_PROFILE=ci``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100)
settings.register_profile("quick", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
