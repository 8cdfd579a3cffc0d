"""Integrations with the world around the daemons, each optional and each at arm's length.

Owns the Kubernetes drain gate (:mod:`.k8s`), systemd's ``sd_notify`` (:mod:`.systemd`),
webhook notifications (:mod:`.notify`) and Sonarr/Radarr (:mod:`.arr`).

May import: the shared root modules (``config``, ``log``, ``metrics``); nothing from
``source``, ``destination``, ``qbittorrent``, ``http`` or ``demo``: the daemons call it.
"""
