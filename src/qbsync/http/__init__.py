"""The HTTP surface of both daemons: probes, ``/metrics``, ``/status`` and the status page.

Owns the h11 server (:mod:`.server`), the loop-liveness heartbeat behind ``/healthz``
(:mod:`.liveness`) and the ``/status`` document with its HTML page and ``qbsync status``
table (:mod:`.status`), and the history the page shows: finished syncs, hand-offs and
failures, totals and last-hour throughput (:mod:`.activity`).

May import: the shared root modules (``config``, ``log``, ``metrics``); nothing from
``source``, ``destination``, ``qbittorrent``, ``integrations`` or ``demo``: the daemons hand
it what it shows.
"""
