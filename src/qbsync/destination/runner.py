"""``qbsync destination``: the process. One Trio nursery tree owns everything:

```
run(config) -> trio.run(main)
  main nursery
    serve_http            /healthz /livez /readyz /metrics /status (if --health-addr)
    wire listener         wire.serve(...) in its own cancel scope (stopped first at shutdown)
      one task per connection, handler tasks per request/piece (wire's nurseries)
    flusher               every FLUSH_INTERVAL: fdatasync touched files, persist bitmaps
    orphan reaper         hourly: reclaim unfinished torrents idle for 24 h
    background work       scans, early file finalizes, finalize jobs (Store.spawn)
    signal watcher        SIGINT/SIGTERM -> graceful shutdown
```

Startup order: state directory, health server, recovery of unfinished torrents (so the first
InitTorrent after a restart sees real progress), the wire listener, then readiness.

Graceful shutdown (SIGINT/SIGTERM): not ready; the listener and connections are cancelled
(piece writes already in a worker thread finish first — their buffers stay valid); background
work is cancelled (an interrupted finalize simply runs again when the source polls); every
torrent is flushed (fdatasync, then bitmap) and its files closed. Exit status 0. A crash
(``kill -9``) loses at most ``FLUSH_INTERVAL`` seconds of progress and never marks an unwritten
piece as written (see :mod:`.store`).
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import json
import logging
import signal
from pathlib import Path

import trio

from .. import __version__, metrics
from ..config import DestinationConfig, redacted
from ..http import status as status_model
from ..http.activity import ActivityLog, Throughput, counter_value, sample_forever
from ..http.server import Health, serve_http
from ..identity import IdentityError
from ..identity.daemon import setup as identity_setup
from ..integrations import systemd
from ..integrations.arr import ArrSet
from ..integrations.notify import Notifier
from ..qbittorrent.api import QB
from ..wire import (
    DEFAULT_MAX_PIECE,
    ByteBudget,
    OpenPeers,
    client_ssl_context,
    serve,
    server_ssl_context,
)
from . import statetree
from .dialer import Dialer
from .finalizer import Finalizer, FinalizerSettings
from .hardlinks import HardlinkRegistry
from .server import DestinationServer
from .store import Store
from .writer import Writer, close_all

log = logging.getLogger("qbsync.destination.runner")

FLUSH_INTERVAL = 10.0  # seconds of progress a crash may cost at most
ORPHAN_INTERVAL = 3600.0
SHUTDOWN_FLUSH_TIMEOUT = 60.0


# Allocations from this size up are always mmap()ed, so freeing them returns the memory to the
# kernel. glibc otherwise raises its mmap threshold after the first large free (up to 32 MiB),
# and a 26 MiB .torrent refused ``busy`` then stays in the heap: RSS that follows what the
# daemon holds is what makes ``--max-metadata`` a bound on memory. Piece buffers (pooled, at
# most 8 MiB for the usual piece sizes) keep the heap's fast path.
MMAP_THRESHOLD = 8 * 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_large_buffers_to_the_kernel() -> bool:
    """Pin glibc's mmap threshold at :data:`MMAP_THRESHOLD`; False where there is no glibc
    (musl, macOS: their allocators return large blocks on their own)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD)))


def run(config: DestinationConfig) -> int:
    """Run the destination until SIGINT/SIGTERM; the process exit status."""
    return_large_buffers_to_the_kernel()
    try:
        return trio.run(main, config)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


class Daemon:
    """The wired-up parts, separate from the process plumbing so tests can build one."""

    def __init__(self, config: DestinationConfig) -> None:
        self.config = config
        self.qb = (
            QB(
                config.qb_url,
                config.qb_username,
                config.qb_password,
                mode="destination",
                api_key=config.qb_api_key,
            )
            if config.qb_url
            else None
        )
        self.registry = HardlinkRegistry()
        self.store = Store(
            config.data,
            dry_run=config.dry_run,
            registry=self.registry,
            state_root=config.state_dir,
        )
        self.finalizer = Finalizer(
            self.store,
            self.qb,
            FinalizerSettings(
                qb_save_path=config.qb_save_path,
                poll_interval=config.poll_interval,
                poll_timeout=config.poll_timeout,
                recheck=config.recheck,
                synced_tag=config.synced_tag,
            ),
        )
        self.finalizer.arr = ArrSet.from_config(
            config.arr_url, config.arr_api_key, mode="destination"
        )
        self.writer = Writer(
            self.store.root,
            workers=config.stream_workers,
            on_file_complete=self.finalizer.file_complete,
        )
        self.store.on_file_complete = self.finalizer.file_complete
        self.notifier = Notifier(config.notify_url, "destination")
        self.finalizer.notifier = self.notifier
        self.server = DestinationServer(
            self.store,
            self.writer,
            self.finalizer,
            qb=self.qb,
            max_piece=DEFAULT_MAX_PIECE,
            max_metadata=config.max_metadata_bytes,
        )
        self.budget = ByteBudget(config.max_stream_buffer_bytes, hooks=metrics.WIRE_METRICS)
        self.health = Health()
        self.status_builder = status_model.StatusBuilder("destination")
        self.throughput = Throughput(counter_value("qbsync_bytes_received_total"))
        self.history = ActivityLog(
            None if config.dry_run else state_dir(config), throughput=self.throughput
        )
        self.finalizer.activity = self.server.activity = self.history
        self.open_peers = OpenPeers()
        self.health.set_status_provider(self.status)
        self.listener_ports: list[int] = []
        self.dialers: list[Dialer] = []
        # This destination's key and admission policy (raises IdentityError: main() reports it)
        self.identity = identity_setup(config)
        if self.qb is not None:
            self.health.add_ready_check("qbittorrent", self.qb.ping)
        if config.listen is not None:  # dialing only (--connect): there is no listener
            self.health.add_ready_check("listener", self._listener_up)

    async def _listener_up(self) -> None:
        if not self.listener_ports:
            raise RuntimeError("wire listener not bound")

    def status(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.server.status())
        out["buffer_bytes"] = self.budget.used
        out["buffer_limit_bytes"] = self.budget.limit
        out["listen_ports"] = self.listener_ports
        legacy_torrents = out.pop("torrents", [])
        peers = status_model.destination_peers(self.open_peers)
        doc = self.status_builder.document(
            status_model.destination_daemon(self.budget, self.listener_ports, peers),
            status_model.destination_torrents(self.store),
            legacy=out,
            sections=status_model.Sections(
                activity=self.history,
                throughput=self.throughput,
                peers=peers,
                free_bytes=status_model.free_bytes(self.config.data),
            ),
        )
        status_model.merge_legacy_torrents(doc, legacy_torrents)  # type: ignore[arg-type]
        return doc

    async def flusher(self) -> None:
        """Persist progress every FLUSH_INTERVAL; a failed flush is retried on the next tick."""
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            await self.store.flush_all()
            metrics.active_torrents.labels("destination").set(len(self.store.torrents))
            self.health.heartbeat("flusher", stale_after=max(120.0, 6 * FLUSH_INTERVAL))

    async def reaper(self) -> None:
        while True:
            await trio.sleep(ORPHAN_INTERVAL)
            reclaimed = await self.server.reap_orphans()
            if reclaimed:
                log.info("event=orphans_reclaimed count=%d", reclaimed)

    async def serve_wire(
        self, cancel: trio.CancelScope, *, task_status: trio.TaskStatus[list[int]]
    ) -> None:
        config = self.config
        identity, admission = self.identity
        ssl_context = (
            server_ssl_context(config.tls_cert, config.tls_key)
            if config.tls_cert is not None and config.tls_key is not None
            else None
        )
        with cancel:
            async with trio.open_nursery() as nursery:
                ports: list[int] = []
                if config.listen is not None:
                    ports = await nursery.start(
                        functools.partial(
                            serve,
                            config.listen,
                            self.server,
                            token=config.auth_token or None,
                            identity=identity.key,
                            admission=admission,
                            ssl_context=ssl_context,
                            budget=self.budget,
                            hooks=metrics.WIRE_METRICS,
                            max_piece=DEFAULT_MAX_PIECE,
                            on_peer=self.server.sources.on_peer,
                            peers=self.open_peers,
                        )
                    )
                # Reverse dialing (--connect): the same handler, over connections we dial;
                # the dialing side verifies the listener's certificate with --tls-ca.
                client_context = (
                    client_ssl_context(config.tls_ca) if config.tls_ca is not None else None
                )
                for addr in config.connect_addrs:
                    dialer = Dialer(
                        addr,
                        self.server,
                        token=config.auth_token or None,
                        identity=identity.key,
                        admission=admission,
                        ssl_context=client_context,
                        budget=self.budget,
                        reconnect_max_delay=config.reconnect_max_delay,
                        on_peer=self.server.sources.on_peer,
                        peers=self.open_peers,
                        max_piece=DEFAULT_MAX_PIECE,
                    )
                    self.dialers.append(dialer)
                    await nursery.start(dialer.run)
                task_status.started(ports)

    async def shutdown(self) -> None:
        """Cancel background work, flush every torrent and close its files (shielded)."""
        with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_FLUSH_TIMEOUT):
            for state in list(self.store.torrents.values()):
                await state.cancel_tasks()
            await self.store.flush_all()
            for state in list(self.store.torrents.values()):
                await close_all(state)
            log.info("event=state_flushed torrents=%d", len(self.store.torrents))
            await self.history.save()  # the chart's last hour survives the restart


def state_dir(config: DestinationConfig) -> Path:
    """Where the destination keeps its own state (per-torrent records, the activity log):
    ``--state-dir``, by default ``<data>/.qbsync`` (``config.destination_state_dir``)."""
    return Path(config.state_dir)


UNAUTHENTICATED_WARNING_INTERVAL = 3600.0


def is_loopback(host: str) -> bool:
    """Only this machine can connect (an empty host means every interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warn_unauthenticated(config: DestinationConfig) -> None:
    if config.auth_token or config.peer_fingerprint:  # no first-use window to warn about
        return
    if config.listen is None:
        return  # dialing only: the sources it dials require a token or a fingerprint
    exposed = not is_loopback(config.listen.host)
    log.warning(
        "event=auth_disabled reason=no_token listen=%s exposed=%s hint=%s",
        config.listen,
        str(exposed).lower(),
        '"the first source to connect is paired (trust on first use) and every other key '
        "is refused from then on; pin the source with --peer-fingerprint, or set "
        '--auth-token or --auth-token-file (generate one with: openssl rand -hex 32)"',
    )


async def _warn_unauthenticated_hourly(config: DestinationConfig) -> None:
    """Repeat the warning every hour: a start-up line scrolls away; an open listener does
    not."""
    while True:
        await trio.sleep(UNAUTHENTICATED_WARNING_INTERVAL)
        _warn_unauthenticated(config)


async def main(config: DestinationConfig) -> int:
    metrics.build_info.labels(__version__, "destination").set(1)
    log.info(
        "event=destination_starting version=%s config=%s",
        __version__,
        json.dumps(redacted(config), sort_keys=True, separators=(",", ":")),
    )
    _warn_unauthenticated(config)
    if config.dry_run:
        log.warning("event=dry_run note=%s", '"nothing is written and qBittorrent is not changed"')
    try:
        if not config.dry_run:  # a dry run does not even create --data
            await trio.to_thread.run_sync(
                functools.partial(Path(config.data).mkdir, parents=True, exist_ok=True)
            )
    except OSError as exc:
        log.error("event=startup_failed error=%s", json.dumps(f"cannot create --data: {exc}"))
        return 1
    try:
        adopted = await trio.to_thread.run_sync(
            functools.partial(statetree.check_or_prepare, config.state_dir, dry_run=config.dry_run)
        )
    except statetree.StateTreeError as exc:
        # One line, exit 2: the operator must fix the directory (or point --state-dir away).
        log.error("event=state_dir_refused error=%s", json.dumps(exc.strerror))
        return 2
    except OSError as exc:
        log.error("event=startup_failed error=%s", json.dumps(f"state directory: {exc}"))
        return 1
    if adopted:
        log.info("event=state_tree_adopted dirs=%d", adopted)
    try:
        daemon = Daemon(config)
    except IdentityError as exc:
        log.error("event=startup_failed code=identity error=%s", json.dumps(str(exc)))
        return 2
    daemon.history.load()
    code = 0
    try:
        async with trio.open_nursery() as nursery:
            daemon.store.attach(nursery)
            if config.health_addr is not None:
                await nursery.start(serve_http, config.health_addr, daemon.health)
            recovered = await daemon.store.recover()
            wire_scope = trio.CancelScope()
            daemon.listener_ports = await nursery.start(daemon.serve_wire, wire_scope)
            nursery.start_soon(daemon.flusher)
            nursery.start_soon(sample_forever, daemon.throughput)
            await nursery.start(daemon.notifier.run)
            nursery.start_soon(daemon.reaper)
            if (
                not (config.auth_token or config.peer_fingerprint)
                and config.listen is not None
                and not is_loopback(config.listen.host)
            ):
                nursery.start_soon(_warn_unauthenticated_hourly, config)
            daemon.health.mark_ready()
            systemd.notify("READY=1\nSTATUS=listening")
            interval = systemd.watchdog_interval()
            if interval is not None:

                async def live() -> bool:
                    return (await daemon.health.check_live()).ok

                nursery.start_soon(systemd.watchdog, live, interval)
            log.info(
                "event=destination_ready listen=%s ports=%s recovered=%d qbittorrent=%s dry_run=%s"
                " connect=%s",
                config.listen if config.listen is not None else "none",
                ",".join(map(str, daemon.listener_ports)),
                recovered,
                "configured" if daemon.qb is not None else "none",
                str(config.dry_run).lower(),
                config.connect or "none",
            )
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("event=shutdown_requested signal=%s", signal.Signals(signum).name)
                    systemd.notify("STOPPING=1\nSTATUS=stopping")
                    break
            daemon.health.mark_not_ready()
            wire_scope.cancel()
            nursery.cancel_scope.cancel()
    except* OSError as group:
        # Binding the listener or the health port, or creating state, failed at startup.
        log.error("event=startup_failed error=%s", json.dumps(str(group.exceptions[0])))
        code = 1
    finally:
        await daemon.shutdown()
    log.info("event=destination_stopped code=%d", code)
    return code
