"""Sonarr/Radarr contract tests: qbsync.integrations.arr against loopback v3 servers
(tests/fakearr.py), then through the source orchestrator's discovery and the destination
finalizer."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import attrs
import pytest
import trio

from qbsync.config import ConfigError, resolve
from qbsync.integrations.arr import ArrSet, download_id
from qbsync.wire import ErrorCode, InitResult, InitTorrent, SyncStatus
from tests.destination.test_destination_writer import build, torrent
from tests.fakearr import serve_fake_arr
from tests.source.test_source_orchestrator import Rig, make, on_disk
from tests.wireclient import needed_indices


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_download_id_is_the_upper_case_info_hash() -> None:
    assert download_id("abcdef0123" * 4) == "ABCDEF0123" * 4


def test_arr_flags_repeat_or_take_lists(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from qbsync import cli

    argv = ["destination", "--data", "/d", "--print-config"]
    repeated = [
        *argv,
        "--arr-url", "http://sonarr:8989", "--arr-api-key", "k1",
        "--arr-url", "http://radarr:7878", "--arr-api-key", "k2",
    ]  # fmt: skip
    assert cli.main(repeated) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arr_url"] == "http://sonarr:8989,http://radarr:7878"
    assert out["arr_api_key"] == "***"
    assert cli.main([*argv, "--arr-url", "http://a:1,http://b:2", "--arr-api-key", "x"]) == 2
    assert "one key per URL" in capsys.readouterr().err


def test_config_pairs_urls_and_keys() -> None:
    base = {"data": "/d", "qb_url": "http://q:1", "destination_addr": "h:1"}
    config = resolve(
        "source",
        {**base, "arr_url": "http://sonarr:8989/, http://radarr:7878", "arr_api_key": "a,b"},
        env={},
    )
    assert config.arr_url == "http://sonarr:8989,http://radarr:7878"
    arr = ArrSet.from_config(config.arr_url, config.arr_api_key, mode="source")
    assert [(a.url, a.api_key) for a in arr.instances] == [
        ("http://sonarr:8989", "a"),
        ("http://radarr:7878", "b"),
    ]
    with pytest.raises(ConfigError, match="one key per URL"):
        resolve("source", {**base, "arr_url": "http://s:1,http://r:2", "arr_api_key": "a"}, {})
    with pytest.raises(ConfigError, match="--arr-url"):
        resolve("destination", {"data": "/d", "arr_url": "ftp://x", "arr_api_key": "a"}, {})
    assert not ArrSet.from_config("", "", mode="source")  # not configured: nothing runs


async def test_history_failed_or_ignored_rejects(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    h_failed, h_ignored, h_ok = "a" * 40, "b" * 40, "c" * 40
    with serve_fake_arr("Sonarr") as sonarr, serve_fake_arr("Radarr", "rk") as radarr:
        sonarr.history = {
            h_failed.upper(): ["downloadFailed", "grabbed"],
            h_ok.upper(): ["grabbed"],
        }
        radarr.history = {h_ignored.upper(): ["downloadIgnored", "grabbed"]}
        arr = ArrSet([sonarr.url, radarr.url], ["arr-key", "rk"], mode="source")
        assert await arr.rejected(h_failed, "show") == f"downloadFailed in {sonarr.url} history"
        assert await arr.rejected(h_ignored) == f"downloadIgnored in {radarr.url} history"
        assert await arr.rejected(h_ok) is None
        q = sonarr.requests[0]
        assert (q.method, q.path, q.api_key) == ("GET", "/api/v3/history", "arr-key")
        assert q.query["downloadId"] == h_failed.upper()
        assert "event=arr_skip" in caplog.text and "show" in caplog.text
        # Verdicts are reused: discovery does not ask every cycle.
        before = len(sonarr.requests) + len(radarr.requests)
        assert await arr.rejected(h_failed) is not None and await arr.rejected(h_ok) is None
        assert len(sonarr.requests) + len(radarr.requests) == before


async def test_unreachable_or_refusing_arr_never_blocks_a_sync(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with serve_fake_arr("Sonarr", "right") as sonarr:
        sonarr.history = {"A" * 40: ["downloadFailed"]}
        wrong_key = ArrSet([sonarr.url], ["wrong"], mode="source")
        assert await wrong_key.rejected("a" * 40) is None
        assert sonarr.requests[-1].status == 401
    down = ArrSet([_closed_port_url()], ["k"], mode="source")
    assert await down.rejected("a" * 40) is None
    lines = [r.getMessage() for r in caplog.records if "arr_unreachable" in r.getMessage()]
    assert len(lines) == 2 and all("action=sync_anyway" in line for line in lines)
    assert "HTTP 401" in lines[0] and "unreachable" in lines[1]


@pytest.mark.parametrize(
    ("app", "command"), [("Sonarr", "DownloadedEpisodesScan"), ("Radarr", "DownloadedMoviesScan")]
)
async def test_import_asks_only_the_instance_that_knows_the_download(
    app: str, command: str
) -> None:
    h = "d" * 40
    with serve_fake_arr(app) as owner, serve_fake_arr("Sonarr") as other:
        owner.history = {h.upper(): ["grabbed"]}
        arr = ArrSet([other.url, owner.url], ["arr-key", "arr-key"], mode="destination")
        assert await arr.import_synced(h, "/downloads/tv/Show.S01E01")
        assert owner.commands() == [
            {
                "name": command,
                "path": "/downloads/tv/Show.S01E01",
                "downloadClientId": h.upper(),
                "importMode": "Copy",
            }
        ]
        assert other.commands() == []  # its history does not know the download
        posts = [r for r in owner.requests if r.method == "POST"]
        assert posts[0].status == 201
        # Nobody knows it: no command anywhere.
        assert not await arr.import_synced("e" * 40, "/x")
        assert len(owner.commands()) == 1 and other.commands() == []


async def test_discovery_skips_rejected_and_syncs_when_arr_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The orchestrator's discovery (the real orchestrator, pool and monitor against fakes of
    qBittorrent and the destination): a download Sonarr marked failed is never probed or
    tracked; one it does not reject is; with *arr down, everything syncs."""
    caplog.set_level(logging.INFO)

    def init(msg: InitTorrent) -> InitResult:
        return InitResult(SyncStatus.READY, pieces_have_count=0)

    async def cycle_and_tracked(rig: Rig) -> list[str]:
        """One discovery cycle; the hashes it started tracking (a full InitTorrent)."""
        rig.orch.cache.load()
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.pool.run)
            await rig.pool.pick()  # connected, as the orchestrator's loop waits for
            await rig.orch.cycle()
            nursery.cancel_scope.cancel()
        return [m.info_hash for m in rig.dest.of_type(InitTorrent) if not m.probe]

    torrents = on_disk(tmp_path / "1", "t0", "t1", state="downloading", progress=0.5)
    h0, h1 = list(torrents)
    with serve_fake_arr("Sonarr") as sonarr:
        sonarr.history = {h0.upper(): ["downloadFailed"], h1.upper(): ["grabbed"]}
        rig = make(
            tmp_path / "1", torrents, {InitTorrent: init}, arr_url=sonarr.url, arr_api_key="arr-key"
        )
        assert await cycle_and_tracked(rig) == [h1]
        assert {m.info_hash for m in rig.dest.of_type(InitTorrent)} == {h1}  # h0 not probed
        assert f"event=arr_skip hash={h0}" in caplog.text

    torrents = on_disk(tmp_path / "2", "t0", "t1", state="downloading", progress=0.5)
    rig = make(
        tmp_path / "2",
        torrents,
        {InitTorrent: init},
        arr_url=_closed_port_url(),
        arr_api_key="k",
    )
    assert sorted(await cycle_and_tracked(rig)) == sorted(torrents)  # synced anyway
    assert "action=sync_anyway" in caplog.text


async def test_finalizer_requests_import_after_verified_finalize(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    with serve_fake_arr("Sonarr") as sonarr:
        sonarr.history = {t.info_hash.upper(): ["grabbed"]}
        d.finalizer.arr = ArrSet([sonarr.url], ["arr-key"], mode="destination")
        ready = await d.init(t)
        for i in needed_indices(ready, t.num_pieces):
            assert await d.piece(t, i) == ErrorCode.OK
        assert sonarr.commands() == []  # nothing before the finalize
        result = await d.finalize(t, category="", tags=())
        assert result.status == SyncStatus.COMPLETE
        (cmd,) = sonarr.commands()
        assert cmd["name"] == "DownloadedEpisodesScan"
        assert cmd["downloadClientId"] == t.info_hash.upper()
        assert cmd["path"] == str(d.root / "payload")
        assert (d.root / "payload" / "a.bin").read_bytes() == (
            t.base / "payload" / "a.bin"
        ).read_bytes()


async def test_import_and_webhook_paths_come_from_the_validated_file_paths(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Issue 15, finding 7: the path sent to *arr and the webhook was ``save path + (req.name
    or metainfo.name)``, so a request naming ``../../etc`` or ``/etc`` picked it."""
    from qbsync.integrations.notify import Notifier

    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    notifier = d.finalizer.notifier = Notifier("http://127.0.0.1:9/hook", "destination")
    with serve_fake_arr("Sonarr") as sonarr:
        sonarr.history = {t.info_hash.upper(): ["grabbed"]}
        d.finalizer.arr = ArrSet([sonarr.url], ["arr-key"], mode="destination")
        msg = attrs.evolve(t.init_msg(sub="tv"), name="../../../etc")
        result = await d.server.init(msg)
        while result.status == SyncStatus.VERIFYING:
            await trio.sleep(0.01)
            result = await d.server.init(msg)
        for i in needed_indices(result, t.num_pieces):
            assert await d.piece(t, i) == ErrorCode.OK
        final = await d.finalize(t, category="", tags=())
        assert final.status == SyncStatus.COMPLETE
        (cmd,) = sonarr.commands()
    expected = str(d.root / "tv" / "payload")
    assert cmd["path"] == expected
    (event,) = notifier._queue  # queued (its delivery is tested in test_notify)
    assert event["event"] == "synced" and event["path"] == expected
