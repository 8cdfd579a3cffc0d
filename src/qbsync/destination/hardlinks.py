"""Which verified files on this destination came from which source (device, inode).

Cross-seeded torrents on a seedbox are usually hardlinks of one file. The source reports each
file's (``st_dev``, ``st_ino``); when a new torrent's file has the (device, inode) of a file a
*finalized* torrent here already holds (same size), the destination links it instead of
streaming it again. The link is then scanned like any file found on disk, so a recycled inode
or a modified file is caught before it counts.

Deliberately small: only verified files are link sources and there is no "pending" state, so
a torrent can never wait on itself or on a writer that died. Two torrents streaming the same
file at the same time simply both stream it. The registry is rebuilt at startup from the
``.finalized`` markers, which keep the (device, inode) index (otherwise a restart would forget
every link source). Stale entries are dropped when they are looked up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .. import metrics, paths

if TYPE_CHECKING:
    from .state import FinalizedMarker

log = logging.getLogger("qbsync.destination.hardlinks")


class HardlinkRegistry:
    def __init__(self) -> None:
        self._by_id: dict[tuple[int, int], tuple[paths.Parts, int]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, device: int, inode: int, parts: paths.Parts, size: int) -> None:
        if (device or inode) and size > 0:
            self._by_id[(device, inode)] = (parts, size)

    def add_marker(self, marker: FinalizedMarker) -> None:
        # The marker stores full data-root-relative paths (sub path included).
        for f in marker.files:
            try:
                parts = paths.split_relative(f.path)
            except paths.UnsafePathError:
                continue
            self.add(f.device, f.inode, parts, f.size)

    def lookup(self, device: int, inode: int, size: int, root: Path) -> paths.Parts | None:
        """A verified file with this source identity and size, still present; evicts stale
        entries (deleted, replaced, or a recycled inode of another size)."""
        entry = self._by_id.get((device, inode))
        if entry is None:
            return None
        parts, known = entry
        try:
            present = paths.regular_size(root, parts)
        except (OSError, paths.UnsafePathError):
            present = None
        if known != size or present != size:
            # pop, not del: lookups run in worker threads, another may have evicted it already.
            if present != known and self._by_id.pop((device, inode), None) is not None:
                metrics.stale_inode_evictions.inc()
                log.info("event=hardlink_source_evicted path=%s", "/".join(parts))
            return None
        return parts
