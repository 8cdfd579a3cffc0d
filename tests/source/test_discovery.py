"""``Discovery``: probe back-off and the hard-link gate as pure logic (no qBittorrent, no
clock: the test passes the time and the tracked hashes as the orchestrator does)."""

from __future__ import annotations

from qbsync.source.discovery import Discovery

SHARED = frozenset({(1, 10)})
OTHER = frozenset({(1, 20)})


def test_a_new_torrent_is_due_and_a_retry_defers_it() -> None:
    d = Discovery()
    assert d.due("a", 0.0)
    d.retry_at("a", 5.0)
    assert not d.due("a", 4.9)
    assert d.due("a", 5.0)
    assert d.due("b", 0.0)  # the back-off is per hash


def test_keep_listed_forgets_torrents_no_longer_listed() -> None:
    d = Discovery()
    d.retry_at("gone", 100.0)
    d.retry_at("kept", 100.0)
    d.keep_listed({"kept"})
    assert d.due("gone", 0.0)
    assert not d.due("kept", 0.0)


def test_gate_blocks_on_an_active_torrent_sharing_a_linked_file() -> None:
    d = Discovery()
    assert d.gate("first", SHARED, active=[]) is None
    assert d.gate("second", SHARED, active=["first"]) == "first"
    assert d.gate("third", OTHER, active=["first"]) is None
    assert d.gate("fourth", SHARED, active=[]) is None  # the sharer is not active: go


def test_a_torrent_never_waits_on_itself_and_no_links_never_wait() -> None:
    d = Discovery()
    assert d.gate("a", SHARED, active=[]) is None
    assert d.gate("a", SHARED, active=["a"]) is None
    assert d.gate("b", frozenset(), active=["a"]) is None


def test_a_waiter_is_not_due_until_its_blocker_is_untracked() -> None:
    d = Discovery()
    d.gate("blocker", SHARED, active=[])
    assert d.gate("waiter", SHARED, active=["blocker"]) == "blocker"
    d.wait("waiter", "blocker")
    assert d.anyone_waiting and d.waiting_for() == {"waiter": "blocker"}
    assert not d.due("waiter", 1e12)
    d.release(tracked={"blocker"})  # still tracked: keeps waiting
    assert not d.due("waiter", 1e12)
    d.release(tracked=set())  # finalized (or failed, or removed): released at once
    assert d.due("waiter", 0.0)
    assert not d.anyone_waiting


def test_release_drops_file_ids_of_torrents_neither_tracked_nor_waiting() -> None:
    d = Discovery()
    d.gate("old", SHARED, active=[])
    d.release(tracked=set())  # "old" was untracked: its identities no longer block anyone
    assert d.gate("new", SHARED, active=["old"]) is None


def test_release_keeps_file_ids_of_a_waiter_and_of_tracked_torrents() -> None:
    d = Discovery()
    d.gate("a", SHARED, active=[])
    d.gate("b", SHARED, active=["a"])
    d.wait("b", "a")
    d.release(tracked={"a"})
    assert d.gate("c", SHARED, active=["a"]) == "a"
    assert d.gate("c", SHARED, active=["b"]) == "b"  # b's identities were kept while it waits
