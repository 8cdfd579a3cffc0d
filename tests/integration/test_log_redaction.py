"""No secret in a URL reaches any output (issue 15, finding 7): a real destination whose
``--qb-url`` carries the qBittorrent password, and whose ``--notify-url`` carries a webhook
secret in its path and query, syncs a torrent into a real qBittorrent at ``--log-level debug``;
every byte it printed is then searched for both secrets."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from qbsync.qbittorrent.instance import QB_USERNAME
from qbsync.wire import SyncStatus
from tests.qbharness import KiB, free_port, make_payload
from tests.wireclient import LocalTorrent, start_destination

pytestmark = pytest.mark.integration


async def test_url_secrets_never_reach_the_output(
    tmp_path: Path, qb_factory, qbsync_factory
) -> None:
    password = "pw-" + secrets.token_hex(12)
    hook_secret = "hook-" + secrets.token_hex(12)
    qb = qb_factory("dst", password=password)
    qb_url = qb.url.replace("http://", f"http://{QB_USERNAME}:{password}@")
    payload = make_payload(tmp_path / "src" / "payload", {"a.bin": 300_000}, seed=3)
    t = LocalTorrent.create(payload, 64 * KiB)
    dest = start_destination(
        qbsync_factory,
        tmp_path / "data",
        # the user-info is only logged (qBittorrent logs in with the flags, which are redacted)
        qb_args=["--qb-url", qb_url, "--qb-username", QB_USERNAME, "--qb-password", password],
        extra=[
            "--log-level",
            "debug",
            # nothing listens there: the failed POST is logged, with its target
            "--notify-url",
            f"http://127.0.0.1:{free_port()}/{hook_secret}?token={hook_secret}",
        ],
    )
    async with dest.client() as client:
        result = await client.sync(t)
        assert result.status == SyncStatus.COMPLETE
    dest.proc.wait_for_log("event=qb_webapi_detected")
    dest.proc.wait_for_log("event=notify_")
    dest.proc.stop()
    out = dest.proc.log_text()
    assert f"url=http://{QB_USERNAME}:***@127.0.0.1" in out  # the URL is logged, redacted
    assert password not in out
    assert hook_secret not in out
