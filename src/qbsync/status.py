"""Placeholder replaced below."""

from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    return 2
