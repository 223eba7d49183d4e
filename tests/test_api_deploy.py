"""The deploy/ files say what the API and the probes need: capabilities, socket, liveness."""

from __future__ import annotations

import configparser

import yaml

from tests.conftest import ROOT


def test_systemd_unit_grants_net_raw_and_a_runtime_directory_for_the_socket() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "healthmesh.service")
    service = unit["Service"]
    assert "CAP_NET_RAW" in service["AmbientCapabilities"].split()
    assert "CAP_NET_RAW" in service["CapabilityBoundingSet"].split()
    assert service["RuntimeDirectory"] == "healthmesh"
    assert "HEALTHMESH_SOCK=/run/healthmesh/health.sock" in service["Environment"]
    assert service["ExecStart"].split()[1:3] == ["run", "-c"]
    assert "AF_UNIX" in service["RestrictAddressFamilies"]


def test_daemonset_runs_on_the_host_network_with_the_socket_on_a_host_path() -> None:
    ds = yaml.safe_load((ROOT / "deploy" / "daemonset.yaml").read_text())
    assert ds["kind"] == "DaemonSet"
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (container,) = pod["containers"]
    assert "NET_RAW" in container["securityContext"]["capabilities"]["add"]
    live = container["livenessProbe"]["httpGet"]
    assert (live["path"], live["port"]) == ("/hello", 4240)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["run"] == "/run/healthmesh"
    assert volumes["run"]["hostPath"]["path"] == "/run/healthmesh"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HEALTHMESH_SOCK"] == "/run/healthmesh/health.sock"
