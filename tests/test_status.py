"""``healthmesh status``: table, verbose, succinct, JSON and Cilium JSON; exit codes 0/1/2/3."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_api_support import (
    LIVE_PEER,
    TWO_PEERS,
    AgentProcess,
    cilium_validator,
    settled_agent,
    snapshot_validator,
)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """An agent with one live and one dead peer."""
    yield from settled_agent(tmp_path_factory.mktemp("mixed"), TWO_PEERS)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """An agent whose every peer answers."""
    yield from settled_agent(tmp_path_factory.mktemp("healthy"), LIVE_PEER)


def status(agent: AgentProcess, *args: str) -> tuple[int, str, str]:
    proc = run_cli("status", "-H", f"unix://{agent.socket_path}", *args,
                   env={"COLUMNS": "200"})
    return proc.returncode, proc.stdout, proc.stderr


def test_table_follows_cilium_health_with_the_local_node_first(mixed: AgentProcess) -> None:
    code, out, err = status(mixed)
    assert code == 1, err  # one peer is unreachable
    lines = out.splitlines()
    # Layer 1 (the agent's components) comes first, then the mesh, as cilium status does.
    mesh = next(i for i, line in enumerate(lines) if line.startswith("Cluster health:"))
    assert mesh > 0 and any(line.startswith("Responder:") for line in lines[:mesh]), out
    assert all(": " in line for line in lines[:mesh] if line.strip())
    lines = lines[mesh:]
    assert lines[0].startswith("Cluster health: 2/3 reachable (")
    assert lines[0].endswith("(Probe interval: 1s)")
    head = next(i for i, line in enumerate(lines) if line.startswith("Name"))
    assert lines[head].split()[:4] == ["Name", "IP", "Node", "Endpoints"]
    assert lines[head + 1].split()[:5] == ["me", "(localhost)", "127.0.0.1", "1/1", "-"]
    dead = next(line for line in lines if line.startswith("c2/dead"))
    assert dead.split()[1:4] == ["127.0.0.3", "0/1", "0/2"]


def test_exit_0_when_every_node_is_reachable(healthy: AgentProcess) -> None:
    code, out, err = status(healthy)
    assert code == 0, err
    assert "Cluster health: 2/2 reachable" in out


def test_verbose_prints_every_path_and_its_statistics(mixed: AgentProcess) -> None:
    code, out, _ = status(mixed, "--verbose")
    assert code == 1
    assert "  me (localhost): reachable" in out
    assert "    Host connectivity to 127.0.0.2:" in out
    assert "    Endpoint connectivity to 127.0.0.5 (secondary):" in out
    ok = [line for line in out.splitlines() if "HTTP to agent:" in line and "OK, RTT=" in line]
    assert ok and all("(Last probed: " in line for line in ok)
    assert "min/avg/p50/p95/max" in out and "loss 0% of" in out
    refused = [line for line in out.splitlines() if "127.0.0.3" in line and "unreachable:" in line]
    assert refused, out


def test_succinct_prints_one_line_per_node(mixed: AgentProcess) -> None:
    code, out, _ = status(mixed, "--succinct")
    assert code == 1
    lines = out.splitlines()
    lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("Cluster health:")):]
    assert lines[0].startswith("Cluster health: 2/3 reachable")
    # Per-cluster lines may follow the total; then one line per node.
    rows = [line for line in lines[1:] if not line.startswith("  Cluster ")]
    assert len(rows) == 3
    assert rows[0].split()[:4] == ["me", "(localhost)", "127.0.0.1", "reachable"]
    dead = next(line for line in rows if "c2/dead" in line)
    assert "unreachable" in dead and "127.0.0.3" in dead


def test_json_is_the_snapshot(mixed: AgentProcess) -> None:
    code, out, _ = status(mixed, "-o", "json")
    assert code == 1
    snap = json.loads(out)
    snapshot_validator().validate(snap)
    assert snap["summary"]["unreachable"] == 1


def test_cilium_json_is_ciliums_document(mixed: AgentProcess, healthy: AgentProcess) -> None:
    code, out, _ = status(mixed, "-o", "cilium-json")
    assert code == 1
    doc = json.loads(out)
    cilium_validator("HealthStatusResponse").validate(doc)
    assert {n["name"] for n in doc["nodes"]} == {"me", "peer", "c2/dead"}
    code, out, _ = status(healthy, "-o", "cilium-json", "--probe")
    assert code == 0
    cilium_validator("HealthStatusResponse").validate(json.loads(out))


def test_probe_shows_a_fresh_round(mixed: AgentProcess) -> None:
    _, before, _ = status(mixed, "-o", "json")
    code, out, _ = status(mixed, "-o", "json", "--probe")
    assert code == 1
    old = json.loads(before)["nodes"][2]["paths"][0]["probes"]["http"]["last_probed"]
    new = json.loads(out)["nodes"][2]["paths"][0]["probes"]["http"]["last_probed"]
    assert new > old


def test_no_socket_exits_3_with_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nobody-here.sock"
    proc = run_cli("status", "-H", f"unix://{path}")
    assert proc.returncode == 3
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(path) in lines[0] and "healthmesh run" in lines[0]


def test_stale_socket_exits_3(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    proc = run_cli("status", "-H", f"unix://{path}")
    assert proc.returncode == 3
    assert str(path) in proc.stderr and "stale" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_default_socket_comes_from_healthmesh_sock(healthy: AgentProcess) -> None:
    proc = run_cli("status", "-o", "json", env={"HEALTHMESH_SOCK": healthy.socket_path})
    assert proc.returncode == 0, proc.stderr
    missing = run_cli("status", env={"HEALTHMESH_SOCK": "/nonexistent/hm.sock"})
    assert missing.returncode == 3
    assert "/nonexistent/hm.sock" in missing.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--verbose", "--succinct"),
        ("-H", "http://localhost:4240"),
        ("-H", "unix://relative.sock"),
        ("-o", "yaml"),
        ("-o", "json", "--verbose"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    proc = run_cli("status", *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
