"""Deployment files stay consistent with the code: every QBSYNC_* variable they set is a real
option, the drain grace period outlasts the drain, and the container/systemd basics hold.
(Docker, systemd and Kubernetes cannot run here; these are static checks.)"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from qbsync.config import ConfigError, Role, options_for, resolve

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def option_envs(role: Role) -> set[str]:
    return {opt.env(role) for opt in options_for(role)}


def all_deploy_text() -> dict[Path, str]:
    return {p: p.read_text() for p in DEPLOY.rglob("*") if p.is_file()}


def test_every_qbsync_variable_is_an_option() -> None:
    known = option_envs("source") | option_envs("destination")
    for path, text in all_deploy_text().items():
        for name in re.findall(r"\b(QBSYNC_(?:SOURCE|DESTINATION)_[A-Z_]+)\b", text):
            assert name in known, f"{path.relative_to(ROOT)}: unknown variable {name}"


def k8s(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]


def container(doc: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_source_manifest_drain_and_rbac() -> None:
    docs = {d["kind"]: d for d in k8s("source.yaml")}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "Deployment"}
    assert docs["Role"]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    pod = docs["Deployment"]["spec"]["template"]
    assert pod["metadata"]["annotations"]["qbsync/drain"] == "false"
    spec = pod["spec"]
    assert spec["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert spec["enableServiceLinks"] is False
    c = container(docs["Deployment"])
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    args = c["args"]
    assert args[0] == "source" and "--drain-annotation=qbsync/drain" in args
    drain = next(float(a.split("=", 1)[1]) for a in args if a.startswith("--drain-timeout="))
    assert spec["terminationGracePeriodSeconds"] == 600 > drain
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_manifests_resolve_to_valid_configs() -> None:
    cases: tuple[tuple[str, Role], ...] = (
        ("source.yaml", "source"),
        ("destination.yaml", "destination"),
    )
    for name, role in cases:
        deployment = next(d for d in k8s(name) if d["kind"] == "Deployment")
        c = container(deployment)
        env = {e["name"]: e.get("value", "a-generated-secret-0123456789") for e in c["env"]}
        args = c["args"]
        assert args[0] == role
        flags = {}
        for arg in args[1:]:
            key, _, value = arg.removeprefix("--").partition("=")
            flags[key.replace("-", "_")] = value
        resolve(role, flags, env)  # raises ConfigError if the manifest is wrong
    service = next(d for d in k8s("destination.yaml") if d["kind"] == "Service")
    assert 50051 in {p["port"] for p in service["spec"]["ports"]}


def test_compose_resolves_to_valid_configs() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services: tuple[tuple[str, Role], ...] = (
        ("qbsync-source", "source"),
        ("qbsync-destination", "destination"),
    )
    for service, role in services:
        svc = compose["services"][service]
        assert svc["command"] == role
        env = {
            k: ("a-generated-token-0123456789" if "${" in str(v) else str(v))
            for k, v in svc["environment"].items()
        }
        assert env[f"QBSYNC_{role.upper()}_AUTH_TOKEN"] == "a-generated-token-0123456789"
        resolve(role, {}, env)


def test_systemd_units() -> None:
    for role in ("source", "destination"):
        unit = (DEPLOY / f"qbsync-{role}.service").read_text()
        directives = dict(
            line.split("=", 1) for line in unit.splitlines() if re.match(r"^[A-Z]\w*=", line)
        )
        # Both runners send READY=1/STOPPING=1/WATCHDOG=1 (tests/integration/test_systemd_notify.py
        # and tests/integrations/test_source_systemd.py), so the units rely on it.
        assert directives["Type"] == "notify"
        assert directives["NotifyAccess"] == "main"
        assert "WatchdogSec" in directives
        assert directives["EnvironmentFile"] == f"/etc/qbsync/{role}.env"
        assert directives["StateDirectory"] == "qbsync"
        assert directives["NoNewPrivileges"] == "yes"
        assert directives["ProtectSystem"] == "strict"
        assert directives["ExecStart"].endswith(f"qbsync {role}")
        assert "User" in directives or directives.get("DynamicUser") == "yes"
        if role == "source":
            assert "ReadOnlyPaths" in directives and "ReadWritePaths" not in directives
        else:
            assert "ReadWritePaths" in directives
        example = DEPLOY / f"{role}.env.example"
        env = dict(
            line.split("=", 1)
            for line in example.read_text().splitlines()
            if line and not line.startswith("#")
        )
        with pytest.raises(ConfigError, match="openssl rand"):
            resolve(role, {}, env)  # the placeholder as shipped is refused...
        resolve(
            role, {}, {**env, f"QBSYNC_{role.upper()}_AUTH_TOKEN": secrets.token_hex(16)}
        )  # ...replaced, fine


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert stages == ["${BASE}", "${BASE}"]  # the base image is a build argument
    assert re.search(r"^ARG BASE=python:3.11-slim$", text, re.M)
    assert "/opt/qbsync/bin/pip install" in text
    assert re.search(r"^USER qbsync", text, re.M)
    assert 'ENTRYPOINT ["qbsync"]' in text
    assert re.search(r"^EXPOSE 8080 50051$", text, re.M)
    assert "/healthz" in text and "urllib" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
