"""Issue 15 with real processes and real qBittorrent: the seed README's own commands (no
token; only loopback addresses substituted) pair the two daemons on first use, and then no
other key can touch anything.

One test walks the whole story, because each step needs the state the one before left:

1. both daemons started with the seed's commands (``--data``, ``--qb-url``, ``--listen`` /
   ``--destination-addr``; the addresses are loopback ones; the source's default state
   directory is put under the test's tmp through ``XDG_STATE_HOME``): the torrent syncs;
2. a client with a different key cannot init, resync, abort or start anything: every
   connection is refused at the handshake with ``unknown-peer``, and the destination's files
   and qBittorrent entry are unchanged;
3. an impostor destination (a real ``qbsync destination`` with another key, on the real one's
   address) cannot make the source, under disk pressure, stop or delete anything;
4. the source's state directory re-created (a new key): the destination refuses it with a
   message naming both fingerprints and the re-pair command.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qbsync.wire import ErrorCode, WireError
from tests.integration.source_rig import (
    FILES,
    Rig,
    tags_of,
)
from tests.qbharness import free_port
from tests.wireclient import LocalTorrent, wire_client

pytestmark = pytest.mark.integration

FP = r"SHA256:[A-Za-z0-9+/]{43}"


def fingerprint_of(log: str) -> str:
    found = re.search(rf"event=identity role=\w+ fingerprint=({FP})", log)
    assert found, "no event=identity line"
    return found.group(1)


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_seed_commands_pair_on_first_use_and_refuse_every_other_key(
    rig_factory: object, tmp_path: Path
) -> None:
    rig: Rig = rig_factory(start_destination=False)  # type: ignore[operator]
    ih = rig.info_hash
    rig.dest_port = free_port()
    xdg = tmp_path / "xdg"  # the source's default --state-dir: $XDG_STATE_HOME/qbsync
    source_state = xdg / "qbsync"

    def start_destination(data: Path) -> object:
        # qbsync destination --data /downloads --qb-url http://localhost:8080 --listen :50051
        proc = rig.qbsync_factory(
            "destination",
            [
                "--data",
                str(data),
                *rig.dst_qb.qbsync_args(),
                "--listen",
                f"127.0.0.1:{rig.dest_port}",
            ],
            env={"QBSYNC_DESTINATION_HEALTH_ADDR": f"127.0.0.1:{free_port()}"},
        )
        proc.wait_for_log("event=destination_ready", timeout=30)
        return proc

    def start_source(*extra: str) -> object:
        # qbsync source --data /downloads --qb-url http://localhost:8080
        #   --destination-addr 192.168.1.100:50051
        return rig.qbsync_factory(
            "source",
            [
                "--data",
                str(rig.src_qb.save_path),
                *rig.src_qb.qbsync_args(),
                "--destination-addr",
                f"127.0.0.1:{rig.dest_port}",
                *extra,
            ],
            env={
                "XDG_STATE_HOME": str(xdg),
                "QBSYNC_SOURCE_HEALTH_ADDR": f"127.0.0.1:{free_port()}",
            },
        )

    # 1. the seed's commands: the sync works, and both sides pinned each other on first use
    dest = start_destination(rig.dst_data)
    source = start_source()
    rig.add_to_source(download_limit=None)
    rig.wait_synced(timeout=180, dest_timeout=60)
    rig.assert_identical()
    dest_log, source_log = dest.log_text(), source.log_text()  # type: ignore[attr-defined]
    dest_fp, source_fp = fingerprint_of(dest_log), fingerprint_of(source_log)
    assert (
        "event=peer_first_use role=destination peer=127.0.0.1" in dest_log
        and f"peer_fingerprint={source_fp} own_fingerprint={dest_fp}" in dest_log
    )
    assert f"peer_fingerprint={dest_fp} own_fingerprint={source_fp}" in source_log
    dest_state = (rig.dst_qb.info(ih) or {}).get("state")  # added stopped until a hand-off
    before = digests(rig.dst_data / rig.seeded.name)
    assert len(before) == len(FILES)

    # 2. a client with a different key: refused at the handshake, whatever it asks for
    stranger = Ed25519PrivateKey.generate()
    local = LocalTorrent.from_bytes(rig.seeded.torrent, ih, rig.seeded.payload.parent)

    async def stranger_tries() -> list[ErrorCode]:
        codes: list[ErrorCode] = []
        attempts = ("init", "resync", "abort", "start")
        for what in attempts:
            try:
                async with wire_client(rig.dest_port, None, identity=stranger) as client:
                    if what == "init":
                        await client.init(local)
                    elif what == "resync":
                        await client.init(local, resync=True)
                    elif what == "abort":
                        await client.abort(local)
                    else:
                        await client.start(local)
                codes.append(ErrorCode.OK)
            except WireError as exc:
                codes.append(exc.code)
        return codes

    assert trio.run(stranger_tries) == [ErrorCode.UNKNOWN_PEER] * 4
    dest_log = dest.log_text()  # type: ignore[attr-defined]
    assert dest_log.count("event=peer_refused code=unknown-peer role=destination") >= 4
    assert digests(rig.dst_data / rig.seeded.name) == before
    assert (rig.dst_qb.info(ih) or {}).get("state") == dest_state
    assert "synced" in tags_of(rig.dst_qb, ih)

    # 3. an impostor destination (another key) on the real one's address; the source under
    #    disk pressure (any disk is below 1 PiB) must not stop or delete anything
    source.stop()  # type: ignore[attr-defined]
    dest.stop()  # type: ignore[attr-defined]
    impostor_data = tmp_path / "impostor-data"
    impostor = start_destination(impostor_data)
    assert fingerprint_of(impostor.log_text()) != dest_fp  # type: ignore[attr-defined]
    source = start_source("--min-space", str(1 << 20), "--min-seeding-time", "0", "--sleep", "1")
    source.wait_for_log("code=unknown-peer", timeout=60)  # type: ignore[attr-defined]
    source.wait_for_log("event=cleanup_deferred", timeout=60)  # type: ignore[attr-defined]
    source_log = source.log_text()  # type: ignore[attr-defined]
    assert "event=peer_refused code=unknown-peer role=source" in source_log
    assert dest_fp in source_log  # the pinned destination key is named
    assert "event=handed_off" not in source_log
    info = rig.src_qb.info(ih)
    assert info is not None and "stopped" not in str(info.get("state")).lower()
    assert (rig.src_qb.save_path / rig.seeded.name).exists()
    # The impostor (trusting on first use itself) may count the source as connected, but
    # the source refused its key before sending anything: not one request reached it.
    assert f"hash={ih}" not in impostor.log_text()  # type: ignore[attr-defined]
    source.stop()  # type: ignore[attr-defined]
    impostor.stop()  # type: ignore[attr-defined]

    # 4. the source's state directory re-created: a new key, refused with both fingerprints
    dest = start_destination(rig.dst_data)
    assert fingerprint_of(dest.log_text()) == dest_fp  # type: ignore[attr-defined]
    shutil.rmtree(source_state)  # qbsync created it under this test's tmp
    source = start_source()
    source.wait_for_log("code=unknown-peer", timeout=60)  # type: ignore[attr-defined]
    new_fp = fingerprint_of(source.log_text())  # type: ignore[attr-defined]
    assert new_fp != source_fp
    dest.wait_for_log(f"peer_fingerprint={new_fp}", timeout=30)  # type: ignore[attr-defined]
    refused = [
        line
        for line in dest.log_text().splitlines()  # type: ignore[attr-defined]
        if "event=peer_refused" in line and new_fp in line
    ]
    assert refused and source_fp in refused[0]
    assert f"qbsync peers destination forget {source_fp} --data" in refused[0]
    assert digests(rig.dst_data / rig.seeded.name) == before
