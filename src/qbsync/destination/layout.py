"""Layout: the source's file table checked against the parsed metainfo, turned into the
torrent's :class:`~.state.DataFile` list. Geometry (sizes, offsets, order, piece hashes) is
always the metainfo's; only names and the selection come from the request."""

from __future__ import annotations

from collections.abc import Sequence

from .. import paths
from ..torrent import Metainfo
from ..wire.errors import ErrorCode, WireError
from .state import DataFile, FileMeta, FileStatus


def pad_flags(metainfo: Metainfo) -> list[bool]:
    """Which geometry files are BEP 47 padding files (see :attr:`Metainfo.pads`). qBittorrent
    hides them from its file list, the geometry keeps them; they are all zeros, never written
    to disk, and the source sends zeros for them."""
    pads = list(metainfo.pads)
    n = len(metainfo.geometry.files)
    return pads if len(pads) == n else [False] * n


def build_files(metainfo: Metainfo, entries: Sequence[FileMeta], sub: str) -> list[DataFile]:
    """Lay out the torrent's files under ``sub`` using the source's names.

    Geometry (sizes, offsets, order, piece hashes) is the metainfo's; only names and the
    selection come from the request, and the request must agree with the metainfo on the number
    of files and every size. Raises :class:`WireError` ``bad-request`` or ``unsafe-path``.
    """
    geometry = metainfo.geometry
    pads = pad_flags(metainfo)
    try:
        sub_parts = paths.split_relative(sub, allow_empty=True)
    except paths.UnsafePathError as exc:
        raise WireError(ErrorCode.UNSAFE_PATH, f"save_sub_path: {exc}") from None
    if len(entries) == len(geometry.files):
        targets = list(range(len(geometry.files)))
    else:
        targets = [i for i, pad in enumerate(pads) if not pad]
        if len(entries) != len(targets):
            raise WireError(
                ErrorCode.BAD_REQUEST,
                f"file list has {len(entries)} entries, the torrent has {len(targets)} files",
            )
    by_geometry: dict[int, tuple[int, FileMeta]] = {}
    for request_index, (entry, gi) in enumerate(zip(entries, targets, strict=True)):
        tf = geometry.files[gi]
        if entry.size != tf.size:
            raise WireError(
                ErrorCode.BAD_REQUEST,
                f"file {request_index} size {entry.size} differs from the torrent's {tf.size}",
            )
        by_geometry[gi] = (request_index, entry)
    files: list[DataFile] = []
    rels: list[paths.Parts] = []
    for tf in geometry.files:
        if tf.index not in by_geometry:
            files.append(
                DataFile(
                    index=tf.index,
                    request_index=-1,
                    parts=(),
                    size=tf.size,
                    offset=tf.offset,
                    selected=False,
                    pad=True,
                    status=FileStatus.SKIPPED,
                )
            )
            continue
        request_index, entry = by_geometry[tf.index]
        try:
            rel = paths.split_relative(entry.path)
        except paths.UnsafePathError as exc:
            raise WireError(ErrorCode.UNSAFE_PATH, f"file {request_index}: {exc}") from None
        pad = pads[tf.index]
        if not pad:
            rels.append(rel)
        files.append(
            DataFile(
                index=tf.index,
                request_index=request_index,
                parts=sub_parts + rel,
                size=tf.size,
                offset=tf.offset,
                selected=entry.selected and not pad,
                pad=pad,
                device=entry.device,
                inode=entry.inode,
                status=FileStatus.STREAMING if entry.selected and not pad else FileStatus.SKIPPED,
            )
        )
    try:
        paths.check_layout(sub_parts, rels)
    except paths.UnsafePathError as exc:
        raise WireError(ErrorCode.UNSAFE_PATH, str(exc)) from None
    return files
