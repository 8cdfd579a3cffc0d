"""The SIGTERM drain gate through the real ``kubernetes`` client and a real ``qbsync source``.

A loopback HTTPS server (self-signed certificate) plays the Kubernetes API: it serves the pod
object at ``/api/v1/namespaces/<ns>/pods/<name>`` to a bearer token, as the API server does.
The source finds it through in-cluster configuration (``KUBERNETES_SERVICE_HOST``/``PORT`` and
a service-account token + CA in a temp dir) or through a kubeconfig file. Both qBittorrents are
real qbittorrent-nox processes (see source_rig.py).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.httpfake import http_server, send_json
from tests.integration.conftest import SeededFactory
from tests.integration.source_rig import (
    Rig,
    tags_of,
)
from tests.qbharness import free_port, make_self_signed, wait_until

pytestmark = pytest.mark.integration

POD, NAMESPACE, ANNOTATION = "qbsync-source-0", "media", "qbsync/drain"


@attrs.define
class FakeApiServer:
    """Answers the pod GET as the Kubernetes API does; ``mode`` picks the answer."""

    mode: str  # "true", "false", "missing", "403", "hang"
    token: str
    port: int = 0
    ca: Path = Path()
    requests: list[tuple[str, str]] = attrs.field(factory=list)  # (path, authorization)
    release: threading.Event = attrs.field(factory=threading.Event)

    def pod(self) -> dict[str, Any]:
        annotations = {"other": "x"}
        if self.mode in ("true", "false"):
            annotations[ANNOTATION] = self.mode
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": POD, "namespace": NAMESPACE, "annotations": annotations},
            "spec": {"containers": [{"name": "qbsync", "image": "qbsync"}]},
            "status": {"phase": "Running"},
        }

    def answer(self, path: str, authorization: str) -> tuple[int, dict[str, Any]]:
        self.requests.append((path, authorization))
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token != self.token:  # the scheme is case-insensitive
            return 401, _status(401, "Unauthorized", "Unauthorized")
        if path != f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}":
            return 404, _status(404, "NotFound", f"pods {path!r} not found")
        if self.mode == "403":
            return 403, _status(
                403,
                "Forbidden",
                f'pods "{POD}" is forbidden: User "system:serviceaccount:{NAMESPACE}:qbsync" '
                f'cannot get resource "pods" in API group "" in the namespace "{NAMESPACE}"',
            )
        if self.mode == "hang":
            self.release.wait(120)  # until the test ends
        return 200, self.pod()


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


ApiServerFactory = Callable[[str], FakeApiServer]


@pytest.fixture(name="api_server")
def api_server_fixture(tmp_path: Path) -> Iterator[ApiServerFactory]:
    """``api_server(mode)`` starts a fake API server; all are stopped at teardown."""
    stack = contextlib.ExitStack()

    def serve(mode: str) -> FakeApiServer:
        cert, key = make_self_signed(tmp_path / "apiserver", "apiserver")
        api = FakeApiServer(mode, secrets.token_hex(16), ca=cert)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                send_json(self, *api.answer(self.path.split("?")[0], self.headers["Authorization"]))

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        api.port = stack.enter_context(http_server(Handler, tls=ctx))
        stack.callback(api.release.set)  # runs first: a held request ends before the shutdown
        return api

    with stack:
        yield serve


def in_cluster_env(tmp: Path, api: FakeApiServer, port: int | None = None) -> dict[str, str]:
    """What Kubernetes gives a pod: service env vars and a mounted service-account dir."""
    sa = tmp / "serviceaccount"
    sa.mkdir(exist_ok=True)
    (sa / "token").write_text(api.token)
    (sa / "ca.crt").write_bytes(api.ca.read_bytes())
    (sa / "namespace").write_text(NAMESPACE)
    return {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(port if port is not None else api.port),
        "QBSYNC_K8S_SERVICE_ACCOUNT_DIR": str(sa),
        "POD_NAME": POD,
        "KUBECONFIG": "",
        "HOME": str(tmp),
    }


def kubeconfig_env(tmp: Path, api: FakeApiServer) -> dict[str, str]:
    """A workstation: a kubeconfig file (context namespace set), no service account."""
    path = tmp / "kubeconfig.yaml"
    path.write_text(
        json.dumps(  # JSON is YAML
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "loop",
                        "cluster": {
                            "server": f"https://127.0.0.1:{api.port}",
                            "certificate-authority": str(api.ca),
                        },
                    }
                ],
                "users": [{"name": "me", "user": {"token": api.token}}],
                "contexts": [
                    {
                        "name": "loop",
                        "context": {"cluster": "loop", "user": "me", "namespace": NAMESPACE},
                    }
                ],
                "current-context": "loop",
            }
        )
    )
    return {"KUBECONFIG": str(path), "POD_NAME": POD, "HOME": str(tmp)}


def _drain_after_sync(rig: Rig, env: dict[str, str], *extra: str) -> tuple[str, int]:
    source, _ = rig.start_source("--min-space", "0", *extra, env=env)
    rig.add_to_source(download_limit=None)
    wait_until(lambda: "synced" in tags_of(rig.src_qb, rig.info_hash), 90, 0.2, "synced")
    source.signal(signal.SIGTERM)
    code = source.wait(60)
    return source.log_text(), code


def test_annotation_true_in_cluster_hands_off_every_synced_torrent(
    rig: Rig, api_server: ApiServerFactory, tmp_path: Path, seeded_torrent: SeededFactory
) -> None:
    api = api_server("true")
    second = seeded_torrent(
        {"x.bin": 300_000}, piece_size=64 * 1024, name="second", seeder=rig.seeded.seeder
    )
    source, _ = rig.start_source("--min-space", "0", env=in_cluster_env(tmp_path, api))
    rig.add_to_source(download_limit=None)
    second.add_to(rig.src_qb)
    both = (rig.info_hash, second.info_hash)
    wait_until(lambda: all("synced" in tags_of(rig.src_qb, h) for h in both), 90, 0.2, "synced")
    source.signal(signal.SIGTERM)
    assert source.wait(60) == 0
    log = source.log_text()
    assert f"kube_config=in-cluster:{tmp_path / 'serviceaccount'}" in log
    assert f'event=drain_start reason="annotation {ANNOTATION}=true on pod {POD}"' in log
    assert "event=drain_done handed_off=2" in log
    ((path, authorization),) = api.requests
    assert path == f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}"
    assert authorization.lower() == f"bearer {api.token}"  # the service-account token
    for h in (rig.info_hash, second.info_hash):
        assert rig.src_qb.info(h) is None  # removed from the source
        assert "source-removed" in tags_of(rig.dst_qb, h)
    rig.assert_identical()
    assert (rig.dst_data / "second" / "x.bin").read_bytes() == second.expected_bytes("x.bin")


def test_annotation_true_through_kubeconfig_outside_a_cluster(
    rig: Rig, api_server: ApiServerFactory, tmp_path: Path
) -> None:
    api = api_server("true")
    log, code = _drain_after_sync(rig, kubeconfig_env(tmp_path, api))
    assert code == 0
    assert f"kube_config=kubeconfig:{tmp_path / 'kubeconfig.yaml'}" in log
    assert "event=drain_done handed_off=1" in log
    assert [p for p, _ in api.requests] == [f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}"]
    assert rig.src_qb.info(rig.info_hash) is None


def test_annotation_false_skips_and_keeps_seeding(
    rig: Rig, api_server: ApiServerFactory, tmp_path: Path
) -> None:
    api = api_server("false")
    log, code = _drain_after_sync(rig, in_cluster_env(tmp_path, api))
    assert code == 0
    assert f"event=drain_skipped reason=\"annotation {ANNOTATION}='false', not 'true'\"" in log
    assert "event=drain_start" not in log
    assert rig.src_qb.info(rig.info_hash) is not None  # still seeding on the source
    assert "source-removed" not in tags_of(rig.dst_qb, rig.info_hash)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("missing", f"annotation {ANNOTATION} not set on pod {POD}"),
        ("403", "pod lookup failed: HTTP 403 Forbidden (RBAC: the service account needs get"),
        ("down", "pod lookup failed: API server unreachable (Connection refused)"),
    ],
)
def test_gate_closed_skips_with_reason(
    rig: Rig, api_server: ApiServerFactory, tmp_path: Path, mode: str, reason: str
) -> None:
    api = api_server("missing" if mode == "down" else mode)
    env = in_cluster_env(tmp_path, api, port=free_port() if mode == "down" else None)
    source, _ = rig.start_source("--min-space", "0", env=env)
    source.signal(signal.SIGTERM)
    assert source.wait(60) == 0
    log = source.log_text()
    assert f'event=drain_skipped reason="{reason}' in log, log[-3000:]
    assert "event=drain_start" not in log
    assert len(api.requests) == (0 if mode == "down" else 1)


def test_hanging_api_server_is_cut_by_drain_timeout(
    rig: Rig, api_server: ApiServerFactory, tmp_path: Path
) -> None:
    api = api_server("hang")
    env = in_cluster_env(tmp_path, api)
    # The budget covers importing the kubernetes client too (seconds on a loaded machine): it
    # is generous so that the lookup surely starts, then hangs until the deadline cuts it.
    source, _ = rig.start_source("--min-space", "0", "--drain-timeout", "15", env=env)
    source.signal(signal.SIGTERM)
    assert source.wait(60) == 0
    log = source.log_text()
    assert "event=drain_timeout timeout_s=15" in log
    assert "event=drain_start" not in log and "event=drain_skipped" not in log
    assert len(api.requests) == 1  # the lookup reached the server and hung there
