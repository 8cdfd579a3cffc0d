"""The HTTP surface of both daemons: probes, ``/metrics``, ``/status`` and the status page.

Owns the h11 server (:mod:`.server`), the loop-liveness heartbeat behind ``/healthz``
(:mod:`.liveness`) and the ``/status`` document with its HTML page and ``qbsync status``
table (:mod:`.status`).

May import: the shared root modules (``config``, ``log``, ``metrics``); nothing from
``source``, ``destination``, ``qbittorrent``, ``integrations`` or ``demo``: the daemons hand
it what it shows.
"""
