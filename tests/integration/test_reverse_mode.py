"""Home behind NAT: the destination dials the source (``source --listen``, ``destination
--connect``), with no wire port open at home (real processes)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.integration.source_rig import (
    Rig,
    RigFactory,
    http_status,
    listening_ports,
    metric,
    tags_of,
)
from tests.qbharness import SEEDING_STATES, free_port, make_self_signed, wait_until

pytestmark = pytest.mark.integration


def _reverse_rig(rig_factory: RigFactory) -> tuple[Rig, str]:
    rig = rig_factory(start_destination=False)
    return rig, f"127.0.0.1:{free_port()}"


def _start_destination(rig: Rig, listen: str) -> None:
    rig.start_destination("--reconnect-max-delay", "1", reach=["--connect", listen])


def test_reverse_mode_streams_finalizes_and_hands_off_with_no_port_at_home(
    rig_factory: RigFactory,
) -> None:
    rig, listen = _reverse_rig(rig_factory)
    ih = rig.info_hash
    source, health = rig.start_source(
        "--min-space",
        str(1 << 20),  # any disk is below 1 PiB: hand off once synced
        "--min-seeding-time",
        "0",
        "--source-name",
        "seedbox",
        reach=["--listen", listen],
    )
    source.wait_for_log("event=source_listening", timeout=30)
    _start_destination(rig, listen)
    assert rig.dest is not None
    log = rig.dest.wait_for_log("event=destination_ready", timeout=30)
    assert "listen=none" in log
    # Home opens no wire port: the only socket it listens on is its health endpoint.
    assert listening_ports(rig.dest.pid) == {rig.dest_health}
    code, body = http_status(rig.dest_health, "/status")
    assert code == 200 and body["listen_ports"] == []
    rig.add_to_source()  # throttled: it streams while it downloads
    wait_until(
        lambda: rig.source_progress() < 1.0 and "event=torrent_tracked" in source.log_text(),
        60,
        0.1,
        "tracked while downloading",
    )
    wait_until(lambda: rig.src_qb.info(ih) is None, 120, 0.2, "handed off and removed")
    rig.assert_identical()
    assert {"synced", "source-removed"} <= tags_of(rig.dst_qb, ih)
    rig.dst_qb.wait_seeding(ih, timeout=30)
    assert metric(health, "qbsync_cleanup_torrents_handed_off_total") == 1
    sources = http_status(rig.dest_health, "/status")[1]["sources"]
    assert [s["name"] for s in sources] == ["seedbox"]


def test_reverse_mode_destination_killed_and_restarted_mid_stream_ends_identical(
    rig_factory: RigFactory,
) -> None:
    rig, listen = _reverse_rig(rig_factory)
    ih = rig.info_hash
    source, _ = rig.start_source("--min-space", "0", reach=["--listen", listen])
    _start_destination(rig, listen)
    assert rig.dest is not None
    rig.add_to_source()
    rig.dest.wait_for_log("event=torrent_initialized", timeout=60)
    wait_until(
        lambda: any(p.stat().st_size > 0 for p in rig.dst_data.rglob("*") if p.is_file()),
        60,
        0.1,
        "some piece written at home",
    )
    assert rig.source_progress() < 1.0  # mid-stream
    rig.dest.kill()
    source.wait_for_log("event=destination_disconnected", timeout=30)
    _start_destination(rig, listen)  # same data directory: it recovers and dials again
    rig.wait_synced(timeout=180)
    rig.assert_identical()
    assert "event=reverse_connection_arrived" in source.log_text()
    assert (rig.src_qb.info(ih) or {}).get("state") in SEEDING_STATES  # no pressure: kept


def test_reverse_mode_pool_opens_the_connections_the_source_wants(
    rig_factory: RigFactory,
) -> None:
    """The source's pool asks for its connections (here its minimum of 3) and the destination
    dials them; both sides' metrics show them."""
    rig, listen = _reverse_rig(rig_factory)
    _source, health = rig.start_source(
        "--min-connections",
        "3",
        "--max-connections",
        "4",
        "--source-name",
        "box",
        reach=["--listen", listen],
    )
    _start_destination(rig, listen)
    assert rig.dest is not None
    wait_until(lambda: metric(health, "qbsync_connections_active") == 3, 60, 0.2, "3 connections")
    wait_until(
        lambda: metric(rig.dest_health, "qbsync_source_connections", {"source": "box"}) == 3,
        30,
        0.2,
        "destination sees 3 connections",
    )
    assert rig.dest.log_text().count("event=open_connection ") == 2
    rig.add_to_source(download_limit=None)
    rig.wait_synced()
    rig.assert_identical()


def test_reverse_mode_tls_served_by_the_listening_source_and_token_required(
    tmp_path: Path, rig_factory: RigFactory
) -> None:
    """The listening side is the TLS server whatever its role: the source presents the
    certificate, the dialing destination verifies it with --tls-ca. A destination with the
    wrong token is refused by the source and gets nothing."""
    cert, key = make_self_signed(tmp_path / "tls", "source")
    rig, listen = _reverse_rig(rig_factory)
    source, _ = rig.start_source(
        "--tls-cert", str(cert), "--tls-key", str(key), reach=["--listen", listen]
    )
    rig.add_to_source(download_limit=None)
    wrong = rig.start_destination(
        "--tls-ca", str(cert), "--auth-token", secrets.token_hex(16), reach=["--connect", listen]
    )
    wait_until(
        lambda: (
            "event=wire_handshake_failed" in source.log_text()
            and "code=auth-failed" in source.log_text()
        ),
        30,
        0.2,
        "the source refuses the wrong token",
    )
    assert not rig.dest_state_dirs() and "synced" not in tags_of(rig.src_qb, rig.info_hash)
    assert wrong.stop() == 0
    _start_destination(rig, listen)  # rig.token, but no --tls-ca: TLS fails, and says so
    assert rig.dest is not None
    rig.dest.wait_for_log("event=wire_handshake_failed", timeout=30)
    assert rig.dest.stop() == 0
    rig.start_destination("--tls-ca", str(cert), reach=["--connect", listen])
    rig.wait_synced()
    rig.assert_identical()
