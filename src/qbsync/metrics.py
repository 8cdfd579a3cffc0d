"""Every Prometheus metric of both daemons, in one registry.

All series use the ``qbsync_`` namespace. Label sets are bounded: no metric is labelled by
torrent hash or name (a seedbox with 2,000 torrents must not create 2,000 series per metric);
per-torrent detail is on the ``/status`` page instead. ``METRICS.md`` documents each metric
and a test keeps it in step with this module.

Metrics are module-level objects so any module can ``from qbsync import metrics`` and
increment them; there is one process per role, so there is no cross-role collision in practice
(both roles' metrics are registered, the other role's simply stay at zero).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .wire.errors import ErrorCode
from .wire.hooks import Side, WireHooks

REGISTRY = CollectorRegistry(auto_describe=True)
NS = "qbsync"

FAST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
SEND_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
RTT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
API_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
FINALIZE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FLUSH_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def _c(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(name, doc, labels, namespace=NS, registry=REGISTRY)


def _g(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    return Gauge(name, doc, labels, namespace=NS, registry=REGISTRY)


def _h(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Histogram:
    return Histogram(name, doc, labels, namespace=NS, registry=REGISTRY, buckets=buckets)


# --- both roles -----------------------------------------------------------------------------

build_info = _g("build_info", "Always 1; labels carry the version and role", ("version", "role"))
qb_api_calls = _c("qb_api_calls_total", "qBittorrent API calls", ("mode", "operation", "result"))
qb_api_call_duration = _h(
    "qb_api_call_duration_seconds",
    "qBittorrent API call duration, retries included",
    API_BUCKETS,
    ("mode", "operation"),
)
qb_client_retries = _c("qb_client_retries_total", "qBittorrent API retries", ("mode",))
qb_circuit_open = _g(
    "qb_circuit_breaker_open", "1 while the qBittorrent circuit breaker is open", ("mode",)
)
qb_webapi_info = _g(
    "qb_webapi_info",
    "Always 1; labels carry the Web API version each qBittorrent session detected",
    ("mode", "version"),
)
arr_requests = _c(
    "arr_requests_total",
    "Sonarr/Radarr API requests by operation and result",
    ("mode", "operation", "result"),
)
arr_torrents_skipped = _c(
    "arr_torrents_skipped_total",
    "Source torrents not synced because Sonarr/Radarr marked their download failed or ignored",
)
arr_imports = _c(
    "arr_imports_total", "Sonarr/Radarr import requests after a finalize, by result", ("result",)
)
active_torrents = _g("active_torrents", "Torrents being synced", ("mode",))
sync_outcomes = _c("sync_outcomes_total", "Terminal sync outcomes", ("mode", "result", "selection"))
bytes_synced = _c(
    "bytes_synced_total", "Selected bytes of successfully synced torrents", ("mode", "selection")
)
finalization_errors = _c("finalization_errors_total", "Failed finalize attempts", ("mode",))
tag_application_errors = _c(
    "tag_application_errors_total", "Failed tag writes in qBittorrent", ("mode",)
)
notifications = _c(
    "notifications_total", "--notify-url events: sent, failed or dropped", ("event", "result")
)

# --- wire (both roles) ----------------------------------------------------------------------

wire_connections = _g("wire_connections", "Open authenticated wire connections", ("role",))
wire_handshake_failures = _c(
    "wire_handshake_failures_total", "Handshakes that failed, by error code", ("code",)
)
wire_protocol_errors = _c(
    "wire_protocol_errors_total", "Connections closed for a protocol violation", ("code",)
)

# --- source ---------------------------------------------------------------------------------

pieces_sent = _c("pieces_sent_total", "Pieces sent to the destination")
rate_limit = _g("rate_limit_bytes_per_second", "--rate-limit in force now (0 = unlimited)")
bytes_sent = _c("bytes_sent_total", "Piece payload bytes sent to the destination")
pieces_acked = _c("pieces_acked_total", "Pieces acknowledged as written")
pieces_failed = _c("pieces_failed_total", "Piece acks with an error, by code", ("code",))
piece_hash_mismatch = _c("piece_hash_mismatch_total", "hash-mismatch acks received")
stale_pieces = _c("stale_pieces_total", "In-flight pieces that hit --piece-timeout")
pieces_resent = _c("pieces_resent_total", "Pieces sent more than once")
finalize_not_found = _c("finalize_not_found_total", "Torrents untracked after a not-found finalize")
torrent_stop_errors = _c("torrent_stop_errors_total", "Handoff stop failures", ("mode",))
torrent_resume_errors = _c(
    "torrent_resume_errors_total", "Handoff rollback resume failures", ("mode",)
)
cleanup_groups = _c("cleanup_groups_total", "Cleanup groups processed", ("result",))
cleanup_torrents_handed_off = _c(
    "cleanup_torrents_handed_off_total", "Torrents handed off to the destination"
)
handoff_refused = _c(
    "handoff_refused_total",
    "Hand-offs the destination did not confirm (the source keeps seeding), by reason",
    ("reason",),
)
handoff_tag_results = _c(
    "handoff_tag_total",
    "Hand-offs asked for with --handoff-tag, by result (handed_off, refused)",
    ("result",),
)
handoff_tag_pending = _g(
    "handoff_tag_pending", "Torrents carrying --handoff-tag that are not handed off yet"
)
exclude_sync_abort = _c(
    "exclude_sync_abort_total", "In-progress syncs aborted by the exclude-sync tag"
)
file_selection_resyncs = _c(
    "file_selection_resyncs_total", "Resyncs triggered by a file-selection change"
)
stream_reconnects = _c("stream_reconnects_total", "Reconnects to the destination")
connection_scale_events = _c(
    "connection_scale_events_total",
    "Connections added or removed, and why",
    ("direction", "reason"),
)
file_handle_cache = _c("file_handle_cache_total", "File-handle cache lookups", ("result",))
file_handle_evictions = _c("file_handle_evictions_total", "File handles closed by the cache")
completed_on_dest_cache_size = _g(
    "completed_on_dest_cache_size", "Torrents known to be finalized on the destination"
)
active_finalization_backoffs = _g(
    "active_finalization_backoffs", "Torrents waiting out a finalize backoff"
)
piece_queue_depth = _g("piece_queue_depth", "Pieces queued to send")
inflight_pieces = _g("inflight_pieces", "Pieces sent and not yet acknowledged")
connections_configured = _g("connections_configured", "--max-connections")
connections_active = _g("connections_active", "Open connections to the destination")
sender_workers_configured = _g("sender_workers_configured", "--num-senders")
transfer_throughput = _g(
    "transfer_throughput_bytes_per_second", "Payload throughput over the last measurement"
)
draining = _g("draining", "1 while a shutdown drain runs")
piece_read_duration = _h("piece_read_duration_seconds", "Piece reads from disk", FAST_BUCKETS)
piece_send_duration = _h("piece_send_duration_seconds", "Piece sends", SEND_BUCKETS)
piece_rtt = _h("piece_rtt_seconds", "From send to ack", RTT_BUCKETS)
piece_lag = _h(
    "piece_lag_seconds",
    "From qBittorrent marking a piece complete (as first seen) to its ack",
    (*RTT_BUCKETS, 10, 30, 60),
)
torrent_sync_latency = _h(
    "torrent_sync_latency_seconds",
    "From download completion to a successful finalize",
    LATENCY_BUCKETS,
)

# --- destination ----------------------------------------------------------------------------

pieces_received = _c("pieces_received_total", "Pieces received")
bytes_received = _c("bytes_received_total", "Piece payload bytes received")
piece_write_errors = _c("piece_write_errors_total", "Pieces that failed to write", ("mode",))
piece_hash_failures = _c("piece_hash_failures_total", "Received pieces whose SHA-1 did not match")
state_save_errors = _c("state_save_errors_total", "Failed state (bitmap/meta) writes", ("mode",))
file_sync_errors = _c("file_sync_errors_total", "Failed fsyncs of data files", ("mode",))
verification_errors = _c("verification_errors_total", "Failed verifications", ("mode",))
hardlinks_created = _c("hardlinks_created_total", "Files hardlinked instead of streamed")
hardlink_errors = _c("hardlink_errors_total", "Failed hardlink attempts", ("mode",))
stale_bitmap_pieces_cleared = _c(
    "stale_bitmap_pieces_cleared_total", "Written bits cleared at recovery because data was gone"
)
files_early_finalized = _c("files_early_finalized_total", "Files renamed from .partial early")
early_finalize_verify_failures = _c(
    "early_finalize_verify_failures_total", "Early finalizes whose read-back verify failed"
)
verification_recoveries = _c(
    "verification_recoveries_total", "Finalizes that found corrupt pieces and re-requested them"
)
orphan_cleanups = _c("orphan_cleanups_total", "Orphaned torrent states reclaimed")
rejected_requests = _c("rejected_requests_total", "Requests refused by validation", ("code",))
stale_inode_evictions = _c(
    "stale_inode_evictions_total", "Hardlink sources dropped because the file changed or vanished"
)
boundary_pieces_unverified = _c(
    "boundary_pieces_unverified_total",
    "Pieces touching a deselected file written without a SHA-1 match (bytes unknown here)",
)
pieces_found_on_disk = _c(
    "pieces_found_on_disk_total", "Pieces proven from data already on disk instead of streamed"
)
write_buffer_bytes = _g("write_buffer_bytes", "Piece bytes held in memory awaiting write")
write_buffer_limit_bytes = _g("write_buffer_limit_bytes", "--max-stream-buffer in bytes")
write_workers_busy = _g("write_workers_busy", "Writer workers currently hashing or writing")
metadata_bytes = _g(
    "metadata_bytes", "Metadata bytes held by tracked torrents (charged to --max-metadata)"
)
metadata_limit_bytes = _g("metadata_limit_bytes", "--max-metadata in bytes")
torrents_with_dirty_state = _g(
    "torrents_with_dirty_state", "Torrents with written pieces not yet persisted"
)
piece_write_duration = _h(
    "piece_write_duration_seconds", "SHA-1 check plus write of one piece", FAST_BUCKETS
)
finalization_duration = _h(
    "finalization_duration_seconds",
    "Finalize from request to result",
    FINALIZE_BUCKETS,
    ("result",),
)
state_flush_duration = _h("state_flush_duration_seconds", "fsync + bitmap persist", FLUSH_BUCKETS)


# Several sources, one destination (qbsync.destination.sources): the ``source`` label is the
# source's --source-name, at most 16 distinct values, the rest under "other".
source_connections = _g(
    "source_connections", "Authenticated connections open, per source", ("source",)
)
source_torrents = _g("source_torrents", "Torrents being synced, per source", ("source",))
source_pieces_inflight = _g(
    "source_pieces_inflight", "Pieces received and being written, per source", ("source",)
)
owned_by_other_source = _c(
    "owned_by_other_source_total",
    "Requests answered owned-by-other-source (another source syncs that torrent), per source",
    ("source",),
)


def render(names: Sequence[str] = ()) -> tuple[bytes, str]:
    """The exposition text and its content type, for the ``/metrics`` endpoint; only the
    series named in ``names`` (``/metrics?name[]=...``, the Prometheus clients' convention)
    when given: a benchmark polling one counter every 20 ms should not cost the daemon a full
    exposition each time."""
    if names:
        return generate_latest(REGISTRY.restricted_registry(names)), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def metric_names() -> list[str]:
    """Every metric family name in the registry (for the METRICS.md consistency test)."""
    return sorted({m.name for m in REGISTRY.collect()})


class WireMetrics(WireHooks):
    """The wire's instrumentation hooks recorded as the metrics above. The daemons pass
    :data:`WIRE_METRICS` to the wire; it is the only writer of these series."""

    def connection_opened(self, side: Side) -> None:
        wire_connections.labels(side).inc()

    def connection_closed(self, side: Side) -> None:
        wire_connections.labels(side).dec()

    def handshake_failed(self, code: ErrorCode) -> None:
        wire_handshake_failures.labels(code.value).inc()

    def protocol_error(self, code: ErrorCode) -> None:
        wire_protocol_errors.labels(code.value).inc()

    def buffer_limit(self, limit: int) -> None:
        write_buffer_limit_bytes.set(limit)

    def buffer_used(self, used: int) -> None:
        write_buffer_bytes.set(used)


WIRE_METRICS = WireMetrics()
