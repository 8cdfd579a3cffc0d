"""Fakes for unit tests of the source's async parts (pool, senders, monitor, orchestrator),
and real on-disk torrents to read pieces from. Each fake implements the real interface it
stands in for (a ``typing.Protocol`` or a subclass), so mypy checks it against the code."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from qbsync.config import SourceConfig, resolve
from qbsync.qbittorrent.api import QB
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
T = TypeVar("T")
M = TypeVar("M")


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
        self.on_change: Callable[[], None] = lambda: None
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


class SourceTorrent:
    """A real torrent on disk as the source qBittorrent would report it: its ``info`` (torrents
    list entry), ``files`` (files endpoint) and ``torrent_file`` (export endpoint)."""

    def __init__(self, save: Path, name: str, files: Mapping[str, int], piece: int = 16384):
        payload = make_payload(save / name, files, seed=sum(map(ord, name)))
        self.torrent_file, self.info_hash = make_torrent(payload, piece)
        _, listed, _ = torrent_files(self.torrent_file)
        self.files = [
            {"index": i, "name": n, "size": s, "priority": 1} for i, (n, s) in enumerate(listed)
        ]
        self.info: dict[str, Any] = {
            "hash": self.info_hash,
            "name": name,
            "save_path": str(save),
            "content_path": str(payload),
            "state": "stalledUP",
            "progress": 1.0,
            "tags": "",
            "category": "",
        }


class FakeQB(QB):
    """The source's qBittorrent: the real :class:`~qbsync.qbittorrent.api.QB` interface (mypy
    checks every override), answered from :class:`SourceTorrent` objects instead of HTTP. Any
    method not
    overridden here fails the test instead of reaching for a network."""

    def __init__(self, torrents: Mapping[str, SourceTorrent] = {}) -> None:
        super().__init__("http://127.0.0.1:9", mode="source")
        self.known = dict(torrents)
        self.tags: list[tuple[str, list[str]]] = []

    async def call(self, operation: str, fn: Callable[[Any], T]) -> T:
        raise AssertionError(f"unexpected qBittorrent call {operation!r} in a unit test")

    async def files(self, info_hash: str) -> list[dict[str, Any]]:
        return self.known[info_hash].files

    async def export(self, info_hash: str) -> bytes:
        return self.known[info_hash].torrent_file

    async def torrent(self, info_hash: str) -> dict[str, Any] | None:
        t = self.known.get(info_hash)
        return t.info if t is not None else None

    async def add_tags(self, info_hash: str, tags: list[str]) -> None:
        self.tags.append((info_hash, tags))


class FakeDestination:
    """The destination as the source's pool sees it: every connection the connector opens
    answers requests with :meth:`answer`, which looks up ``answers`` by request type (a value,
    an exception to raise, or a callable of the request). ``down`` makes connecting fail."""

    def __init__(self, answers: Mapping[type, Any]) -> None:
        self.answers = dict(answers)
        self.requests: list[Any] = []
        self.down = False
        self.connector = FakeConnector(self._attempt)

    def _attempt(self, n: int) -> FakeConn | BaseException:
        if self.down:
            return OSError(111, "Connection refused")
        return FakeConn(on_request=self.answer)

    def answer(self, msg: Any) -> Any:
        self.requests.append(msg)
        answer = self.answers[type(msg)]
        return answer(msg) if callable(answer) and not isinstance(answer, type) else answer

    def go_down(self) -> None:
        self.down = True
        for conn in self.connector.conns:
            conn.close()

    def of_type(self, kind: type[M]) -> list[M]:
        return [r for r in self.requests if isinstance(r, kind)]


def source_config(tmp_path: Path, **flags: str) -> SourceConfig:
    """A source configuration on ``tmp_path`` whose qBittorrent and destination addresses are
    never dialled (the tests hand it fakes), with ``flags`` on top; the environment ignored."""
    config = resolve(
        "source",
        {
            "data": str(tmp_path),
            "qb_url": "http://127.0.0.1:9",
            "destination_addr": "127.0.0.1:9",
            "state_dir": str(tmp_path / "state"),
            **flags,
        },
        env={},
    )
    assert isinstance(config, SourceConfig)
    return config
