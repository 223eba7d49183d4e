"""``healthmesh run --once`` whose only peer source is ``[sources.kubernetes]`` (the API double)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.agentproc import free_port
from tests.conftest import run_cli
from tests.kube_double import CILIUM, NODES, KubeDouble, cilium_node, node, write_kubeconfig


def test_run_once_probes_every_node_the_api_server_lists(tmp_path: Path) -> None:
    port = free_port()
    with KubeDouble() as d:
        for i in range(2, 6):
            d.put(NODES, node(f"worker-{i}", ("InternalIP", f"127.0.0.{i}")))
        d.put(NODES, node("agent-1", ("InternalIP", "127.0.0.1")))  # the agent's own node
        d.put(CILIUM, cilium_node("worker-5", ipv4="127.0.0.6"))
        kc = write_kubeconfig(str(tmp_path / "kubeconfig"), d.url, token=d.token)
        listen = ", ".join(f'"127.0.0.{i}:{port}"' for i in range(1, 7))
        cfg = tmp_path / "healthmesh.toml"
        cfg.write_text(
            '[node]\nname = "${NODE_NAME}"\naddresses = ["${HOST_IP}"]\n\n'
            '[probing]\ninterval = "2s"\ntimeout = "500ms"\n\n'
            # A free port instead of 4240, so parallel test runs do not collide.
            f"[responder]\nlisten = [{listen}]\n\n[probes.http]\nport = {port}\n\n"
            f'[sources.kubernetes]\nkubeconfig = "{kc}"\n'
        )
        env = {"NODE_NAME": "agent-1", "HOST_IP": "127.0.0.1"}
        proc = run_cli("run", "-c", str(cfg), "--once", "-o", "json", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    names = [n["name"] for n in doc["nodes"]]
    assert names == ["agent-1", "worker-2", "worker-3", "worker-4", "worker-5"]
    assert doc["summary"]["reachable"] == 5 and doc["summary"]["unreachable"] == 0
    for n in doc["nodes"][1:]:
        assert n["info"] == {"ready": "True"}
        for p in n["paths"]:
            assert p["probes"], p  # every path was really probed
            assert all(k["state"] == "reachable" for k in p["probes"].values()), p
    w5 = next(n for n in doc["nodes"] if n["name"] == "worker-5")
    assert [(p["role"], p["address"]) for p in w5["paths"]] == [
        ("host", "127.0.0.5"),
        ("endpoint", "127.0.0.6"),
    ]


def test_unset_variable_in_the_config_is_one_line_naming_file_key_and_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOST_IP", raising=False)
    cfg = tmp_path / "h.toml"
    cfg.write_text(
        '[node]\nname = "${NODE_NAME}"\naddresses = ["${HOST_IP}"]\n\n'
        '[sources.static]\nnodes = [{name = "b", addresses = ["127.0.0.2"]}]\n'
    )
    proc = run_cli("config", "check", "-c", str(cfg), env={"NODE_NAME": "a"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"healthmesh: error: {cfg}: node.addresses[0]: environment variable HOST_IP is not set "
        "(referenced as ${HOST_IP}; use ${HOST_IP:-default} for a fallback)"
    ]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("kubeconfig", "section", "message"),
    [
        ("users: [", "", "kubeconfig: not a valid kubeconfig"),
        ('{"current-context": "x", "contexts": []}', "", "contexts: no entry named 'x'"),
        (
            '{"current-context": "t", "contexts": [{"name": "t", "context": {"cluster": "c",'
            ' "user": "u"}}], "clusters": [{"name": "c", "cluster": {"server": "https://k:6443"}}],'
            ' "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}]}',
            "",
            "users[u]: exec and auth-provider credentials are not supported",
        ),
        (None, "", "kubeconfig: cannot read kubeconfig: No such file or directory"),
        ("{}", 'address_types = ["Hostname"]', "address_types[0]: 'Hostname' is not one of"),
        ("{}", 'watch_timeout = "0s"', "watch_timeout: must be between 1s and 1h"),
    ],
)
def test_bad_kubernetes_settings_are_one_line_naming_the_file_and_key(
    tmp_path: Path, kubeconfig: str | None, section: str, message: str
) -> None:
    kc = tmp_path / "kubeconfig"
    if kubeconfig is not None:
        kc.write_text(kubeconfig)
    cfg = tmp_path / "h.toml"
    cfg.write_text(
        '[node]\nname = "a"\naddresses = ["127.0.0.1"]\n\n'
        f'[sources.kubernetes]\nkubeconfig = "kubeconfig"\n{section}\n'
    )
    proc = run_cli("config", "check", "-c", str(cfg))
    assert proc.returncode == 2, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
