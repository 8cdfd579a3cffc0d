"""/livez must not fail because qBittorrent hangs: a loop waiting on it is not wedged.

The "qBittorrent" here is a real loopback socket that accepts connections and never answers,
the failure mode a refused connection does not cover.
"""

from __future__ import annotations

import pytest
import trio

from qbsync.http.server import Health
from qbsync.qbittorrent import api as qb
from qbsync.qbittorrent.api import QB, QBError


async def _hung_server(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)  # read nothing, answer nothing
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        task_status.started(port)
        await trio.serve_listeners(hold, listeners, handler_nursery=nursery)


async def test_loop_waiting_on_hung_qbittorrent_stays_live(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qb, "REQUEST_TIMEOUT", (1.0, 0.6))
    monkeypatch.setattr(qb, "RETRY_ATTEMPTS", 1)
    health = Health(stale_after=0.2)
    outcome: list[str] = []
    done = trio.Event()

    async def orchestrator(port: int) -> None:
        health.heartbeat("orchestrator")
        try:
            await QB(f"http://127.0.0.1:{port}", mode="source").version()
        except QBError as exc:
            outcome.append(str(exc))
        done.set()

    async def idle_loop() -> None:
        health.heartbeat("idle")  # beats once, then never again: must go stale
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(_hung_server)
        nursery.start_soon(idle_loop)
        nursery.start_soon(orchestrator, port)
        await trio.sleep(0.45)  # well past stale_after, while the qB call hangs
        during = await health.check_live()
        assert during.checks["orchestrator"] == "ok"
        assert during.checks["idle"] != "ok"
        assert not during.ok

        with trio.fail_after(10):
            await done.wait()
        # The call ended (read timeout): the wait counts as the loop's last sign of life, and
        # from then on the loop must beat again like any other.
        assert "qbittorrent app_version" in outcome[0]
        assert (await health.check_live()).checks["orchestrator"] == "ok"
        await trio.sleep(0.3)
        assert (await health.check_live()).checks["orchestrator"] != "ok"
        nursery.cancel_scope.cancel()
