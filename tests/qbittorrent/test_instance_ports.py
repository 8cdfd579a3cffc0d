"""free_port: ports from a block below the kernel's ephemeral range, never the same one twice
in a process, so two test workers (or the demo beside a test) are not handed one port."""

from __future__ import annotations

import socket

import pytest

from qbsync.qbittorrent import instance
from qbsync.qbittorrent.instance import free_port


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    block = instance._port_block()
    assert block is not None  # Linux's default range leaves room below it
    low, high = block
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(low <= p < high for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # it was free


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", free_port()))
    taken = held.getsockname()[1]
    try:
        monkeypatch.setattr(instance, "_port_cursor", taken)  # the walk is about to reach it
        assert free_port() != taken
    finally:
        held.close()


def test_without_room_below_the_ephemeral_range_the_kernel_picks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(instance, "_port_block", lambda: None)
    port = free_port()
    assert 1024 <= port < 65536


def test_slots_are_disjoint_and_apart_from_the_shared_half(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two test workers (different slots) can never be handed one port, nor can a worker and a
    process with no slot (the demo's daemons)."""
    parts = []
    for slot in (*range(instance.PORT_SLOTS), None):
        monkeypatch.setattr(instance, "_port_slot", slot)
        block = instance._port_block()
        assert block is not None
        parts.append(range(*block))
    for i, a in enumerate(parts):
        assert len(a) >= 1000
        for b in parts[i + 1 :]:
            assert not set(a) & set(b)
    with pytest.raises(ValueError, match="port slot"):
        instance.use_port_slot(instance.PORT_SLOTS)
