"""``qbsync demo``: the whole product on one machine, with throwaway qBittorrents on loopback.

Owns the demo's orchestration (:mod:`.run`). May import anything below it: the shared root
modules and ``qbittorrent``; the daemons themselves run as separate ``qbsync`` processes.
"""
