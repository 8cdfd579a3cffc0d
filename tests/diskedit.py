"""Damage a file in place, as a disk or a user would: the tests that prove a destination
notices changed bytes all do it the same way, from here."""

from __future__ import annotations

from pathlib import Path


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` over the bytes of ``path`` at ``offset`` (size unchanged inside it)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    """XOR the byte of ``path`` at ``offset`` with ``mask``: surely another byte."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        byte = fh.read(1)
    overwrite(path, offset, bytes([byte[0] ^ mask]))
