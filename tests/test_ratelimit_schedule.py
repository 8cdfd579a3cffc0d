"""``--rate-limit`` sizes and timetables, with an injected clock (no sleeping)."""

from __future__ import annotations

import datetime as dt

import pytest

from qbsync.config import ConfigError, parse_size, redacted, resolve
from qbsync.ratelimit import (
    MiB,
    RateSchedule,
    ScheduledLimiter,
    TokenBucket,
    make_limiter,
)

K = 1024


def sched(text: str) -> RateSchedule:
    return RateSchedule.parse(text, parse_size)


def at(hh: int, mm: int, day: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, 30, hh, mm) + dt.timedelta(days=day)  # 2026-11-30 is a Monday


def test_daily_timetable_periods_and_midnight_carry_over() -> None:
    s = sched("08:00,10M 12:00,512K 23:00,off")
    assert not s.weekly
    assert s.entries == ((480, 10 * MiB), (720, 512 * K), (1380, 0))
    assert s.rate_at(at(7, 59)) == 0  # before the first entry: 23:00's "off" carries over
    assert s.rate_at(at(8, 0)) == 10 * MiB
    assert s.rate_at(at(11, 59)) == 10 * MiB
    assert s.rate_at(at(12, 0)) == 512 * K
    assert s.rate_at(at(23, 30)) == 0
    assert str(s) == "08:00,10M 12:00,512K 23:00,off"


def test_weekly_timetable() -> None:
    s = sched("Mon-08:00,1M Fri-18:00,off Sun-20:00,2M")
    assert s.weekly
    assert s.rate_at(at(7, 0, day=0)) == 2 * MiB  # Monday early: Sunday 20:00 carries over
    assert s.rate_at(at(9, 0, day=2)) == MiB  # Wednesday
    assert s.rate_at(at(19, 0, day=4)) == 0  # Friday evening
    assert s.rate_at(at(21, 0, day=6)) == 2 * MiB  # Sunday night


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("08:00", "not TIME,RATE"),
        ("8,10M", "bad time"),
        ("24:00,1M", "bad time"),
        ("08:60,1M", "bad time"),
        ("08:00,10X", "not a size"),
        ("08:00,1M 08:00,2M", "twice"),
        ("Mon-08:00,1M 09:00,2M", "weekday"),
        ("Xyz-08:00,1M", "unknown weekday"),
    ],
)
def test_bad_timetables_are_rejected(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        sched(text)


class Wall:
    def __init__(self, when: dt.datetime) -> None:
        self.when = when

    def __call__(self) -> dt.datetime:
        return self.when


def test_scheduled_limiter_follows_the_timetable_with_an_injected_clock() -> None:
    wall = Wall(at(9, 0))
    changes: list[int] = []
    lim = ScheduledLimiter(sched("08:00,1M 20:00,off"), MiB, wall, changes.append)
    assert lim.reserve(MiB, 0.0) == 0  # the burst
    assert lim.reserve(MiB, 0.0) == pytest.approx(1.0)  # then 1 MiB/s
    assert changes == [MiB]
    wall.when = at(20, 0)  # "off": no waiting at all, and the earlier debt is forgiven
    assert lim.reserve(100 * MiB, 0.5) == 0
    assert lim.reserve(100 * MiB, 0.5) == 0
    wall.when = at(8, 0, day=1)  # next morning: limited again, with a fresh burst
    assert lim.reserve(MiB, 1.0) == 0
    assert lim.reserve(MiB // 2, 1.0) == pytest.approx(0.5)
    assert changes == [MiB, 0, MiB]


def test_make_limiter_kinds() -> None:
    assert make_limiter(0) is None
    assert isinstance(make_limiter(5 * MiB), TokenBucket)
    assert isinstance(make_limiter(sched("00:00,1M")), ScheduledLimiter)


BASE = {"data": "/tmp", "qb_url": "http://127.0.0.1:1", "destination_addr": "127.0.0.1:2"}


@pytest.mark.parametrize(
    ("raw", "value"),
    [("0", 0), ("1048576", MiB), ("50M", 50 * MiB), ("1.5G", 1536 * MiB), ("off", 0)],
)
def test_rate_limit_option_sizes(raw: str, value: int) -> None:
    config = resolve("source", {**BASE, "rate_limit": raw}, {})
    assert config.rate_limit == value  # type: ignore[union-attr]


def test_rate_limit_option_timetable_from_env_and_print_config() -> None:
    env = {"QBSYNC_SOURCE_RATE_LIMIT": "08:00,10M 23:00,off"}
    config = resolve("source", BASE, env)
    assert isinstance(config.rate_limit, RateSchedule)  # type: ignore[union-attr]
    assert redacted(config)["rate_limit"] == "08:00,10M 23:00,off"


@pytest.mark.parametrize(("raw", "error"), [("-1", "must not be negative"), ("8:00", "TIME")])
def test_rate_limit_option_errors_name_the_flag(raw: str, error: str) -> None:
    with pytest.raises(ConfigError, match="rate-limit") as exc:
        resolve("source", {**BASE, "rate_limit": raw}, {})
    assert error in str(exc.value)
