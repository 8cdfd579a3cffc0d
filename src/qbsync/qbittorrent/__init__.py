"""qBittorrent access: the Web API wrapped for Trio, and throwaway local instances.

Owns every conversation with a qBittorrent process: :mod:`.api` (the version-aware Web API
client, run in worker threads with retries and a circuit breaker) and :mod:`.instance`
(starting a loopback-only ``qbittorrent-nox`` for the demo and the tests).

May import: the shared root modules (``config``, ``log``, ``metrics``, ``torrent``, ``paths``)
and ``http.liveness`` (a qBittorrent call is a dependency wait that ``/healthz`` must tell
apart from a stuck event loop); nothing from ``source``, ``destination``, ``integrations`` or
``demo``.
"""
