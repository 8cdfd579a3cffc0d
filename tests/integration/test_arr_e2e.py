"""Sonarr/Radarr with real processes: real qbittorrent-nox on both sides, real ``qbsync source``
and ``qbsync destination``, loopback v3 servers from tests/fakearr.py playing *arr."""

from __future__ import annotations

import socket

import pytest

from tests.fakearr import serve_fake_arr
from tests.integration.source_rig import (
    Rig,
    RigFactory,
    tags_of,
)
from tests.qbharness import wait_until

pytestmark = pytest.mark.integration


def test_destination_asks_sonarr_to_import_after_the_verified_sync(
    rig_factory: RigFactory,
) -> None:
    rig = rig_factory(start_destination=False)
    with serve_fake_arr("Radarr") as other, serve_fake_arr("Sonarr") as sonarr:
        sonarr.history = {rig.info_hash.upper(): ["grabbed"]}
        rig.start_destination(
            "--arr-url", f"{other.url},{sonarr.url}", "--arr-api-key", "arr-key,arr-key"
        )
        rig.start_source("--min-space", "0")
        rig.add_to_source(download_limit=None)
        rig.wait_synced()
        assert rig.dest is not None
        rig.dest.wait_for_log("event=arr_import_requested", timeout=120)
        (cmd,) = sonarr.commands()
        assert cmd == {
            "name": "DownloadedEpisodesScan",
            "path": str(rig.dst_data / rig.seeded.name),
            "downloadClientId": rig.info_hash.upper(),
            "importMode": "Copy",
        }
        assert other.commands() == []
        rig.assert_identical()  # the files *arr was pointed at are complete


def test_source_skips_a_download_sonarr_marked_failed(rig: Rig) -> None:
    with serve_fake_arr("Sonarr") as sonarr:
        sonarr.history = {rig.info_hash.upper(): ["downloadFailed", "grabbed"]}
        rig.add_to_source(download_limit=None)
        rig.src_qb.wait_seeding(rig.info_hash)  # complete on the source: it would sync now
        source, _ = rig.start_source(
            "--min-space", "0", "--arr-url", sonarr.url, "--arr-api-key", "arr-key"
        )
        log = source.wait_for_log("event=arr_skip", timeout=120)
        assert f"hash={rig.info_hash}" in log and "downloadFailed" in log
        assert source.stop() == 0
        assert "synced" not in tags_of(rig.src_qb, rig.info_hash)
        assert rig.dest is not None and "event=torrent_initialized" not in rig.dest.log_text()
        assert rig.dst_qb.info(rig.info_hash) is None


def test_source_syncs_anyway_when_arr_is_unreachable(rig: Rig) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    source, _ = rig.start_source("--min-space", "0", "--arr-url", down, "--arr-api-key", "k")
    rig.add_to_source(download_limit=None)
    rig.wait_synced()
    assert "event=arr_unreachable" in source.log_text()
    assert "action=sync_anyway" in source.log_text()
    wait_until(lambda: rig.dst_qb.info(rig.info_hash) is not None, 120, 0.2, "on destination")
