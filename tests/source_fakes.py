"""Fakes for unit tests of the source's async parts (pool, senders, monitor), and a real
on-disk torrent layout to read pieces from."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from qbsync.source.meta import SourceMeta, build_meta
from qbsync.source.paths import PathMapper
from qbsync.source.pool import Connection
from qbsync.wire.errors import ConnectionClosed
from qbsync.wire.messages import PieceAck, RequestMessage
from tests.qbharness import make_payload, make_torrent, torrent_files


def saved_torrent(
    save: Path, name: str, files: Mapping[str, int], piece: int, seed: int = 0
) -> tuple[SourceMeta, list[bytes]]:
    """Real files under ``save/name`` and their layout as qBittorrent would list it (every
    file selected): (meta, SHA-1 piece hashes)."""
    payload = make_payload(save / name, files, seed=seed)
    data, ih = make_torrent(payload, piece)
    _, listed, hashes = torrent_files(data)
    qb_files = [
        {"index": i, "name": n, "size": s, "priority": 1} for i, (n, s) in enumerate(listed)
    ]
    info = {"hash": ih, "name": name, "save_path": str(save), "content_path": str(payload)}
    return build_meta(ih, info, qb_files, data, PathMapper(save, str(save))), hashes


R = TypeVar("R")


class FakeConn:
    """Implements the pool's :class:`~qbsync.source.pool.Connection` interface (mypy checks it):
    answers requests and pieces with test callbacks. A callback may return an exception to
    raise it."""

    def __init__(
        self,
        on_request: Callable[[Any], Any] | None = None,
        on_piece: Callable[[str, int, bytes], Any] | None = None,
    ) -> None:
        self.closed = False
        self.inflight_bytes = 0
        self.credit = 1 << 30
        self.requests: list[Any] = []
        self.pieces: list[tuple[str, int, bytes]] = []
        self.on_request = on_request or (lambda msg: None)
        self.on_piece = on_piece or (lambda h, i, data: PieceAck(h, i))
        self._closed = trio.Event()

    def close(self) -> None:
        self.closed = True
        self._closed.set()

    async def wait_closed(self) -> ConnectionClosed:
        await self._closed.wait()
        return ConnectionClosed("closed by the test")

    async def request(self, msg: RequestMessage[R], *, timeout: float) -> R:  # noqa: ASYNC109
        if self.closed:
            raise ConnectionClosed()
        self.requests.append(msg)
        result = self.on_request(msg)
        if isinstance(result, BaseException):
            raise result
        return cast(R, result)

    async def send_piece(
        self, info_hash: str, index: int, offset: int, data: bytes | bytearray | memoryview
    ) -> PieceAck:
        if self.closed:
            raise ConnectionClosed()
        payload = bytes(data)
        self.pieces.append((info_hash, index, payload))
        self.inflight_bytes += len(payload)
        try:
            result = self.on_piece(info_hash, index, payload)
            if isinstance(result, float):  # "hang for this long"
                await trio.sleep(result)
                return PieceAck(info_hash, index)
            if isinstance(result, BaseException):
                raise result
            return result
        finally:
            self.inflight_bytes -= len(payload)


class FakeConnector:
    """A Connector whose attempts follow a script: a FakeConn to yield, or an exception."""

    def __init__(self, script: Callable[[int], FakeConn | BaseException]) -> None:
        self.script = script
        self.attempts: list[float] = []
        self.conns: list[FakeConn] = []

    def __call__(self) -> contextlib.AbstractAsyncContextManager[Connection]:
        return self._open()

    @contextlib.asynccontextmanager
    async def _open(self) -> AsyncIterator[Connection]:
        self.attempts.append(trio.current_time())
        outcome = self.script(len(self.attempts))
        if isinstance(outcome, BaseException):
            raise outcome
        self.conns.append(outcome)
        try:
            yield outcome
        finally:
            outcome.close()
