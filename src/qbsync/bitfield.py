"""A fixed-size bit set with the BitTorrent bit order (bit 0 is the high bit of byte 0).

Used for "pieces needed" on the wire and for the destination's persisted written-pieces map,
so the same bytes mean the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class Bitfield:
    __slots__ = ("_bits", "size")

    def __init__(self, size: int, data: bytes | bytearray | None = None) -> None:
        if size < 0:
            raise ValueError("negative bitfield size")
        self.size = size
        nbytes = (size + 7) // 8
        if data is None:
            self._bits = bytearray(nbytes)
        else:
            if len(data) != nbytes:
                raise ValueError(f"bitfield of {size} bits needs {nbytes} bytes, got {len(data)}")
            self._bits = bytearray(data)
            if size % 8 and self._bits[-1] & (0xFF >> (size % 8)):
                raise ValueError("bitfield has bits set past its end")

    @classmethod
    def full(cls, size: int) -> Bitfield:
        bf = cls(size)
        for i in range(size):
            bf[i] = True
        return bf

    @classmethod
    def from_indices(cls, size: int, indices: Iterable[int]) -> Bitfield:
        bf = cls(size)
        for i in indices:
            bf[i] = True
        return bf

    def __len__(self) -> int:
        return self.size

    def _check(self, index: int) -> None:
        if not 0 <= index < self.size:
            raise IndexError(f"bit {index} out of range 0..{self.size - 1}")

    def __getitem__(self, index: int) -> bool:
        self._check(index)
        return bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def __setitem__(self, index: int, value: bool) -> None:
        self._check(index)
        if value:
            self._bits[index >> 3] |= 0x80 >> (index & 7)
        else:
            self._bits[index >> 3] &= ~(0x80 >> (index & 7)) & 0xFF

    def __iter__(self) -> Iterator[bool]:
        return (self[i] for i in range(self.size))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitfield) and self.size == other.size and self._bits == other._bits

    def __repr__(self) -> str:
        return f"Bitfield({self.size}, set={self.count()})"

    def set_indices(self) -> Iterator[int]:
        for byte_index, byte in enumerate(self._bits):
            if byte:
                for bit in range(8):
                    if byte & (0x80 >> bit):
                        yield byte_index * 8 + bit

    def count(self) -> int:
        return sum(b.bit_count() for b in self._bits)

    def all(self) -> bool:
        return self.count() == self.size

    def invert(self) -> Bitfield:
        return Bitfield.from_indices(self.size, (i for i in range(self.size) if not self[i]))

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def copy(self) -> Bitfield:
        return Bitfield(self.size, self._bits)
