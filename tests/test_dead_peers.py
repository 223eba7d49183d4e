"""Dead peers never slow the probing of live ones (the cilium-health 1.8 lesson)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from tests.agentproc import AgentProc, free_port
from tests.netns import Netns

INTERVAL, TIMEOUT = 2.0, 0.5


def config(tmp_path: Path, port: int, dead: int) -> Path:
    live_nodes = [f'{{name = "live{i}", addresses = ["127.1.0.{i}"]}}' for i in range(1, 101)]
    dead_nodes = [f'{{name = "dead{i}", addresses = ["127.2.0.{i}"]}}' for i in range(1, dead + 1)]
    cfg = tmp_path / f"mesh-{dead}.toml"
    cfg.write_text(f"""
[node]
name = "self"
addresses = ["127.0.0.1"]
[probing]
interval = "{INTERVAL}s"
timeout = "{int(TIMEOUT * 1000)}ms"
[responder]
listen = ["0.0.0.0:{port}"]
[probes.http]
port = {port}
[sources.static]
nodes = [{", ".join(live_nodes + dead_nodes)}]
""")
    return cfg


def live_rtts(doc: dict[str, Any]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for n in doc["nodes"]:
        if n["name"].startswith("live"):
            for kind, r in n["paths"][0]["probes"].items():
                if r["rtt_ms"] is not None:
                    out.setdefault(kind, []).append(r["p50_ms"])
    return out


def samples(doc: dict[str, Any], prefix: str) -> list[int]:
    return [
        r["samples"]
        for n in doc["nodes"]
        if n["name"].startswith(prefix)
        for r in n["paths"][0]["probes"].values()
    ]


def run_mesh(ns: Netns, cfg: Path, rounds: int) -> list[dict[str, Any]]:
    with AgentProc(cfg, prefix=ns.cmd()) as agent:
        docs = [agent.next_doc(timeout=15) for _ in range(rounds)]
    assert "Traceback" not in agent.stderr()
    return docs


def test_100_dead_peers_do_not_delay_100_live_ones(tmp_path: Path, ns: Netns) -> None:
    # Inside the test's own namespace, everything sent to 127.2/16 vanishes.
    ns.run("iptables", "-A", "INPUT", "-d", "127.2.0.0/16", "-j", "DROP")
    port = free_port()
    baseline = run_mesh(ns, config(tmp_path, port, dead=0), rounds=3)
    loaded = run_mesh(ns, config(tmp_path, port, dead=100), rounds=5)

    bound = INTERVAL + TIMEOUT + 0.1
    for doc in loaded[1:]:
        assert doc["round"]["duration_s"] <= bound, doc["round"]
    # Every live path was probed once per round, on schedule. (A snapshot may already hold
    # a result of the next round, so count over three rounds rather than per round.)
    first, last = loaded[1], loaded[-1]
    grew = [b - a for a, b in zip(samples(first, "live"), samples(last, "live"))]
    assert len(grew) == 200 and set(grew) <= {2, 3, 4}, grew
    last = loaded[-1]
    assert last["summary"]["unreachable"] == 100 and last["summary"]["reachable"] == 101
    for n in last["nodes"]:
        if n["name"].startswith("dead"):
            for r in n["paths"][0]["probes"].values():
                assert r["state"] == "unreachable" and "timeout" in r["error"]
    # Live RTTs are the same with and without 100 dead peers.
    base, load = live_rtts(baseline[-1]), live_rtts(last)
    assert base.keys() == load.keys() and base
    for kind in base:
        b, m = statistics.median(base[kind]), statistics.median(load[kind])
        assert m <= 1.5 * b + 0.3, (kind, b, m)
