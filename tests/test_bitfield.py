from __future__ import annotations

import pytest

from qbsync.bitfield import Bitfield


def test_bit_order_is_bittorrent() -> None:
    bf = Bitfield(10)
    bf[0] = True
    bf[9] = True
    assert bf.to_bytes() == b"\x80\x40"
    assert list(bf.set_indices()) == [0, 9]
    assert bf.count() == 2
    bf[0] = False
    assert bf.to_bytes() == b"\x00\x40"


def test_round_trip_and_invert() -> None:
    bf = Bitfield.from_indices(13, [1, 5, 12])
    again = Bitfield(13, bf.to_bytes())
    assert again == bf
    assert sorted(bf.invert().set_indices()) == [i for i in range(13) if i not in (1, 5, 12)]
    assert Bitfield.full(13).all()


def test_rejects_wrong_length_and_spare_bits() -> None:
    with pytest.raises(ValueError):
        Bitfield(9, b"\x00")
    with pytest.raises(ValueError):
        Bitfield(9, b"\x00\x01")  # bit 15 is past the end
    with pytest.raises(IndexError):
        Bitfield(3)[3]
