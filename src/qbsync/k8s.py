"""The drain gate: may this pod hand its torrents over on SIGTERM?

``--drain-annotation`` names a pod annotation (default ``qbsync/drain``). On SIGTERM the source
reads its own pod (``POD_NAME``/``POD_NAMESPACE``, in-cluster service-account credentials)
and drains only if the annotation's value is exactly ``"true"``. Everything else -- not in a
cluster, missing variables, an API error, a missing annotation, any other value -- skips the
drain (fail-closed: a node maintenance that forgot the annotation must never delete data from
the source). An empty ``--drain-annotation`` drains unconditionally.

The Kubernetes client is synchronous; the lookup runs in a worker thread, abandoned if the
caller's deadline (the whole drain's ``--drain-timeout``) expires.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import attrs
import trio


@attrs.frozen
class DrainDecision:
    drain: bool
    reason: str


def _read_annotation(namespace: str, name: str, key: str) -> str | None:
    from kubernetes import client, config  # imported lazily: heavy, and only needed here

    config.load_incluster_config()  # type: ignore[no-untyped-call]
    with client.ApiClient() as api:
        pod = client.CoreV1Api(api).read_namespaced_pod(name=name, namespace=namespace)
    meta = pod.metadata
    annotations = (meta.annotations if meta is not None else None) or {}
    value = annotations.get(key)
    return None if value is None else str(value)


async def drain_decision(annotation: str, env: Mapping[str, str] | None = None) -> DrainDecision:
    """Decide whether to drain. Never raises (except on cancellation)."""
    if not annotation:
        return DrainDecision(True, "no --drain-annotation: drain unconditionally")
    env = os.environ if env is None else env
    name, namespace = env.get("POD_NAME", ""), env.get("POD_NAMESPACE", "")
    if not name or not namespace:
        return DrainDecision(False, "POD_NAME/POD_NAMESPACE not set (not in Kubernetes?)")
    try:
        value = await trio.to_thread.run_sync(
            _read_annotation, namespace, name, annotation, abandon_on_cancel=True
        )
    except Exception as exc:  # any failure closes the gate
        return DrainDecision(False, f"pod lookup failed: {type(exc).__name__}: {exc}"[:300])
    if value is None:
        return DrainDecision(False, f"annotation {annotation} not set")
    if value != "true":
        return DrainDecision(False, f"annotation {annotation}={value!r}, not 'true'")
    return DrainDecision(True, f"annotation {annotation}=true")
