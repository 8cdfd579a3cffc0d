"""qbsync: stream torrent pieces from a source qBittorrent to a destination as they download."""

__version__ = "0.1.0"
