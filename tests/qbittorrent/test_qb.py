"""The qBittorrent wrapper's own logic: state names, tags, retries and the circuit breaker.

The breaker test talks to a real closed port on 127.0.0.1 (connection refused), not a mock.
"""

from __future__ import annotations

import socket

import pytest
import trio

from qbsync.qbittorrent import api as qb
from qbsync.qbittorrent.api import (
    QB,
    CircuitOpen,
    QBError,
    completion_time,
    normalize_state,
    split_tags,
)


def test_normalize_state_maps_4x_names() -> None:
    assert normalize_state("pausedUP") == "stoppedUP"
    assert normalize_state("pausedDL") == "stoppedDL"
    assert normalize_state("stalledUP") == "stalledUP"
    assert normalize_state("stoppedDL") == "stoppedDL"


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"completion_on": 1_765_000_000}, 1_765_000_000.0),
        ({"completion_on": 0}, None),
        ({"completion_on": -1}, None),  # not completed (5.x)
        ({"completion_on": 4294967295}, None),  # -1 as unsigned 32-bit
        ({"completion_on": "x"}, None),
        ({}, None),
    ],
)
def test_completion_time(info: dict[str, object], expected: float | None) -> None:
    assert completion_time(info) == expected


def test_split_tags() -> None:
    assert split_tags("a, b c ,synced") == ["a", "b c", "synced"]
    assert split_tags("") == []
    assert split_tags(None) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_qb_retries_then_opens_breaker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qb, "RETRY_BASE", 0.01)
    monkeypatch.setattr(qb, "BREAKER_COOLDOWN", 0.2)
    client = QB(f"http://127.0.0.1:{_closed_port()}", mode="source")
    with pytest.raises(QBError) as first:
        await client.version()
    assert first.value.transient
    # RETRY_ATTEMPTS failures per call: the breaker (threshold 5) opens during the second call.
    with pytest.raises(QBError):
        await client.version()
    with pytest.raises(CircuitOpen):
        await client.version()
    await trio.sleep(0.25)  # cooldown passes: one half-open attempt is let through (and fails)
    with pytest.raises(QBError) as half_open:
        await client.version()
    assert not isinstance(half_open.value, CircuitOpen)
