"""Token bucket and reconnect backoff (pure timing logic, no sleeping)."""

from __future__ import annotations

import random

import pytest

from qbsync.ratelimit import Backoff, MiB, TokenBucket


def test_bucket_burst_then_rate():
    b = TokenBucket(rate=1000, burst=500, now=0.0)
    assert b.reserve(500, 0.0) == 0  # the burst is available at once
    assert b.reserve(100, 0.0) == pytest.approx(0.1)  # then 100 bytes take 0.1 s
    assert b.reserve(100, 0.0) == pytest.approx(0.2)  # FIFO: waits behind the earlier debt
    # After the debt is paid, tokens refill up to the burst, never beyond.
    assert b.reserve(0, 10.0) == 0
    assert b.tokens == 500


def test_bucket_piece_larger_than_burst_and_long_run_rate():
    rate = 2 * MiB
    b = TokenBucket(rate=rate, burst=MiB, now=0.0)
    now, sent = 0.0, 0
    for _ in range(100):
        wait = b.reserve(4 * MiB, now)  # pieces 4x the burst still go, just later
        now += wait
        sent += 4 * MiB
    # 100 pieces of 4 MiB at 2 MiB/s, minus the initial burst: ~ (400-1)/2 s.
    assert now == pytest.approx((sent - MiB) / rate, rel=1e-6)


def test_bucket_rejects_zero_rate():
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_backoff_grows_caps_and_resets():
    b = Backoff(0.5, 8.0, jitter=0.0)
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    b.reset()
    assert b.next_delay() == 0.5


def test_backoff_jitter_bounds():
    b = Backoff(1.0, 30.0, jitter=0.2, rng=random.Random(7))
    delays = []
    for _ in range(200):
        b.reset()
        delays.append(b.next_delay())
    assert min(delays) >= 0.8 and max(delays) <= 1.2
    assert len(set(delays)) > 100  # actually jittered
    b.reset()
    for _ in range(50):
        assert b.next_delay() <= 30.0  # never above the cap, jitter included
