"""A small wire-protocol client for tests: plays the source against a real destination.

It reads pieces from a payload on local disk (e.g. from ``qbharness.make_payload``) and speaks
the protocol through :func:`qbsync.wire.open_connection`, so a destination can be driven
without a source qBittorrent::

    t = LocalTorrent.create(payload_dir, piece_size=64 * KiB)
    async with wire_client(port, token) as client:
        result = await client.init(t)
        acks = await client.send(t, needed_indices(result, t.num_pieces), order="shuffle")
        final = await client.finalize(t)

Deselected files are zero-filled in boundary pieces, exactly as a source does.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qbsync.bitfield import Bitfield
from qbsync.wire import (
    Abort,
    AbortResult,
    ClientConnection,
    FileEntry,
    Finalize,
    FinalizeResult,
    InitResult,
    InitTorrent,
    PieceAck,
    StartResult,
    StartTorrent,
    SyncStatus,
    open_connection,
)
from qbsync.wire.address import HostPort
from tests.qbharness import QbsyncProcess, free_port, make_torrent, torrent_files


@attrs.define
class LocalTorrent:
    """A v1 torrent whose content is on local disk.

    ``files`` are ``(torrent-relative path including the torrent name, size)`` in torrent
    order; ``base`` is the directory that holds the torrent's top-level entry.
    """

    torrent: bytes
    info_hash: str
    base: Path
    piece_length: int
    files: list[tuple[str, int]]
    hashes: list[bytes]

    @classmethod
    def create(cls, content: Path, piece_size: int) -> LocalTorrent:
        data, info_hash = make_torrent(content, piece_size)
        return cls.from_bytes(data, info_hash, content.parent)

    @classmethod
    def from_bytes(cls, data: bytes, info_hash: str, base: Path) -> LocalTorrent:
        piece_length, files, hashes = torrent_files(data)
        return cls(data, info_hash, base, piece_length, files, hashes)

    @property
    def total_size(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def num_pieces(self) -> int:
        return -(-self.total_size // self.piece_length)

    def file_offsets(self) -> list[int]:
        out, pos = [], 0
        for _, size in self.files:
            out.append(pos)
            pos += size
        return out

    def piece(self, index: int, *, deselected: Iterable[int] = ()) -> bytes:
        """The bytes a source sends for piece ``index`` (deselected files read as zeros)."""
        skip = set(deselected)
        start = index * self.piece_length
        end = min(start + self.piece_length, self.total_size)
        out = bytearray(end - start)
        for fi, ((rel, size), offset) in enumerate(
            zip(self.files, self.file_offsets(), strict=True)
        ):
            s, e = max(start, offset), min(end, offset + size)
            if s >= e or fi in skip:
                continue
            with open(self.base / rel, "rb") as fh:
                fh.seek(s - offset)
                out[s - start : e - start] = fh.read(e - s)
        return bytes(out)

    def piece_files(self, index: int) -> list[int]:
        start = index * self.piece_length
        end = min(start + self.piece_length, self.total_size)
        return [
            fi
            for fi, ((_, size), offset) in enumerate(
                zip(self.files, self.file_offsets(), strict=True)
            )
            if max(start, offset) < min(end, offset + size)
        ]

    def verify_piece(self, index: int, data: bytes) -> bool:
        return hashlib.sha1(data).digest() == self.hashes[index]

    def init_msg(
        self,
        *,
        selected: Sequence[bool] | None = None,
        sub: str = "",
        resync: bool = False,
        probe: bool = False,
        names: Sequence[str] | None = None,
        torrent: bytes | None = None,
        info_hash: str | None = None,
        ids: Sequence[tuple[int, int]] | None = None,
    ) -> InitTorrent:
        """The InitTorrent a source would send; ``ids`` are the files' source (device, inode)."""
        sel = list(selected) if selected is not None else [True] * len(self.files)
        paths = list(names) if names is not None else [rel for rel, _ in self.files]
        devino = list(ids) if ids is not None else [(0, 0)] * len(self.files)
        return InitTorrent(
            info_hash=info_hash or self.info_hash,
            name=self.files[0][0].split("/")[0],
            torrent_file=self.torrent if torrent is None else torrent,
            files=tuple(
                FileEntry(path=p, size=size, selected=s, device=dev, inode=ino)
                for p, (_, size), s, (dev, ino) in zip(paths, self.files, sel, devino, strict=True)
            ),
            piece_length=self.piece_length,
            total_size=self.total_size,
            num_pieces=self.num_pieces,
            save_sub_path=sub,
            resync=resync,
            probe=probe,
        )


def needed_indices(result: InitResult, num_pieces: int) -> list[int]:
    """The piece indices an InitResult asks for."""
    if not result.pieces_needed:
        return []
    return list(Bitfield(num_pieces, result.pieces_needed).set_indices())


@attrs.define
class WireClient:
    conn: ClientConnection
    timeout: float = 30.0

    async def init(self, t: LocalTorrent, **kwargs: object) -> InitResult:
        msg = t.init_msg(**kwargs)  # type: ignore[arg-type]
        return await self.conn.request(msg, timeout=self.timeout)

    async def init_ready(
        self, t: LocalTorrent, *, wait: float = 30.0, **kwargs: object
    ) -> InitResult:
        """Init, retrying while the destination answers VERIFYING (scanning files on disk)."""
        with trio.fail_after(wait):
            while True:
                result = await self.init(t, **kwargs)
                if result.status != SyncStatus.VERIFYING:
                    return result
                await trio.sleep(0.2)

    async def send_piece(
        self,
        t: LocalTorrent,
        index: int,
        data: bytes | None = None,
        *,
        deselected: Iterable[int] = (),
    ) -> PieceAck:
        payload = t.piece(index, deselected=deselected) if data is None else data
        return await self.conn.send_piece(t.info_hash, index, index * t.piece_length, payload)

    async def send(
        self,
        t: LocalTorrent,
        indices: Iterable[int],
        *,
        order: str = "asc",
        concurrency: int = 4,
        deselected: Iterable[int] = (),
        seed: int = 0,
    ) -> dict[int, PieceAck]:
        """Send pieces (``order``: ``asc``, ``desc`` or ``shuffle``), ``concurrency`` at once."""
        todo = list(indices)
        if order == "shuffle":
            random.Random(seed).shuffle(todo)
        elif order == "desc":
            todo.reverse()
        skip = list(deselected)
        acks: dict[int, PieceAck] = {}
        limiter = trio.CapacityLimiter(concurrency)

        async def one(i: int) -> None:
            async with limiter:
                acks[i] = await self.send_piece(t, i, deselected=skip)

        async with trio.open_nursery() as nursery:
            for i in todo:
                nursery.start_soon(one, i)
        return acks

    async def finalize(
        self,
        t: LocalTorrent,
        *,
        category: str = "",
        tags: Sequence[str] = (),
        wait: float = 120.0,
        interval: float = 0.3,
    ) -> FinalizeResult:
        """Finalize and poll while the destination answers VERIFYING (raises WireError)."""
        msg = Finalize(info_hash=t.info_hash, category=category, tags=tuple(tags))
        with trio.fail_after(wait):
            while True:
                result = await self.conn.request(msg, timeout=self.timeout)
                if result.status != SyncStatus.VERIFYING:
                    return result
                await trio.sleep(interval)

    async def sync(self, t: LocalTorrent, **send_kwargs: Any) -> FinalizeResult:
        """The happy path many tests start from: init, send every needed piece (asserting each
        was acked ``ok``), then finalize; returns the finalize result for the caller to check."""
        ready = await self.init_ready(t)
        acks = await self.send(t, needed_indices(ready, t.num_pieces), **send_kwargs)
        refused = {i: ack for i, ack in acks.items() if not ack.ok}
        assert not refused, f"pieces refused: {refused}"
        return await self.finalize(t)

    async def abort(self, t: LocalTorrent, *, delete_files: bool = True) -> AbortResult:
        return await self.conn.request(
            Abort(info_hash=t.info_hash, delete_files=delete_files), timeout=self.timeout
        )

    async def start(self, t: LocalTorrent, tag: str = "") -> StartResult:
        return await self.conn.request(
            StartTorrent(info_hash=t.info_hash, tag=tag), timeout=self.timeout
        )


# Every test client is the same source, as far as a destination can tell: one fixed key, so a
# destination without a token (trust on first use) pins it once and admits every later test
# connection. Tests of pairing pass another ``identity`` to play a stranger.
TEST_SOURCE_KEY = Ed25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"qbsync test source").digest()
)


@asynccontextmanager
async def wire_client(
    port: int,
    token: str | None,
    *,
    host: str = "127.0.0.1",
    request_timeout: float = 30.0,
    identity: Ed25519PrivateKey | None = None,
) -> AsyncIterator[WireClient]:
    async with open_connection(
        HostPort(host, port),
        token=token,
        identity=identity if identity is not None else TEST_SOURCE_KEY,
    ) as conn:
        yield WireClient(conn, request_timeout)


# --- a real destination process --------------------------------------------------------------

TEST_TOKEN = "test-token-0123456789"


@attrs.define
class Destination:
    """A running ``qbsync destination`` process started by :func:`start_destination`."""

    proc: QbsyncProcess
    port: int
    health_port: int
    data: Path
    token: str

    def client(self, token: str | None = None) -> AbstractAsyncContextManager[WireClient]:
        return wire_client(self.port, self.token if token is None else token)

    def http(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` on the health server (blocking)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}{path}", timeout=5
            ) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def start_destination(
    factory: Callable[..., QbsyncProcess],
    data: Path,
    *,
    token: str = TEST_TOKEN,
    qb_args: Sequence[str] = (),
    extra: Sequence[str] = (),
    port: int | None = None,
    wait: bool = True,
    env: Mapping[str, str] | None = None,
) -> Destination:
    """Start ``qbsync destination`` on loopback (fresh ports unless ``port`` is given) with
    ``--data data`` and wait until it logs ``event=destination_ready``."""
    port = port or free_port()
    health_port = free_port()
    while health_port == port:  # two free_port() calls can hand out the same port
        health_port = free_port()
    args = [
        "--data",
        str(data),
        "--listen",
        f"127.0.0.1:{port}",
        "--health-addr",
        f"127.0.0.1:{health_port}",
        "--poll-interval",
        "0.25",
        *(["--auth-token", token] if token else []),
        *qb_args,
        *extra,
    ]
    proc = factory("destination", args, env) if env else factory("destination", args)
    if wait:
        proc.wait_for_log("event=destination_ready", timeout=30)
    return Destination(proc, port, health_port, data, token)
