"""Contract tests of qb.py against loopback servers answering as qBittorrent 5.0, 5.2 and 5.3.

qBittorrent 4.5.2 (the installable one) runs in tests/integration; these cover the renames and
auth changes of 5.x (see tests/fakeqb.py for where each behaviour comes from). Every test
asserts the exact request paths and parameter names qbsync sent, through the real
qbittorrent-api library and, for the finalizer and the hand-off, through the real destination
server and the real source cleanup code.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from qbsync.destination.finalizer import Finalizer, FinalizerSettings
from qbsync.destination.server import DestinationServer
from qbsync.destination.store import Store
from qbsync.destination.writer import Writer
from qbsync.qbittorrent import api as qb_module
from qbsync.qbittorrent.api import QB, QBError, WebApi, parse_version
from qbsync.source.cache import CompletionCache
from qbsync.source.cleanup import Cleanup
from qbsync.source.paths import PathMapper
from qbsync.wire import ErrorCode, Finalize, Peer, Piece, StartTorrent, SyncStatus
from tests.fakeqb import serve_fake_qb
from tests.qbharness import KiB, make_payload
from tests.wireclient import LocalTorrent, needed_indices

PROFILES = ("5.0", "5.2", "5.3")


def test_webapi_names_by_version() -> None:
    old = WebApi(parse_version("2.8.19"))  # qBittorrent 4.5.2
    assert (old.stop_method, old.start_method) == ("pause", "resume")
    assert (old.stopped_param, old.skip_checking_param) == ("paused", "skip_checking")
    assert not old.add_returns_json
    v50 = WebApi(parse_version("2.11.2"))
    assert (v50.stop_method, v50.start_method, v50.stopped_param) == ("stop", "start", "stopped")
    assert v50.skip_checking_param == "skip_checking" and not v50.add_returns_json
    v52 = WebApi(parse_version("2.15.1"))
    assert v52.add_returns_json and v52.skip_checking_param == "skip_checking"
    assert WebApi(parse_version("2.16.2")).skip_checking_param == "seedMode"
    assert parse_version("v2.16.0beta") == (2, 16, 0)
    assert parse_version("garbage") == (0,)


@pytest.mark.parametrize("profile", PROFILES)
async def test_password_login_cookie_and_state_names(profile: str, tmp_path: Path) -> None:
    with serve_fake_qb(profile, username="admin", password="s3cret") as fake:
        qb = QB(fake.url, "admin", "s3cret", mode="source", max_threads=1)
        assert await qb.web_api_version() == fake.api_version
        logins = fake.calls("auth/login")
        assert len(logins) == 1
        expected = (204 if profile != "5.0" else 200, fake.cookie_name)
        assert (logins[0].status, fake.cookie_name) == expected
        assert fake.cookie_name == ("SID" if profile == "5.0" else f"QBT_SID_{fake.port}")
        # The session cookie (under this version's name) is what authorizes the next call.
        await qb.preferences()
        last = fake.requests[-1]
        assert last.status == 200 and f"{fake.cookie_name}=" in last.cookie
        # A stopped torrent is reported with 5.x state names.
        await qb.add_torrent(
            _torrent_bytes(tmp_path),
            filename="x.torrent",
            save_path="/downloads",
            category=None,
            tags=[],
            stopped=True,
            skip_checking=False,
        )
        (info,) = await qb.torrents()
        assert info["state"] == "stoppedDL"


@pytest.mark.parametrize("profile", PROFILES)
async def test_bad_credentials_fail_without_retry_loop(profile: str) -> None:
    with serve_fake_qb(profile, username="admin", password="s3cret") as fake:
        qb = QB(fake.url, "admin", "wrong", mode="source", max_threads=1)
        with pytest.raises(QBError) as err:
            await qb.preferences()
        assert not err.value.transient
        statuses = {r.status for r in fake.calls("auth/login")}
        assert statuses == ({401} if profile != "5.0" else {200})  # 5.0: 200 "Fails."


@pytest.mark.parametrize("profile", ("5.2", "5.3"))
async def test_api_key_is_a_bearer_token_and_never_logs_in(
    profile: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with serve_fake_qb(profile, username="admin", password="s3cret", api_key="k-123") as fake:
        qb = QB(fake.url, mode="destination", api_key="k-123", max_threads=1)
        await qb.preferences()
        await qb.stop("0" * 40)
        assert not fake.calls("auth/login")
        assert fake.requests and all(r.authorization == "Bearer k-123" for r in fake.requests)
        assert all(r.status in (200, 204) for r in fake.requests)
        assert "k-123" not in caplog.text
        wrong = QB(fake.url, mode="destination", api_key="nope", max_threads=1)
        with pytest.raises(QBError) as err:
            await wrong.preferences()
        assert "403" in str(err.value) and not err.value.transient


async def test_api_key_against_5_0_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    """5.0 has no API keys: the Bearer header is ignored (here the server has no password, as
    with the WebUI's localhost bypass, so calls still succeed), and qbsync says so."""
    with serve_fake_qb("5.0") as fake:
        qb = QB(fake.url, mode="source", api_key="k-123", max_threads=1)
        await qb.stop("a" * 40)
        assert "event=qb_api_key_unsupported" in caplog.text and "k-123" not in caplog.text
    assert not WebApi(parse_version("2.11.2")).api_keys and WebApi((2, 15, 1)).api_keys


@pytest.mark.parametrize("profile", PROFILES)
async def test_add_sends_only_the_names_this_version_reads(profile: str, tmp_path: Path) -> None:
    with serve_fake_qb(profile) as fake:
        qb = QB(fake.url, mode="destination", max_threads=1)
        raw = _torrent_bytes(tmp_path)
        ids = await qb.add_torrent(
            raw,
            filename="t.torrent",
            save_path="/data/tv",
            category="tv",
            tags=["a", "b"],
            stopped=True,
            skip_checking=True,
        )
        (add,) = fake.calls("torrents/add")
        assert add.method == "POST" and add.files == ["t.torrent"]
        f = add.fields
        assert f["stopped"] == "true" and "paused" not in f
        if profile == "5.3":
            assert f["seedMode"] == "true" and "skip_checking" not in f
        else:
            assert f["skip_checking"] == "true" and "seedMode" not in f
        assert f["savepath"] == "/data/tv" and f["category"] == "tv" and f["tags"] == "a,b"
        assert f["contentLayout"] == "Original" and f["autoTMM"] == "false"
        (t,) = fake.torrents.values()
        assert t.stopped and t.progress == 1.0  # the server honoured both parameters
        assert ids == ([t.hash] if profile != "5.0" else None)  # 5.2+ answers JSON with ids


def test_library_alone_asks_every_call_and_sends_both_names(tmp_path: Path) -> None:
    """What qbittorrent-api does without qb.py's mapping (the reason qb.py names these calls
    itself). If a library upgrade changes this, revisit qb.py's docstring."""
    import qbittorrentapi

    with serve_fake_qb("5.3") as fake:
        c = qbittorrentapi.Client(host=fake.url, FORCE_SCHEME_FROM_HOST=True)
        c.torrents_stop(torrent_hashes="a" * 40)
        c.torrents_stop(torrent_hashes="a" * 40)
        assert fake.paths() == ["app/webapiVersion", "torrents/stop"] * 2
        c.torrents_add(
            torrent_files=_torrent_bytes(tmp_path), is_stopped=True, is_skip_checking=True
        )
        (add,) = fake.calls("torrents/add")
        assert {"paused", "stopped", "skip_checking", "seedMode"} <= set(add.fields)


@pytest.mark.parametrize("profile", PROFILES)
async def test_version_asked_once_per_session_and_stop_start_names(profile: str) -> None:
    with serve_fake_qb(profile) as fake:
        qb = QB(fake.url, mode="source", max_threads=4)
        for _ in range(3):
            await qb.stop("a" * 40)
            await qb.start("a" * 40)
        assert fake.paths().count("app/webapiVersion") == 1
        names = [p for p in fake.paths() if p != "app/webapiVersion"]
        assert names == ["torrents/stop", "torrents/start"] * 3
        assert not {"torrents/pause", "torrents/resume"} & set(fake.paths())


async def test_version_asked_again_after_connection_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection error forgets the version: the qBittorrent that comes back after a restart
    may be another version (here a downgrade to 4.6, whose names are pause/resume)."""
    monkeypatch.setattr(qb_module, "RETRY_BASE", 0.01)
    with serve_fake_qb("5.0") as fake:
        port = fake.port
        qb = QB(fake.url, mode="source")
        await qb.stop("a" * 40)
        assert fake.paths() == ["app/webapiVersion", "torrents/stop"]
    with pytest.raises(QBError) as err:
        await qb.stop("a" * 40)  # nobody listens: a connection error
    assert err.value.transient
    with serve_fake_qb("4.6", port=port) as old:
        await qb.stop("a" * 40)
        await qb.start("a" * 40)
        assert old.paths() == ["app/webapiVersion", "torrents/pause", "torrents/resume"]


def _torrent_bytes(tmp: Path) -> bytes:
    return LocalTorrent.create(make_payload(tmp / "p", {"a.bin": 40_000}), 16 * KiB).torrent


PEER = Peer("test", 1)


@pytest.mark.parametrize("recheck", [False, True], ids=["skip-check", "recheck"])
@pytest.mark.parametrize("profile", PROFILES)
async def test_finalizer_and_handoff_through_each_version(
    profile: str, recheck: bool, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The destination finalizer (add stopped with skip-checking, or with ``--recheck`` a
    full recheck; tag) and the source hand-off (stop on the source, StartTorrent on the
    destination, delete on the source) against 5.x servers."""
    files = {"a.bin": 40_000, "d/b.bin": 9_000}
    t = LocalTorrent.create(make_payload(tmp_path / "src" / "payload", files), 16 * KiB)
    with serve_fake_qb(profile) as dst_fake, serve_fake_qb(profile) as src_fake:
        root = tmp_path / "data"
        store = Store(root)
        store.attach(nursery)
        dst_qb = QB(dst_fake.url, mode="destination")
        finalizer = Finalizer(
            store, dst_qb, FinalizerSettings(qb_save_path=root, poll_interval=0.02, recheck=recheck)
        )
        writer = Writer(store.root, workers=2, on_file_complete=finalizer.file_complete)
        store.on_file_complete = finalizer.file_complete
        server = DestinationServer(store, writer, finalizer, qb=dst_qb)

        ready = await server.init(t.init_msg())
        for i in needed_indices(ready, t.num_pieces):
            ack = await server.handle_piece(
                PEER, Piece(t.info_hash, i, i * t.piece_length, t.piece(i))
            )
            assert ack.code == ErrorCode.OK
        with trio.fail_after(30):
            while True:
                result = await server.finalize(Finalize(t.info_hash, category="", tags=("tv",)))
                if result.status != SyncStatus.VERIFYING:
                    break
                await trio.sleep(0.02)
        assert result.status == SyncStatus.COMPLETE, result
        (add,) = dst_fake.calls("torrents/add")
        assert add.fields["stopped"] == "true" and "paused" not in add.fields
        skip = "seedMode" if profile == "5.3" else "skip_checking"
        assert add.fields[skip] == ("false" if recheck else "true")
        assert ({"seedMode", "skip_checking"} - {skip}).isdisjoint(add.fields)
        assert bool(dst_fake.calls("torrents/recheck")) == recheck
        d = dst_fake.torrents[t.info_hash]
        assert d.stopped and {"synced", "tv"} <= d.tags  # left stopped: the source still seeds

        # The source seeds the same torrent; the hand-off moves seeding to the destination.
        src_qb = QB(src_fake.url, mode="source")
        await _add_synced_seeding(src_qb, t.torrent)
        cache = CompletionCache(tmp_path / "state")
        await cache.put(t.info_hash, "fp")

        async def request(msg: Any, *, within: float) -> Any:
            assert isinstance(msg, StartTorrent)
            return await server.start(msg)

        cleanup = _draining_cleanup(src_qb, request, cache, tmp_path)
        result2 = await cleanup.run_pass(await src_qb.torrents(), free_bytes=None, draining=True)
        assert result2 is not None and result2.handed_off == 1
        src_paths = [p for p in src_fake.paths() if p.startswith("torrents/")]
        assert "torrents/stop" in src_paths and "torrents/delete" in src_paths
        assert src_paths.index("torrents/stop") < src_paths.index("torrents/delete")
        assert not {"torrents/pause", "torrents/resume"} & set(src_fake.paths() + dst_fake.paths())
        assert dst_fake.calls("torrents/start")[0].fields["hashes"] == t.info_hash
        after = dst_fake.torrents[t.info_hash]
        assert after.stopped is False and "source-removed" in after.tags
        assert t.info_hash not in src_fake.torrents


async def _add_synced_seeding(qb: QB, torrent: bytes) -> None:
    """A source torrent that is seeding and already tagged ``synced`` (a hand-off candidate)."""
    await qb.add_torrent(
        torrent,
        filename="s.torrent",
        save_path="/downloads",
        category=None,
        tags=["synced"],
        stopped=False,
        skip_checking=True,
    )


def _draining_cleanup(
    qb: QB, request: Callable[..., Awaitable[Any]], cache: CompletionCache, tmp_path: Path
) -> Cleanup:
    """A source cleanup that hands off every synced torrent at once (a drain's settings)."""
    return Cleanup(
        qb=qb,
        request=request,
        cache=cache,
        mapper=PathMapper(data=tmp_path / "srcdata", qb_default="/downloads"),
        min_space_gib=0,
        min_seeding_time=0,
        synced_tag="synced",
        source_removed_tag="source-removed",
        exclude_cleanup_tag="",
        dry_run=False,
    )


@pytest.mark.parametrize("profile", PROFILES)
async def test_handoff_rolls_back_with_start_when_destination_refuses(
    profile: str, tmp_path: Path
) -> None:
    with serve_fake_qb(profile) as fake:
        qb = QB(fake.url, mode="source", max_threads=1)
        await _add_synced_seeding(qb, _torrent_bytes(tmp_path))
        (h,) = fake.torrents
        cache = CompletionCache(tmp_path / "state")
        await cache.put(h, "fp")

        async def refuse(msg: Any, *, within: float) -> Any:
            from qbsync.wire import WireError

            raise WireError(ErrorCode.NOT_FOUND, "torrent not in the destination qBittorrent")

        cleanup = _draining_cleanup(qb, refuse, cache, tmp_path)
        result = await cleanup.run_pass(await qb.torrents(), free_bytes=None, draining=True)
        assert result is not None and result.handed_off == 0
        mutating = [p for p in fake.paths() if p in ("torrents/stop", "torrents/start")]
        assert mutating == ["torrents/stop", "torrents/start"]
        assert not fake.torrents[h].stopped  # seeding again on the source
