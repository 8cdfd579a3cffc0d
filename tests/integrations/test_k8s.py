"""Which Kubernetes credentials the drain gate uses (no network; the end-to-end lookups are in
tests/integration/test_k8s_drain.py)."""

from __future__ import annotations

from pathlib import Path

from qbsync.integrations.k8s import kube_source


def test_in_cluster_needs_service_env_and_token(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    env = {
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        "QBSYNC_K8S_SERVICE_ACCOUNT_DIR": str(sa),
        "HOME": str(tmp_path),
    }
    assert kube_source(env).kind == "none"  # no token file yet
    (sa / "token").write_text("t")
    assert kube_source(env).describe() == f"in-cluster:{sa}"
    # In a cluster the service account wins over a kubeconfig.
    assert kube_source({**env, "KUBECONFIG": "/x"}).kind == "in-cluster"


def test_kubeconfig_outside_a_cluster(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path)}
    none = kube_source(home)
    assert none.kind == "none" and "KUBECONFIG" in none.describe()
    assert kube_source({**home, "KUBECONFIG": "/a:/b"}).describe() == "kubeconfig:/a:/b"
    default = tmp_path / ".kube" / "config"
    default.parent.mkdir()
    default.write_text("{}")
    assert kube_source(home).describe() == f"kubeconfig:{default}"
