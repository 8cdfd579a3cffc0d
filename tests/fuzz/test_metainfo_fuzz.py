"""Arbitrary bytes never make the metainfo parser raise anything but MetainfoError."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from qbsync.torrent import Geometry, MetainfoError, bdecode, bencode, parse_metainfo

bvalues = st.recursive(
    st.integers(min_value=-(2**70), max_value=2**70) | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.binary(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


@given(st.binary(max_size=300))
def test_parse_never_crashes(data: bytes) -> None:
    with contextlib.suppress(MetainfoError):
        parse_metainfo(data)


@given(bvalues)
def test_bencode_round_trip(value: object) -> None:
    assert bdecode(bencode(value)) == value


@given(bvalues)
def test_structured_garbage_is_a_metainfo_error(value: object) -> None:
    with contextlib.suppress(MetainfoError):
        parse_metainfo(bencode({b"info": value}))


@given(
    st.integers(min_value=1, max_value=64),
    st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=8),
)
def test_spans_tile_every_piece(piece_length: int, sizes: list[int]) -> None:
    g = Geometry.from_sizes(piece_length, [(f"r/{i}", s) for i, s in enumerate(sizes)])
    covered = 0
    for i in range(g.num_pieces):
        pos = 0
        for span in g.spans(i):
            assert span.piece_offset == pos
            f = g.files[span.file_index]
            assert f.offset + span.file_offset == g.piece_offset(i) + pos
            assert span.length > 0 and span.file_offset + span.length <= f.size
            pos += span.length
        assert pos == g.piece_size(i)
        covered += pos
    assert covered == g.total_size
