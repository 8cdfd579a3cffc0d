"""``qbsync destination``: the home side.

Owns what happens to a torrent on the destination: the wire requests (:mod:`.server`), each
torrent's state and its crash-safe record (:mod:`.state`, :mod:`.store`, :mod:`.durable`),
the files qbsync created and may therefore touch (:mod:`.ownership`, :mod:`.names`,
:mod:`.files`), verified writes and their file handles (:mod:`.writer`), reading pieces back
and scanning files found on disk (:mod:`.verify`) and the hand-over to
qBittorrent (:mod:`.finalizer`), all supervised by :mod:`.runner`.

May import: ``wire``, ``qbittorrent``, ``http``, ``integrations`` and the shared root modules;
never ``source`` or ``demo`` (the two daemons share only the wire protocol).
"""
