"""``healthmesh run``: the snapshot contract, exit codes, live membership and clean shutdown."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import jsonschema
import pytest

from tests.agentproc import AgentProc, free_port, node
from tests.conftest import ROOT, run_cli

SCHEMA = json.loads((ROOT / "docs" / "snapshot.schema.json").read_text())


def loopback_config(tmp_path: Path, port: int, extra_peers: str = "") -> Path:
    """examples/loopback.toml on a free port (so tests never collide with a running demo)."""
    text = (ROOT / "examples" / "loopback.toml").read_text().replace("4240", str(port))
    # The web page and the metrics on free ports too.
    text = text.replace("127.0.0.1:9968", "127.0.0.1:0").replace("127.0.0.1:9967", "127.0.0.1:0")
    # And the API socket in this test's own directory, not the demo's .run/.
    text = text.replace('socket = "../.run/health.sock"', 'socket = "health.sock"')
    text += f"\n[probes.http]\nport = {port}\n"
    if extra_peers:
        text = text.replace("nodes = [\n", "nodes = [\n" + extra_peers, 1)
    cfg = tmp_path / "loopback.toml"
    cfg.write_text(text)
    return cfg


def test_once_json_matches_the_snapshot_schema(tmp_path: Path) -> None:
    cfg = loopback_config(tmp_path, free_port())
    proc = run_cli("run", "-c", str(cfg), "--once", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, SCHEMA)
    summary = {k: doc["summary"][k] for k in ("nodes", "reachable", "unreachable", "unknown")}
    assert summary == {"nodes": 5, "reachable": 5, "unreachable": 0, "unknown": 0}
    assert doc["nodes"][0]["name"] == "demo-1" and doc["nodes"][0]["local"] is True
    east = node(doc, "demo-5")
    assert east["cluster"] == "east"
    assert doc["summary"]["clusters"] == {
        "default": {"nodes": 4, "reachable": 4, "unreachable": 0, "unknown": 0},
        "east": {"nodes": 1, "reachable": 1, "unreachable": 0, "unknown": 0},
    }
    demo4 = node(doc, "demo-4")
    assert [(p["role"], p["primary"]) for p in demo4["paths"]] == [
        ("host", True),
        ("endpoint", True),
    ]


def test_the_schema_rejects_a_broken_snapshot() -> None:
    bad = {"timestamp": "yesterday", "interval_s": 1, "local": {}, "summary": {}, "nodes": []}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


def test_once_exits_1_naming_the_unreachable_peer(tmp_path: Path) -> None:
    port = free_port()
    cfg = loopback_config(tmp_path, port, '  {name = "gone", addresses = ["127.0.0.9"]},\n')
    proc = run_cli("run", "-c", str(cfg), "--once", "-o", "json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    gone = node(doc, "gone")
    assert gone["state"] == "unreachable"
    http = gone["paths"][0]["probes"]["http"]
    assert http["state"] == "unreachable"
    assert "refused" in http["error"] and f"127.0.0.9:{port}" in http["error"]
    assert doc["summary"]["unreachable"] == 1


def test_once_table_is_the_default_output(tmp_path: Path) -> None:
    cfg = loopback_config(tmp_path, free_port())
    proc = run_cli("run", "-c", str(cfg), "--once", env={"COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Cluster health: 5/5 reachable")
    assert "  Cluster east: 1/1 reachable" in proc.stdout
    assert "demo-1 (localhost)" in proc.stdout and "east/demo-5" in proc.stdout


def test_a_responder_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    port = free_port()
    cfg = loopback_config(tmp_path, port)
    with socket.socket() as busy:
        busy.bind(("127.0.0.3", port))
        busy.listen(1)
        proc = run_cli("run", "-c", str(cfg), "--once")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert any(f"127.0.0.3:{port}" in line for line in err), proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signals_shut_the_agent_down_cleanly_within_2s(tmp_path: Path, sig: int) -> None:
    cfg = loopback_config(tmp_path, free_port())
    with AgentProc(cfg) as agent:
        agent.next_doc(timeout=10)
        code, took = agent.stop(sig)
    assert code == 0, agent.stderr()
    assert took < 2.0
    assert "Traceback" not in agent.stderr()


def write_nodes(path: Path, nodes: list[tuple[str, str]]) -> None:
    data = {"nodes": [{"name": n, "addresses": [a]} for n, a in nodes]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def test_file_source_follows_edits_and_keeps_the_last_good_list(tmp_path: Path) -> None:
    port = free_port()
    peers = tmp_path / "peers.json"
    write_nodes(peers, [("p2", "127.0.0.2"), ("p3", "127.0.0.3")])
    cfg = tmp_path / "file.toml"
    cfg.write_text(f"""
[node]
name = "p1"
addresses = ["127.0.0.1"]
[probing]
interval = "500ms"
timeout = "250ms"
[responder]
listen = ["0.0.0.0:{port}"]
[probes.http]
port = {port}
[sources.file]
path = "peers.json"
poll = "100ms"
""")
    names = lambda d: [n["name"] for n in d["nodes"]]  # noqa: E731
    with AgentProc(cfg) as agent:
        agent.wait_for(lambda d: names(d) == ["p1", "p2", "p3"] and d["summary"]["reachable"] == 3)
        write_nodes(peers, [("p2", "127.0.0.2"), ("p3", "127.0.0.3"), ("p4", "127.0.0.4")])
        added = agent.wait_for(lambda d: "p4" in names(d))
        assert added["summary"]["unreachable"] == 0
        agent.wait_for(lambda d: node(d, "p4")["state"] == "reachable")

        peers.write_text('{"nodes": [{"name": "p2", "addresses": ["not-an-ip"]}]}')
        stale = agent.wait_for(lambda d: d["sources"]["file"]["stale"])
        assert names(stale) == ["p1", "p2", "p3", "p4"]
        assert "nodes[0].addresses[0]" in stale["sources"]["file"]["reason"]

        write_nodes(peers, [("p2", "127.0.0.2")])
        fewer = agent.wait_for(lambda d: names(d) == ["p1", "p2"])
        assert not fewer["sources"]["file"]["stale"]
        # Nothing was reported unreachable at any point of the edits.
        for _ in range(3):
            assert agent.next_doc()["summary"]["unreachable"] == 0
    assert "keeping the last good node list" in agent.stderr()


def test_first_results_arrive_within_a_second_of_start(tmp_path: Path) -> None:
    cfg = loopback_config(tmp_path, free_port())
    text = cfg.read_text().replace('interval = "2s"', 'interval = "30s"')
    cfg.write_text(text)
    sock = tmp_path / "health.sock"
    with AgentProc(cfg) as agent:
        # From the moment the agent serves (its API socket exists: before the first probe)
        # to the first complete round; interpreter and plugin start-up are not counted.
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        doc = agent.next_doc(timeout=10)
        elapsed = time.monotonic() - start
    # Round 0 runs at max_rate, not spread over the 30 s interval.
    assert doc["summary"]["reachable"] == 5
    assert elapsed < 5.0  # a paced round would take the 30 s interval
