"""The drain gate: may this pod hand its torrents over on SIGTERM?

``--drain-annotation`` names a pod annotation (default ``qbsync/drain``). On SIGTERM the source
reads its own pod (``POD_NAME``, ``POD_NAMESPACE``) and drains only if the annotation's value is
exactly ``"true"``. Everything else -- no Kubernetes configuration, a missing ``POD_NAME``, an
API error (403 without RBAC ``get pods``), an unreachable API server, a missing annotation, any
other value -- skips the drain (fail-closed: a node maintenance that forgot the annotation must
never delete data from the source). An empty ``--drain-annotation`` drains unconditionally.

Where the credentials come from (:func:`kube_source`, logged at startup):

* **in-cluster**: ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` are set and the
  service-account token exists (``/var/run/secrets/kubernetes.io/serviceaccount``, or the
  directory in ``QBSYNC_K8S_SERVICE_ACCOUNT_DIR``; the tests point it at a temp dir);
* **kubeconfig**: otherwise ``KUBECONFIG`` or ``~/.kube/config``, so the gate can be tried
  from a workstation against a real cluster (``POD_NAME`` names the pod to read);
* **none**: neither; the drain is skipped with that reason.

The Kubernetes client is synchronous; the lookup runs in a worker thread, abandoned if the
caller's deadline (the whole drain's ``--drain-timeout``) expires, and its HTTP request carries
the same timeout so an abandoned thread does not linger.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_ACCOUNT_ENV = "QBSYNC_K8S_SERVICE_ACCOUNT_DIR"


@attrs.frozen
class DrainDecision:
    drain: bool
    reason: str


@attrs.frozen
class KubeSource:
    """Where the Kubernetes credentials come from."""

    kind: Literal["in-cluster", "kubeconfig", "none"]
    path: str  # service-account directory, kubeconfig path(s), or why there is none

    def describe(self) -> str:
        return f"{self.kind}:{self.path}" if self.kind != "none" else f"none ({self.path})"


def kube_source(env: Mapping[str, str] | None = None) -> KubeSource:
    """Pick in-cluster configuration, else a kubeconfig, else none. Reads no network."""
    env = os.environ if env is None else env
    sa = Path(env.get(SERVICE_ACCOUNT_ENV) or SERVICE_ACCOUNT_DIR)
    if (
        env.get("KUBERNETES_SERVICE_HOST")
        and env.get("KUBERNETES_SERVICE_PORT")
        and (sa / "token").is_file()
    ):
        return KubeSource("in-cluster", str(sa))
    kubeconfig = env.get("KUBECONFIG", "")
    if kubeconfig:
        return KubeSource("kubeconfig", kubeconfig)
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    default = home / ".kube" / "config"
    if default.is_file():
        return KubeSource("kubeconfig", str(default))
    return KubeSource("none", "not in a cluster, no KUBECONFIG and no ~/.kube/config")


def _namespace(source: KubeSource, env: Mapping[str, str]) -> str:
    if env.get("POD_NAMESPACE"):
        return env["POD_NAMESPACE"]
    if source.kind == "in-cluster":
        try:
            return (Path(source.path) / "namespace").read_text().strip() or "default"
        except OSError:
            return "default"
    return ""  # the kubeconfig context's namespace, resolved in _read_annotation


def _read_annotation(
    source: KubeSource,
    env: Mapping[str, str],
    namespace: str,
    name: str,
    key: str,
    timeout: float,
) -> str | None:
    from kubernetes import client, config  # imported lazily: heavy, and only needed here
    from kubernetes.config import incluster_config

    configuration = client.Configuration()
    if source.kind == "in-cluster":
        sa = Path(source.path)
        incluster_config.InClusterConfigLoader(  # type: ignore[no-untyped-call]
            token_filename=str(sa / "token"),
            cert_filename=str(sa / "ca.crt"),
            environ=env,
        ).load_and_set(configuration)
    else:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=source.path, client_configuration=configuration
        )
        if not namespace:
            _, current = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
                config_file=source.path
            )
            namespace = str((current or {}).get("context", {}).get("namespace") or "default")
    configuration.retries = 0  # one attempt: the drain has its own deadline
    with client.ApiClient(configuration) as api:
        pod: Any = client.CoreV1Api(api).read_namespaced_pod(
            name=name, namespace=namespace, _request_timeout=timeout
        )
    meta = pod.metadata
    annotations = (meta.annotations if meta is not None else None) or {}
    value = annotations.get(key)
    return None if value is None else str(value)


def _failure(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status:
        reason = getattr(exc, "reason", "") or ""
        hint = " (RBAC: the service account needs get on pods)" if status == 403 else ""
        return f"pod lookup failed: HTTP {status} {reason}{hint}"
    text = str(exc)
    for marker in ("Connection refused", "timed out", "Name or service not known"):
        if marker in text:
            return f"pod lookup failed: API server unreachable ({marker})"
    return f"pod lookup failed: {type(exc).__name__}: {text}"[:300]


async def drain_decision(
    annotation: str, env: Mapping[str, str] | None = None, *, request_timeout: float = 30.0
) -> DrainDecision:
    """Decide whether to drain. Never raises (except on cancellation).

    ``request_timeout`` bounds the HTTP request itself (so a thread abandoned by the caller's
    deadline ends too); the caller's cancel scope is the deadline."""
    if not annotation:
        return DrainDecision(True, "no --drain-annotation: drain unconditionally")
    env = os.environ if env is None else env
    source = kube_source(env)
    if source.kind == "none":
        return DrainDecision(False, f"no Kubernetes configuration: {source.path}")
    name = env.get("POD_NAME", "")
    if not name:
        return DrainDecision(False, f"POD_NAME not set ({source.describe()})")
    namespace = _namespace(source, env)
    try:
        value = await trio.to_thread.run_sync(
            _read_annotation,
            source,
            env,
            namespace,
            name,
            annotation,
            request_timeout,
            abandon_on_cancel=True,
        )
    except Exception as exc:  # any failure closes the gate
        return DrainDecision(False, _failure(exc))
    if value is None:
        return DrainDecision(False, f"annotation {annotation} not set on pod {name}")
    if value != "true":
        return DrainDecision(False, f"annotation {annotation}={value!r}, not 'true'")
    return DrainDecision(True, f"annotation {annotation}=true on pod {name}")
