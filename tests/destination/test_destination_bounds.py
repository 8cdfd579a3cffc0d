"""Bounds on what one request can cost: the ``.torrent`` is decoded once, in a worker thread,
with a cap on bencoded values; tracked torrents are capped; malformed fields are
``bad-request``, never ``internal``."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from qbsync import torrent as torrent_module
from qbsync.destination import server as server_module
from qbsync.torrent import MAX_ITEMS, MetainfoError, bencode, parse_metainfo
from qbsync.wire import ErrorCode, WireError
from qbsync.wire.messages import valid_info_hash
from tests.destination.test_destination_writer import build, torrent


def bomb(items: int) -> bytes:
    """A .torrent-shaped bencode whose info holds ``items`` empty dictionaries."""
    return b"d4:infod5:filesl" + b"de" * items + b"e4:name1:x12:piece lengthi16384eee"


def test_bencode_bomb_is_refused_by_the_item_cap() -> None:
    """Before the fix a 1.9 MiB list of empty maps decoded fully (+68 MiB RSS)."""
    with pytest.raises(MetainfoError, match="bencoded values"):
        parse_metainfo(bomb(MAX_ITEMS))
    with pytest.raises(MetainfoError):
        parse_metainfo(bomb(1000))  # small ones fail on content, not on the cap


def test_torrent_is_decoded_exactly_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to be decoded three times (whole, the info bytes again, the pad flags)."""
    t = torrent(tmp_path)
    top_level = 0
    real = torrent_module._decode

    def counting(buf: memoryview, pos: int, depth: int, budget: list[int]) -> object:
        nonlocal top_level
        top_level += depth == 1
        return real(buf, pos, depth, budget)

    monkeypatch.setattr(torrent_module, "_decode", counting)
    m = parse_metainfo(t.torrent)
    assert m.info_hash == t.info_hash
    keys = len(torrent_module.bdecode(t.torrent))
    top_level_per_decode = 2 * keys  # every top-level key and value
    top_level -= top_level_per_decode  # the bdecode just above
    assert top_level == top_level_per_decode


def test_integer_attr_is_a_bad_request_not_internal(tmp_path: Path) -> None:
    info = {
        "name": "x",
        "piece length": 16384,
        "pieces": b"\0" * 20,
        "files": [{"length": 5, "path": ["a"], "attr": 7}],
    }
    with pytest.raises(MetainfoError, match="attr"):
        parse_metainfo(bencode({"info": info}))


def test_info_hash_with_a_trailing_newline_is_invalid() -> None:
    assert valid_info_hash("ab" * 20)
    assert not valid_info_hash("ab" * 20 + "\n")
    assert not valid_info_hash("AB" * 20)


async def test_init_decodes_in_a_worker_thread(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode blocks until the event loop itself releases it: were it on the loop, this
    would deadlock (the loop is what would release it)."""
    t = torrent(tmp_path)
    d = build(tmp_path, nursery)
    release = threading.Event()
    real = parse_metainfo

    def slow_parse(data: bytes) -> object:
        assert release.wait(30), "the event loop never ran while decoding"
        return real(data)

    monkeypatch.setattr(server_module, "parse_metainfo", slow_parse)
    done = trio.Event()

    async def init() -> None:
        await d.init(t)
        done.set()

    nursery.start_soon(init)
    await trio.sleep(0.01)  # the loop is free while the decode waits
    release.set()
    with trio.fail_after(30):
        await done.wait()


async def test_tracked_torrents_are_capped(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "MAX_TRACKED", 1)
    d = build(tmp_path, nursery)
    first = torrent(tmp_path / "one")
    second = torrent(tmp_path / "two", seed=4)
    await d.init(first)
    with pytest.raises(WireError) as err:
        await d.server.init(second.init_msg(sub="elsewhere"))
    assert err.value.code == ErrorCode.BUSY and "limit is 1" in err.value.message
    assert second.info_hash not in d.store.torrents


async def test_tracked_metadata_is_charged_to_a_byte_budget(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Issue 15, finding 4: the cap was 4,096 torrents, not bytes."""
    d = build(tmp_path, nursery)
    first = torrent(tmp_path / "one")
    second = torrent(tmp_path / "two", seed=4)
    d.server.max_metadata = 1  # below one torrent: the first is still admitted alone
    await d.init(first)
    used = d.server.metadata_in_use()
    assert used == server_module.metadata_bytes(d.store.torrents[first.info_hash].metainfo)
    assert used >= len(first.torrent)
    with pytest.raises(WireError) as err:
        await d.server.init(second.init_msg(sub="elsewhere"))
    assert err.value.code == ErrorCode.BUSY and "--max-metadata" in err.value.message
    assert second.info_hash not in d.store.torrents
    # room for both: admitted
    d.server.max_metadata = 10 * used + 4 * len(second.torrent)
    await d.server.init(second.init_msg(sub="elsewhere"))
    assert second.info_hash in d.store.torrents
    # an init of an already-tracked torrent is never refused for the budget
    d.server.max_metadata = 1
    await d.server.init(first.init_msg())


async def test_finalize_save_sub_path_is_validated_though_not_acted_on(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from qbsync.wire import Finalize

    d = build(tmp_path, nursery)
    t = torrent(tmp_path)
    for bad in ("../up", "/abs", "a//b"):
        with pytest.raises(WireError) as err:
            await d.server.finalize(Finalize(t.info_hash, save_sub_path=bad))
        assert err.value.code == ErrorCode.UNSAFE_PATH
    with pytest.raises(WireError) as err:  # a valid one goes on: this torrent is unknown
        await d.server.finalize(Finalize(t.info_hash, save_sub_path="tv/shows"))
    assert err.value.code == ErrorCode.NOT_FOUND


async def test_metadata_gauges_follow_the_tracked_torrents(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from qbsync import metrics

    d = build(tmp_path, nursery)
    t = torrent(tmp_path)
    assert metrics.REGISTRY.get_sample_value("qbsync_metadata_bytes") == 0
    await d.init(t)
    used = d.server.metadata_in_use()
    assert used > 0
    assert metrics.REGISTRY.get_sample_value("qbsync_metadata_bytes") == used
    assert metrics.REGISTRY.get_sample_value("qbsync_metadata_limit_bytes") == (
        server_module.DEFAULT_MAX_METADATA
    )


def test_large_buffers_go_back_to_the_kernel_on_glibc() -> None:
    """The destination pins glibc's mmap threshold (see runner.MMAP_THRESHOLD) so a refused
    26 MiB .torrent does not stay in the heap; where there is no glibc it is a no-op."""
    import platform

    from qbsync.destination.runner import return_large_buffers_to_the_kernel

    applied = return_large_buffers_to_the_kernel()
    if platform.libc_ver()[0] == "glibc":
        assert applied
