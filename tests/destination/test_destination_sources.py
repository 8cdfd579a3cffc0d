"""Several sources, one destination: per-source counts and one source per torrent."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from qbsync import metrics
from qbsync.destination.sources import MAX_LABELS, OWNER_GRACE, Sources, source_name
from qbsync.http.status import render_html, render_table
from qbsync.wire import (
    Abort,
    Finalize,
    FinalizeResult,
    InitResult,
    InitTorrent,
    Peer,
    Piece,
    SyncStatus,
)
from qbsync.wire.errors import RETRYABLE, ErrorCode, WireError
from tests.destination.test_destination_writer import build, torrent
from tests.wireclient import needed_indices


def peer(name: str) -> SimpleNamespace:
    return SimpleNamespace(instance=name, address="127.0.0.1:1", conn_id=1)


def test_names_are_sanitized_and_the_label_set_is_capped() -> None:
    assert source_name("box-a") == "box-a"
    assert source_name('ev"il\n{x}') == "evilx"
    assert source_name("") == "unnamed"
    sources = Sources()
    for i in range(MAX_LABELS + 5):
        sources.on_peer(peer(f"s{i}"), True)
    labels = {s.label for s in sources._by_name.values()}
    assert len(labels) == MAX_LABELS + 1 and "other" in labels
    assert metrics.source_connections.labels("other")._value.get() == 5


async def test_second_source_waits_while_the_owner_is_present(autojump_clock: object) -> None:
    sources = Sources()
    sources.on_peer(peer("a"), True)
    sources.on_peer(peer("b"), True)
    sources.claim("h", "a")
    sources.claim("h", "a")  # the owner again: fine
    sources.init_done("h")
    sources.init_done("h")
    with pytest.raises(WireError) as exc:
        sources.claim("h", "b")
    assert exc.value.code == ErrorCode.OWNED_BY_OTHER_SOURCE
    assert exc.value.code in RETRYABLE  # the source retries later
    with pytest.raises(WireError):
        sources.check("h", "b", in_progress=True)
    sources.check("h", "b", in_progress=False)  # finalized meanwhile: a stale claim goes
    assert sources.owner("h") is None
    # An owner gone for longer than the grace loses its claim to the next source.
    sources.claim("h", "a")
    sources.init_done("h")
    sources.on_peer(peer("a"), False)
    await trio.sleep(OWNER_GRACE - 1)
    with pytest.raises(WireError):
        sources.claim("h", "b")
    await trio.sleep(2)
    sources.claim("h", "b")
    assert sources.owner("h") == "b"


def test_refresh_drops_finished_claims_and_counts_torrents() -> None:
    sources = Sources()
    sources.on_peer(peer("a"), True)
    sources.claim("h1", "a")
    sources.claim("h2", "a")
    sources.init_done("h1")
    sources.init_done("h2")
    sources.refresh({"h1": object()})
    assert sources.owner("h2") is None
    assert metrics.source_torrents.labels("a")._value.get() == 1
    status = sources.status()
    assert status == [
        {
            "name": "a",
            "connections": 1,
            "pieces_inflight": 0,
            "torrents": 1,
            "connected": True,
            "last_seen": status[0]["last_seen"],
        }
    ]


def test_status_page_and_table_list_the_sources() -> None:
    doc = {
        "role": "destination",
        "daemon": {},
        "torrents": [],
        "sources": [
            {"name": "box-a", "connections": 2, "torrents": 1, "pieces_inflight": 3, "connected": 1}
        ],
    }
    assert "source box-a" in render_html(doc)
    out = io.StringIO()
    render_table(doc, out)
    assert (
        "source box-a: connected, connections 2, torrents 1, pieces in flight 3" in out.getvalue()
    )


async def test_destination_server_lets_one_source_sync_an_info_hash(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Through the real request handling: source B is told to wait for every request about a
    torrent A is syncing (its partial state is never touched), and once A's copy is
    finalized B's probe answers complete -- stored once."""
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    a, b = Peer("a", 1, instance="box-a"), Peer("b", 2, instance="box-b")
    d.server.sources.on_peer(a, True)
    d.server.sources.on_peer(b, True)
    ready = await d.server.handle_request(a, t.init_msg())
    assert isinstance(ready, InitResult)
    for request in (
        InitTorrent(info_hash=t.info_hash, probe=True),
        t.init_msg(),
        Finalize(t.info_hash),
        Abort(t.info_hash),
    ):
        with pytest.raises(WireError) as exc:
            await d.server.handle_request(b, request)
        assert exc.value.code == ErrorCode.OWNED_BY_OTHER_SOURCE
    ack = await d.server.handle_piece(b, Piece(t.info_hash, 0, 0, t.piece(0)))
    assert ack.code == ErrorCode.OWNED_BY_OTHER_SOURCE
    assert t.info_hash in d.store.torrents  # B's abort deleted nothing
    assert metrics.owned_by_other_source.labels("box-b")._value.get() >= 5
    assert [s["torrents"] for s in d.server.status()["sources"]] == [1, 0]
    for i in needed_indices(ready, t.num_pieces):
        ack = await d.server.handle_piece(a, Piece(t.info_hash, i, i * t.piece_length, t.piece(i)))
        assert ack.code == ErrorCode.OK
    result = await d.server.handle_request(a, Finalize(t.info_hash))
    while isinstance(result, FinalizeResult) and result.status == SyncStatus.VERIFYING:
        await trio.sleep(0.01)
        result = await d.server.handle_request(a, Finalize(t.info_hash))
    assert isinstance(result, FinalizeResult) and result.status == SyncStatus.COMPLETE
    probe = await d.server.handle_request(b, InitTorrent(info_hash=t.info_hash, probe=True))
    assert isinstance(probe, InitResult) and probe.status == SyncStatus.COMPLETE
    assert d.server.sources.owner(t.info_hash) is None


def test_status_page_and_table_show_refused_tagged_handoffs() -> None:
    doc = {
        "role": "source",
        "daemon": {},
        "torrents": [],
        "handoff_tag": {
            "tag": "handoff",
            "pending": 1,
            "refused": {"ab" * 20: {"reason": "not-started", "attempts": 2, "at": 0}},
        },
    }
    assert "refused (not-started), attempts 2" in render_html(doc)
    out = io.StringIO()
    render_table(doc, out)
    assert "handoff abababababab: refused (not-started), attempts 2" in out.getvalue()


def test_a_claim_holds_while_its_init_runs() -> None:
    """The first source's InitTorrent has claimed the torrent but not created its state yet
    (it validates the .torrent in a thread): another source's probe or refresh must not drop
    the claim, or both would sync it."""
    sources = Sources()
    sources.on_peer(peer("a"), True)
    sources.on_peer(peer("b"), True)
    sources.claim("h", "a")
    with pytest.raises(WireError):
        sources.check("h", "b", in_progress=False)  # the state does not exist yet
    sources.refresh(set())
    with pytest.raises(WireError):
        sources.claim("h", "b")
    sources.init_done("h")
    sources.refresh(set())  # the init failed or found it complete: no state, no claim
    sources.claim("h", "b")


def test_a_name_belongs_to_the_first_key_that_announced_it() -> None:
    """A paired source cannot pass for another one by announcing its name: the name stays
    bound to the first key, and the other key is known by the name plus its fingerprint, so
    it neither shares the first source's counts nor owns the torrents it claimed."""
    sources = Sources()
    real = SimpleNamespace(instance="box-a", fingerprint="SHA256:realkey123", conn_id=1)
    rogue = SimpleNamespace(instance="box-a", fingerprint="SHA256:roguekey45", conn_id=2)
    assert sources.identify(real) == "box-a"
    assert sources.identify(rogue) == "box-a~roguekey"
    assert sources.identify(real) == "box-a"  # the binding does not move
    sources.on_peer(real, True)
    sources.on_peer(rogue, True)
    sources.claim("h", sources.identify(real))
    sources.init_done("h")
    with pytest.raises(WireError) as exc:
        sources.check("h", sources.identify(rogue), in_progress=True)
    assert exc.value.code == ErrorCode.OWNED_BY_OTHER_SOURCE
