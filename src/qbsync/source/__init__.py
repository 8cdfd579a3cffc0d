"""``qbsync source``: the seedbox side.

Owns what happens to a torrent on the source: watching qBittorrent (:mod:`.monitor`), the
tracked torrents and their lifecycle (:mod:`.state`, :mod:`.orchestrator`), reading finished
pieces (:mod:`.reader`), the connection pool and senders (:mod:`.pool`, :mod:`.sender`), the
completion cache (:mod:`.cache`) and ``--synced-tag``, changed together (:mod:`.synced`), and the
hand-off and cleanup that may delete the source's copy (:mod:`.cleanup`), all supervised by
:mod:`.runner`.

May import: ``wire``, ``qbittorrent``, ``http``, ``integrations`` and the shared root modules;
never ``destination`` or ``demo`` (the two daemons share only the wire protocol).
"""
