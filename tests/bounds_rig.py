"""Hostile-but-well-formed inputs for the bounded-decoding test and benchmark (issue 15,
finding 4): the codec bomb (an ``InitTorrent`` whose unknown key holds millions of empty
maps) and large ``.torrent`` files, plus the one trick needed to send a body the message
classes cannot express.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from typing import Any

from qbsync.torrent import bencode
from qbsync.wire import codec
from qbsync.wire import messages as m

MiB = 1024 * 1024


def bomb_body(info_hash: str, size: int = 32 * MiB - 64) -> bytes:
    """An InitTorrent body of about ``size`` bytes: ``info_hash`` plus an unknown key whose
    value is a list of empty maps, two bytes each. Before the fix it decoded to ~16 million
    ``dict`` objects (1.2 GiB) on the event loop."""
    head = bytearray([codec._T_MAP, 2])
    head += codec.pack("info_hash") + codec.pack(info_hash)
    head += codec.pack("x-unknown") + bytes([codec._T_LIST])
    n = (size - len(head) - 5) // 2
    codec._put_uvarint(head, n)
    return bytes(head) + b"\x07\x00" * n


@contextlib.contextmanager
def raw_init_bodies(bodies: dict[str, bytes]) -> Iterator[None]:
    """While active, an ``InitTorrent`` whose ``info_hash`` is a key of ``bodies`` is sent with
    that raw body instead of its encoding (this process only: the test's own client)."""
    real = codec.encode_message

    def encode(msg: m.ControlMessage) -> tuple[int, bytes]:
        if isinstance(msg, m.InitTorrent) and msg.info_hash in bodies:
            return codec.INIT_TORRENT, bodies[msg.info_hash]
        return real(msg)

    codec.encode_message = encode
    try:
        yield
    finally:
        codec.encode_message = real


def large_torrent(seed: int, pieces: int = 1_300_000) -> tuple[bytes, str, int]:
    """A v1 ``.torrent`` of ``pieces`` 1 MiB pieces (26 MiB of piece hashes for the default)
    over one file that is never written: ``(torrent, info_hash, file size)``. The hashes are
    pseudo-random; only the metadata's cost is under test."""
    hashes = bytearray()
    block = hashlib.sha256(f"seed-{seed}".encode()).digest()
    while len(hashes) < pieces * 20:
        block = hashlib.sha256(block).digest()
        hashes += block * 64
    size = pieces * MiB
    info: dict[str, Any] = {
        "length": size,
        "name": f"large-{seed}.bin",
        "piece length": MiB,
        "pieces": bytes(hashes[: pieces * 20]),
    }
    data = bencode({"info": info})
    info_hash = hashlib.sha1(bencode(info)).hexdigest()
    return data, info_hash, size


def large_init(seed: int, pieces: int = 1_300_000) -> m.InitTorrent:
    data, info_hash, size = large_torrent(seed, pieces)
    name = f"large-{seed}.bin"
    return m.InitTorrent(
        info_hash=info_hash,
        name=name,
        torrent_file=data,
        files=(m.FileEntry(name, size),),
        piece_length=MiB,
        total_size=size,
        num_pieces=pieces,
    )


def peak_rss_bytes(pid: int) -> int:
    """``VmHWM``: the peak resident set of a running process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def release_file_env(path: os.PathLike[str] | str) -> dict[str, str]:
    """The environment that makes a destination hold every worker-thread decode until
    ``path`` exists (see ``qbsync.wire.shell.DECODE_HOLD_ENV``)."""
    from qbsync.wire.shell import DECODE_HOLD_ENV

    return {DECODE_HOLD_ENV: str(path)}
