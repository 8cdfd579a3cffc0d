"""``--notify-url``: delivery, retries, timeouts and the bounded queue, against a real
loopback receiver (tests/notify_receiver.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import trio

from qbsync import metrics
from qbsync.integrations import notify
from qbsync.integrations.notify import Notifier
from tests.notify_receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(200)
    yield r
    r.close()


def sample(result: str, event: str = "synced") -> float:
    v = metrics.REGISTRY.get_sample_value(
        "qbsync_notifications_total", {"event": event, "result": result}
    )
    return v or 0.0


async def wait_idle(n: Notifier, done: int) -> None:
    with trio.fail_after(60):
        while n.sent + n.failed < done:  # noqa: ASYNC110  # counters, not an event
            await trio.sleep(0.01)


async def test_synced_event_is_posted_with_the_documented_fields_and_no_secret(
    receiver: Receiver, nursery: trio.Nursery
) -> None:
    n = Notifier(receiver.url, "destination")
    await nursery.start(n.run)
    sent_before = sample("sent")
    n.emit("synced", "ab" * 20, "Show.S01", size=123, path="/media/tv/Show.S01")
    await wait_idle(n, 1)
    [event] = receiver.events()
    assert set(event) == {
        "schema", "event", "role", "hash", "name", "size", "path", "code", "message", "time",
        "version", "text",
    }  # fmt: skip
    assert event["event"] == "synced" and event["role"] == "destination"
    assert event["hash"] == "ab" * 20 and event["size"] == 123
    assert event["path"] == "/media/tv/Show.S01" and event["text"].endswith("synced and verified")
    assert "secret" not in receiver.bodies[0].decode()
    assert "content-type: application/json" in receiver.heads[0].lower()
    assert sample("sent") == sent_before + 1


async def test_500_is_retried_a_bounded_number_of_times_then_given_up(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    r = Receiver(500)
    try:
        n = Notifier(r.url, "source", attempts=3, backoff=0.01)
        await nursery.start(n.run)
        failed_before = sample("failed", "failed")
        n.emit("failed", "cd" * 20, "X", code="verify-failed", message="3 attempts")
        await wait_idle(n, 1)
        assert len(r.events()) == 3 and n.failed == 1 and n.sent == 0
        assert sample("failed", "failed") == failed_before + 1
        assert "event=notify_failed" in caplog.text and "HTTP 500" in caplog.text
        assert "secret" not in caplog.text  # the URL's path and query are never logged
    finally:
        r.close()


async def test_4xx_is_not_retried(nursery: trio.Nursery) -> None:
    r = Receiver(404)
    try:
        n = Notifier(r.url, "source", attempts=3, backoff=0.01)
        await nursery.start(n.run)
        n.emit("handed_off", "ef" * 20, "Y", size=1)
        await wait_idle(n, 1)
        assert len(r.events()) == 1 and n.failed == 1
    finally:
        r.close()


async def test_hung_receiver_times_out_and_the_next_event_still_goes(
    nursery: trio.Nursery,
) -> None:
    hung = Receiver(None)
    try:
        n = Notifier(hung.url, "destination", timeout=0.3, attempts=2, backoff=0.01)
        await nursery.start(n.run)
        n.emit("synced", "01" * 20, "first")
        n.emit("synced", "02" * 20, "second")
        await wait_idle(n, 2)
        # Each event got its attempts, each attempt ended by the timeout, none was answered.
        assert [e["name"] for e in hung.events()] == ["first", "first", "second", "second"]
        assert n.failed == 2 and n.sent == 0
    finally:
        hung.close()


async def test_emit_never_blocks_and_a_full_queue_drops_the_oldest(nursery: trio.Nursery) -> None:
    hung = Receiver(None)
    try:
        n = Notifier(hung.url, "destination", queue_size=5, timeout=30, attempts=1)
        await nursery.start(n.run)
        dropped_before = sample("dropped")
        # No checkpoint in between: emit() is synchronous, whatever the receiver does.
        for i in range(8):
            n.emit("synced", f"{i:040x}", f"t{i}")
        assert n.pending == 5 and n.dropped == 3
        assert sample("dropped") == dropped_before + 3
        # The oldest three went; the newest five wait, in order.
        assert [json.loads(json.dumps(e))["name"] for e in n._queue] == [
            "t3", "t4", "t5", "t6", "t7",
        ]  # fmt: skip
    finally:
        hung.close()


async def test_disabled_notifier_does_nothing(nursery: trio.Nursery) -> None:
    n = Notifier("", "source")
    await nursery.start(n.run)
    n.emit("synced", "ab" * 20, "x")
    assert n.pending == 0
    notify.DISABLED.emit("failed", "ab" * 20, "x")
    assert notify.DISABLED.pending == 0


def test_payload_text_for_each_event() -> None:
    assert notify.payload("handed_off", "source", "h", "N")["text"] == (
        "qbsync: N handed off to the destination"
    )
    failed = notify.payload("failed", "source", "h", "N", code="io", message="m" * 600)
    assert failed["text"].startswith("qbsync: N failed to sync (io: ")
    assert len(failed["message"]) == 500
    assert notify.safe_target("https://u:p@hooks.example:8443/x/y?token=1") == (
        "https://hooks.example:8443"
    )


@pytest.mark.parametrize("role", ["source", "destination"])
def test_notify_url_option_env_and_redaction(role: str) -> None:
    from qbsync.config import ConfigError, redacted, resolve

    base = {"data": "/tmp", "qb_url": "http://127.0.0.1:1"}
    if role == "source":
        base["destination_addr"] = "127.0.0.1:2"
    env = {f"QBSYNC_{role.upper()}_NOTIFY_URL": "https://hooks.example/T0KEN/x?y=1"}
    config = resolve(role, base, env)  # type: ignore[arg-type]
    assert config.notify_url == "https://hooks.example/T0KEN/x?y=1"
    assert redacted(config)["notify_url"] == "***"
    with pytest.raises(ConfigError, match="notify"):
        resolve(role, {**base, "notify_url": "ftp://nope"}, {})  # type: ignore[arg-type]


class Recording(Notifier):
    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9/unused", "source")
        self.calls: list[tuple[str, str, str, dict[str, object]]] = []

    def emit(self, event, info_hash, name, **fields) -> None:
        self.calls.append((event, info_hash, name, fields))


async def test_orchestrator_notifies_failed_for_good_and_status_shows_the_last_error(
    tmp_path, autojump_clock
) -> None:
    """The source's call site (the real orchestrator loop against fakes of qBittorrent and
    the destination): after the third failed finalize the torrent is given up on and
    ``failed`` is emitted once, with the destination's code and message; while it was being
    retried, /status showed state ``retrying`` and that error."""
    from qbsync.http import status as status_model
    from qbsync.wire.errors import ErrorCode, WireError
    from qbsync.wire.messages import Finalize, InitTorrent
    from tests.source.test_source_orchestrator import (
        NOTHING_NEEDED,
        eventually,
        make,
        on_disk,
        running,
        streamed,
    )

    torrents = on_disk(tmp_path, "t0")
    (h,) = torrents
    fail = WireError(ErrorCode.VERIFY_FAILED, "recheck stopped at 99%")
    rig = make(tmp_path, torrents, {Finalize: fail, InitTorrent: NOTHING_NEEDED})
    rec = Recording()
    rig.orch.notifier = rec
    t = streamed(rig, h)
    seen_retrying: list[status_model.TorrentStatus] = []

    def gone() -> bool:
        seen_retrying.extend(status_model.source_torrents(rig.registry))
        return h not in rig.registry

    async with running(rig):
        await eventually(gone)
    assert rec.calls == [
        (
            "failed",
            h,
            t.name,
            {
                "size": t.meta.selected_size,
                "code": "verify-failed",
                "message": "recheck stopped at 99%",
            },
        )
    ]
    assert any(
        s.state == "retrying" and s.last_error is not None and s.last_error.code == "verify-failed"
        for s in seen_retrying
    ), seen_retrying
