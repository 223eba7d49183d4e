"""deploy/: the Kubernetes manifests validate offline against the Kubernetes OpenAPI schemas,
fit together (names, RBAC, downward API), and the ConfigMap's config passes ``config check``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT, run_cli

DEPLOY = ROOT / "deploy"
#: The oldest Kubernetes release we claim to support, and the newest the validator knows.
VERSIONS = ("1.28.0", kubernetes_validate.latest_version())


def manifests() -> dict[str, dict[str, Any]]:
    """Every object of the kustomization, by ``Kind/name``, in the kustomization's order."""
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    out: dict[str, dict[str, Any]] = {}
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            if doc:
                out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(version: str) -> None:
    docs = manifests()
    assert set(docs) == {
        "Namespace/healthmesh",
        "ServiceAccount/healthmesh",
        "ClusterRole/healthmesh",
        "ClusterRoleBinding/healthmesh",
        "ConfigMap/healthmesh",
        "DaemonSet/healthmesh",
    }
    for key, doc in docs.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{key} (Kubernetes {version}): {str(exc).splitlines()[0]}")


def test_the_validator_rejects_a_broken_manifest() -> None:
    ds = manifests()["DaemonSet/healthmesh"]
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"] = "NET_RAW"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)
    ds = manifests()["DaemonSet/healthmesh"]
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True  # a misspelt key: strict catches it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)


def test_the_objects_fit_together() -> None:
    docs = manifests()
    ds = docs["DaemonSet/healthmesh"]
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ns = docs["Namespace/healthmesh"]["metadata"]["name"]
    for key in ("ServiceAccount/healthmesh", "ConfigMap/healthmesh", "DaemonSet/healthmesh"):
        assert docs[key]["metadata"]["namespace"] == ns, key
    # The pod runs as the service account the ClusterRole is bound to.
    binding = docs["ClusterRoleBinding/healthmesh"]
    assert binding["roleRef"]["name"] == docs["ClusterRole/healthmesh"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": ns}
    ]
    rules = {
        (g, r): sorted(rule["verbs"])
        for rule in docs["ClusterRole/healthmesh"]["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert rules == {("", "nodes"): ["get", "list", "watch"],
                     ("cilium.io", "ciliumnodes"): ["get", "list", "watch"]}  # fmt: skip
    # Node identity from the downward API.
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    # The config comes from the ConfigMap, the health port and the metrics port are exposed.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["config"]["configMap"]["name"] == "healthmesh"
    assert container["args"][:3] == ["run", "-c", f"{mounts['config']}/healthmesh.toml"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 4240, "metrics": 9967}
    caps = container["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["NET_RAW"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_configmap_config_passes_config_check_with_the_downward_api_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = manifests()["ConfigMap/healthmesh"]["data"]["healthmesh.toml"]
    cfg = tmp_path / "healthmesh.toml"
    cfg.write_text(text)
    monkeypatch.delenv("CLUSTER_NAME", raising=False)
    env = {"NODE_NAME": "worker-1", "HOST_IP": "10.0.0.7"}
    proc = run_cli("config", "check", "--show", "-c", str(cfg), env=env)
    assert proc.returncode == 0, proc.stderr
    assert 'name = "worker-1"' in proc.stdout and '"10.0.0.7"' in proc.stdout
    assert "[sources.kubernetes]" in proc.stdout
    # Without the downward API variables: one clear line, exit 2.
    monkeypatch.delenv("NODE_NAME", raising=False)
    monkeypatch.delenv("HOST_IP", raising=False)
    proc = run_cli("config", "check", "-c", str(cfg))
    assert proc.returncode == 2
    assert "node.name: environment variable NODE_NAME is not set" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_containerfile_builds_from_the_repository_on_a_pinned_base_as_non_root() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base, "the base image is one pinned ARG"
    # A full version and the slim variant, never a floating tag such as python:3 or latest.
    assert re.fullmatch(r"[\w./-]+/python:3\.\d+\.\d+-slim-\w+", base.group(1)), base.group(1)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    # Everything the COPY lines name exists, and it is what the wheel needs.
    for line in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for src in line.split():
            assert (ROOT / src).exists(), src
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and not user[-1].startswith(("0", "root")), user
    assert re.search(r'^ENTRYPOINT \["healthmesh"\]$', text, re.M)
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
