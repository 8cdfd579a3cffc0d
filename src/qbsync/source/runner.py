"""``qbsync source``: wire the parts together and run them in one Trio nursery tree.

::

    runner nursery
    ├── signal watcher      SIGINT/SIGTERM -> cancel the tree (graceful stop)
    ├── http server         /healthz /livez /readyz /metrics /status
    ├── connection pool     one task per destination connection (+ scaler)
    ├── monitor             sync/maindata every 0.5 s, piece states of changed torrents
    ├── orchestrator        discovery, exclusions, finalize, tags (every --sleep, or sooner)
    └── senders             --num-senders workers + one delivery task per piece in flight

A failing child cancels its siblings and the process exits non-zero; nothing runs
unsupervised. qBittorrent being down at startup is not fatal: the runner waits for it (the
health server already answers, ``/readyz`` says why it is not ready).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import trio

from .. import __version__, metrics
from ..config import SourceConfig, redacted
from ..http import status as status_model
from ..http.activity import ActivityLog, Throughput, counter_value, sample_forever
from ..http.server import Health, serve_http
from ..http.status import StatusBuilder
from ..identity import IdentityError
from ..identity.daemon import setup as identity_setup
from ..integrations import systemd
from ..integrations.k8s import drain_decision, kube_source
from ..integrations.notify import Notifier
from ..log import kv, redact_url
from ..qbittorrent.api import QB, QBError
from ..ratelimit import Backoff
from ..wire import server_ssl_context
from .cache import CompletionCache
from .monitor import Monitor
from .orchestrator import Orchestrator
from .paths import PathMapper
from .pool import ConnectionPool, make_connector
from .reader import PieceReader
from .reverse import ReverseHub
from .sender import Senders
from .state import Registry

log = logging.getLogger("qbsync.source.runner")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # the daemon cannot start as configured (one logged line says why)


def run(config: SourceConfig) -> int:
    """Run the source daemon until SIGINT/SIGTERM; return the process exit code."""
    try:
        return trio.run(_main, config)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130


async def _main(config: SourceConfig) -> int:
    log.info(
        "event=starting role=source version=%s pid=%d config=%s",
        __version__,
        os.getpid(),
        kv(json.dumps(redacted(config), sort_keys=True)),
    )
    metrics.build_info.labels(__version__, "source").set(1)
    token = config.auth_token or None
    if token is None:
        log.warning(
            "event=auth_disabled role=source reason=%s",
            kv(
                "no --auth-token/--auth-token-file: the destination must also run without "
                "one; keys are pinned on first use unless --peer-fingerprint is set"
            ),
        )
    ssl_context = None
    if config.tls_ca is not None:
        from ..wire import client_ssl_context

        ssl_context = client_ssl_context(config.tls_ca)
    log.info(
        "event=drain_gate annotation=%s kube_config=%s",
        kv(config.drain_annotation or "(none: drain unconditionally)"),
        kv(kube_source().describe() if config.drain_annotation else "unused"),
    )
    if config.dry_run:
        log.warning("event=dry_run_enabled reason=%s", kv("nothing is sent, tagged or deleted"))
    _check_state_dir(config.state_dir, config.dry_run)
    try:
        # A listening source (reverse dialing) never trusts on first use: its port is
        # reachable by anyone (identity.daemon.setup).
        identity, admission = identity_setup(config, listening=config.listen is not None)
    except IdentityError as exc:
        log.error("event=startup_failed code=identity error=%s", kv(str(exc)))
        return EXIT_CONFIG
    hub: ReverseHub | None = None
    if config.listen is not None:
        # Reverse dialing: the destination connects here (--connect); the source stays the
        # protocol client. The listening side is the TLS server.
        hub = ReverseHub(
            config.listen,
            token=config.auth_token,
            ssl_context=(
                server_ssl_context(config.tls_cert, config.tls_key)
                if config.tls_cert is not None and config.tls_key is not None
                else None
            ),
            instance=config.source_name,
            identity=identity.key,
            admission=admission,
            max_idle=config.max_connections,
        )
    health = Health()
    notifier = Notifier(config.notify_url, "source")
    qb = QB(
        config.qb_url,
        config.qb_username,
        config.qb_password,
        mode="source",
        api_key=config.qb_api_key,
    )
    registry = Registry()
    reader = PieceReader()
    if hub is not None:
        connector, address = hub.connector(), hub.address
    else:
        assert config.destination_addr is not None  # resolve(): one of the two
        connector = make_connector(
            config.destination_addr,
            token=token,
            ssl_context=ssl_context,
            instance=config.source_name,
            identity=identity.key,
            admission=admission,
        )
        address = str(config.destination_addr)
    pool = ConnectionPool(
        connector,
        address=address,
        min_connections=config.min_connections,
        max_connections=config.max_connections,
        reconnect_max_delay=config.reconnect_max_delay,
        queue_depth=lambda: len(registry.queue),
    )
    cache = CompletionCache(config.state_dir, read_only=config.dry_run)
    throughput = Throughput(counter_value("qbsync_bytes_sent_total"))
    history = ActivityLog(None if config.dry_run else state_dir(config), throughput=throughput)
    history.load()

    async def destination_ready() -> None:
        if pool.connected == 0:
            code, message = pool.last_error or ("connecting", "no connection yet")
            raise RuntimeError(f"no authenticated destination connection ({code}: {message})")

    health.add_ready_check("qbittorrent", qb.ping)
    health.add_ready_check("destination", destination_ready)
    status: dict[str, Any] = {}
    builder = StatusBuilder("source")
    health.set_status_provider(
        lambda: _status(status, pool, registry, builder, config, history, throughput)
    )

    signals_seen = 0
    exit_code = EXIT_OK
    main_scope = trio.CancelScope()
    orchestrator: Orchestrator | None = None
    try:
        async with trio.open_nursery() as outer:

            async def watch_signals() -> None:
                # First signal: stop the loops (then drain). Second: stop everything now.
                nonlocal signals_seen
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        signals_seen += 1
                        name = signal.Signals(signum).name
                        if signals_seen == 1:
                            log.info("event=stopping signal=%s", name)
                            systemd.notify("STOPPING=1\nSTATUS=stopping")
                            health.mark_not_ready()
                            main_scope.cancel()
                        else:
                            log.warning("event=stopping_now signal=%s", name)
                            outer.cancel_scope.cancel()
                            return

            outer.start_soon(watch_signals)
            outer.start_soon(sample_forever, throughput)
            interval = systemd.watchdog_interval()
            if interval is not None:

                async def live() -> bool:
                    return (await health.check_live()).ok

                outer.start_soon(systemd.watchdog, live, interval)
            if config.health_addr is not None:
                ports = await outer.start(serve_http, config.health_addr, health)
                log.info("event=health_listening addr=%s ports=%s", config.health_addr, ports)
            if hub is not None:
                await outer.start(hub.run)
            await outer.start(pool.run)
            await outer.start(notifier.run)
            with main_scope:
                async with trio.open_nursery() as nursery:
                    prefs = await _wait_for_qb(qb, health)
                    mapper = PathMapper.from_preferences(config.data, prefs)
                    log.info(
                        "event=qbittorrent_connected url=%s save_path=%s temp_path=%s data=%s",
                        kv(redact_url(config.qb_url)),
                        kv(mapper.qb_default),
                        kv(mapper.qb_temp),
                        kv(str(config.data)),
                    )
                    monitor = Monitor(qb, registry, health=health)
                    orchestrator = Orchestrator(
                        config,
                        qb=qb,
                        pool=pool,
                        registry=registry,
                        monitor=monitor,
                        reader=reader,
                        cache=cache,
                        mapper=mapper,
                        health=health,
                    )
                    status["orchestrator"] = orchestrator
                    orchestrator.notifier = orchestrator.cleanup.notifier = notifier
                    orchestrator.activity = orchestrator.cleanup.activity = history
                    status["monitor"] = monitor
                    await nursery.start(orchestrator.run)
                    await nursery.start(monitor.run)
                    if not config.dry_run:
                        senders = Senders(
                            registry,
                            pool,
                            reader,
                            num_senders=config.num_senders,
                            piece_timeout=config.piece_timeout,
                            rate_limit=config.rate_limit,
                            relocate=orchestrator.relocate,
                        )
                        status["senders"] = senders
                        await nursery.start(senders.run)
                    health.mark_ready()
                    systemd.notify("READY=1\nSTATUS=streaming")
                    log.info("event=started role=source dry_run=%s", str(config.dry_run).lower())
            # The loops have stopped (a signal). In-flight pieces are simply dropped: the
            # destination's "pieces needed" says what is missing after a restart.
            for name in ("monitor", "orchestrator"):
                health.forget_heartbeat(name)
            if signals_seen and orchestrator is not None:
                await _drain(config, qb, orchestrator)
            outer.cancel_scope.cancel()
    except Exception:
        log.exception("event=fatal role=source code=internal")
        exit_code = EXIT_FAILURE
    finally:
        reader.close()
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        await history.save()  # the chart's last hour survives the restart
    log.info("event=stopped role=source signals=%d code=%d", signals_seen, exit_code)
    return exit_code


async def _drain(config: SourceConfig, qb: QB, orchestrator: Orchestrator) -> None:
    """The SIGTERM drain: hand every synced torrent to the destination, if the gate allows.

    The whole drain -- annotation lookup included -- runs under ``--drain-timeout``. It reads
    a fresh torrent list, not the last cycle's
    (docs/design-decisions.md#fresh-torrent-list-for-drain).
    """
    with trio.move_on_after(config.drain_timeout) as scope:
        decision = await drain_decision(
            config.drain_annotation, request_timeout=config.drain_timeout
        )
        if not decision.drain:
            log.warning("event=drain_skipped reason=%s", kv(decision.reason))
            return
        log.info(
            "event=drain_start reason=%s timeout_s=%g", kv(decision.reason), config.drain_timeout
        )
        metrics.draining.set(1)
        try:
            torrents = await qb.torrents()
            result = await orchestrator.cleanup.run_pass(torrents, free_bytes=None, draining=True)
        except QBError as exc:
            log.error("event=drain_failed code=qb-error error=%s", kv(str(exc)))
            return
        finally:
            metrics.draining.set(0)
        log.info(
            "event=drain_done handed_off=%d failed_groups=%d",
            result.handed_off if result else 0,
            result.groups_failed if result else 0,
        )
    if scope.cancelled_caught:
        metrics.draining.set(0)
        log.error("event=drain_timeout timeout_s=%g", config.drain_timeout)


async def _wait_for_qb(qb: QB, health: Health) -> dict[str, Any]:
    """qBittorrent's preferences, retrying (with backoff) until it answers."""
    backoff = Backoff(1.0, 30.0)
    while True:
        health.heartbeat("startup")
        try:
            prefs = await qb.preferences()
        except QBError as exc:
            delay = backoff.next_delay()
            log.warning(
                "event=qbittorrent_unreachable code=qb-error retry_in_s=%.1f error=%s",
                delay,
                kv(str(exc)),
            )
            await trio.sleep(delay)
            continue
        health.forget_heartbeat("startup")
        return prefs


def _check_state_dir(path: Path, dry_run: bool) -> None:
    if dry_run:
        return
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o750)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        log.error(
            "event=state_dir_not_writable path=%s code=io error=%s",
            kv(str(path)),
            kv(exc.strerror or str(exc)),
        )


def state_dir(config: SourceConfig) -> Path:
    """Where the source keeps its state (the completion cache, the activity log): the one
    place that resolves it."""
    return config.state_dir


def _status(
    parts: dict[str, Any],
    pool: ConnectionPool,
    registry: Registry,
    builder: StatusBuilder,
    config: SourceConfig,
    history: ActivityLog,
    throughput: Throughput,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "role": "source",
        "version": __version__,
        "time": time.time(),
        "destination": {
            "address": pool.address,
            "connections": pool.connected,
            "generation": pool.generation,
            "last_error": list(pool.last_error) if pool.last_error else None,
        },
        "queued_pieces": len(registry.queue),
    }
    orchestrator: Orchestrator | None = parts.get("orchestrator")
    if orchestrator is not None:
        out.update(orchestrator.status())
    monitor: Monitor | None = parts.get("monitor")
    if monitor is not None:
        out["qbittorrent"] = {
            "reachable": monitor.healthy,
            "torrents": len(monitor.torrents),
            "piece_state_polls": monitor.polls,
        }
    senders: Senders | None = parts.get("senders")
    if senders is not None:
        out["senders"] = senders.status()
    daemon = status_model.source_daemon(pool, registry, senders)
    infos = monitor.torrents if monitor is not None else {}
    free = monitor.server_state.get("free_space_on_disk") if monitor is not None else None
    candidates = []
    if orchestrator is not None:
        for group in orchestrator.cleanup.next_candidates(list(infos.values())):
            for c in group.members:
                candidates.append(
                    {
                        "hash": c.info_hash,
                        "name": c.name,
                        "size": c.size,
                        "seeding_time": c.seeding_time,
                        "peers": c.popularity,
                        "waiting_seeding": c.seeding_time < config.min_seeding_time,
                    }
                )
    sections = status_model.Sections(
        activity=history,
        throughput=throughput,
        peers=status_model.source_peers(
            pool, auth="key + token" if config.auth_token else "key", tls=config.tls_ca is not None
        ),
        free_bytes=int(free) if isinstance(free, int | float) else None,
        min_space_bytes=config.min_space_bytes,
        handoff_candidates=candidates,
    )
    torrents = status_model.source_torrents(registry, infos, connected=pool.connected > 0)
    return builder.document(daemon, torrents, legacy=out, sections=sections)
