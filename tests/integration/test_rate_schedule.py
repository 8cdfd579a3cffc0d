"""A real ``qbsync source`` with a ``--rate-limit`` timetable: the period in force now applies.

The timetable is built around the current local time (the daemon's clock), so the test knows
which period is in force: 800 KiB/s from one minute ago, unlimited from two hours on. (Slow
enough that the limit shows: unlimited, the payload takes a second or two on loopback; fast
enough that the test does not wait half a minute for the bytes.)
"""

from __future__ import annotations

import datetime as dt
import time

import pytest

from tests.integration.source_rig import (
    Rig,
    metric,
)
from tests.qbharness import KiB, MiB

pytestmark = pytest.mark.integration


def test_source_applies_the_timetable_period_in_force(rig: Rig) -> None:
    now = dt.datetime.now()
    start = (now - dt.timedelta(minutes=1)).strftime("%H:%M")
    later = (now + dt.timedelta(hours=2)).strftime("%H:%M")
    source, health = rig.start_source("--rate-limit", f"{start},800K {later},off")
    started = time.monotonic()
    rig.add_to_source(download_limit=None)  # the source qBittorrent downloads at full speed
    source.wait_for_log("event=rate_limit_changed bytes_per_second=819200", timeout=60)
    assert metric(health, "qbsync_rate_limit_bytes_per_second") == 800 * KiB
    rig.wait_synced(timeout=120)
    elapsed = time.monotonic() - started
    rig.assert_identical()
    # A lower bound the token bucket guarantees (never faster than 800 KiB/s after its 1 MiB
    # burst), not a timing guess: unlimited, these 6 MiB take a second or two on loopback.
    assert elapsed >= (rig.seeded.total_size - MiB) / (800 * KiB), elapsed
    sent = metric(health, "qbsync_bytes_sent_total")
    assert sent >= rig.seeded.total_size - rig.seeded.piece_size
    # The limit held the whole time: one period, one change.
    assert source.log_text().count("event=rate_limit_changed") == 1
    assert "code=internal" not in source.log_text()
