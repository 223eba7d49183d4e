"""/v1/events and ``healthmesh events`` against a real agent whose peer goes down and up.

The peer is a real ``healthmesh responder`` on 127.0.0.3 that the test stops and starts; the
agent removes a node when its node file changes. Events are read over the real unix socket.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.agentproc import free_port
from tests.conftest import ROOT, healthmesh_cmd, run_cli
from tests.events_support import (
    Responder,
    StreamReader,
    event_validator,
    fast_agent_config,
    is_change,
    ring,
    wait_ring,
)
from tests.netns import Netns
from tests.test_api_support import AgentProcess, agent_config

NODES = """
[[nodes]]
name = "flappy"
addresses = ["127.0.0.3"]
[[nodes]]
name = "gone"
cluster = "c2"
addresses = ["127.0.0.4"]
"""


def config(sock: Path, port: int, nodes: Path) -> str:
    return fast_agent_config(sock, port, f'[sources.file]\npath = "{nodes}"\npoll = "200ms"\n')


class Lab:
    def __init__(self, tmp: Path) -> None:
        port = free_port()
        self.nodes = tmp / "nodes.toml"
        self.nodes.write_text(NODES)
        self.sock = str(tmp / "health.sock")
        self.peer = Responder("127.0.0.3", port, tmp / "responder.log")
        self.agent = AgentProcess(tmp, config(Path(self.sock), port, self.nodes),
                                  socket_path=self.sock)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("events"))
    lab.peer.start()
    lab.agent.start()
    try:
        lab.agent.wait_serving()
        wait_ring(lab.sock, lambda e: is_change(e, "flappy", "reachable"))
        yield lab
    finally:
        lab.agent.stop()
        lab.peer.stop()


def test_startup_events_follow_membership_and_first_results(lab: Lab) -> None:
    events = wait_ring(lab.sock, lambda e: is_change(e, "gone", "unreachable"))
    validator = event_validator()
    for ev in events:
        validator.validate(ev)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert all(e["observer"] == "default/me" for e in events)
    flappy = [e for e in events if e["node"] == "flappy"]
    assert (flappy[0]["from"], flappy[0]["to"], flappy[0]["path"]) == ("absent", "unknown", None)
    path_ev = next(e for e in flappy if e["path"] == "127.0.0.3")
    assert (path_ev["role"], path_ev["kind"], path_ev["from"], path_ev["to"]) == (
        "host", "http", "unknown", "reachable")
    gone = next(e for e in events if is_change(e, "gone", "unreachable", path="127.0.0.4"))
    assert gone["cluster"] == "c2" and "refused" in gone["reason"]


def test_component_states_are_events_too(lab: Lab) -> None:
    events = wait_ring(
        lab.sock, lambda e: e["type"] == "component" and e.get("component") == "responder"
    )
    validator = event_validator()
    comps = [e for e in events if e["type"] == "component"]
    for ev in comps:
        validator.validate(ev)
    responder = next(e for e in comps if e["component"] == "responder")
    assert (responder["from"], responder["to"]) == ("absent", "ok")
    assert (responder["node"], responder["path"], responder["kind"]) == ("me", None, None)
    assert "outputs.api" in {e["component"] for e in comps}


def test_a_peer_going_down_and_up_streams_path_and_node_events(lab: Lab) -> None:
    reader = StreamReader(lab.sock, "/v1/events")  # live only
    try:
        assert reader.status == 200
        lab.peer.stop()
        down = reader.wait_for(lambda e: is_change(e, "flappy", "unreachable"), 15)
        path_down = next(e for e in down if is_change(e, "flappy", "unreachable",
                                                      path="127.0.0.3"))
        assert path_down["from"] == "reachable" and path_down["kind"] == "http"
        assert "refused" in path_down["reason"]
        assert down[-1]["from"] == "reachable" and down[-1]["type"] == "node"
        assert down.index(path_down) < len(down) - 1  # the path's change, then the node's
        lab.peer.start()
        up = reader.wait_for(lambda e: is_change(e, "flappy", "reachable"), 15)
        path_up = next(e for e in up if e.get("path") == "127.0.0.3")
        assert (path_up["from"], path_up["to"], path_up["reason"]) == (
            "unreachable", "reachable", "recovered")
        seqs = [e["seq"] for e in down + up if e.get("type") != "heartbeat"]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # in order, none missed
    finally:
        reader.close()


def test_since_replays_by_seq_and_by_time(lab: Lab) -> None:
    events = ring(lab.sock)
    mid = events[len(events) // 2]
    after = ring(lab.sock, f"since={mid['seq']}&follow=false")
    assert after == events[len(events) // 2 + 1:]
    by_time = ring(lab.sock, f"since={mid['time']}&follow=false")
    assert by_time[0]["time"] >= mid["time"] and mid in by_time
    assert by_time == [e for e in events if e["time"] >= mid["time"]]
    # A following stream replays first, then goes on live.
    reader = StreamReader(lab.sock, f"/v1/events?since={events[-3]['seq']}")
    try:
        assert [reader.next(5) for _ in range(2)] == events[-2:]
    finally:
        reader.close()
    # A seq from before an agent restart (ahead of this agent's) replays everything.
    ahead = ring(lab.sock, "since=999999999&follow=false")
    assert ahead[0]["type"] == "gap" and ahead[1]["seq"] == 1


def test_removed_node_goes_absent(lab: Lab) -> None:
    lab.nodes.write_text(NODES.split("[[nodes]]\nname = \"gone\"")[0])
    events = wait_ring(lab.sock, lambda e: is_change(e, "gone", "absent"))
    ev = next(e for e in events if is_change(e, "gone", "absent"))
    assert ev["from"] == "unreachable" and ev["reason"] == "removed from membership"


def test_bad_queries_are_400_and_other_methods_405(lab: Lab) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(uds=lab.sock),
                      base_url="http://localhost", timeout=5) as c:
        for q in ("since=yesterday", "since=2026-12-01T10:00:00", "follow=maybe", "x=1"):
            resp = c.get(f"/v1/events?{q}")
            assert resp.status_code == 400, q
            assert resp.json()["error"].split(":")[0] in ("since", "follow", "x"), resp.text
        resp = c.post("/v1/events")
        assert resp.status_code == 405 and resp.headers["allow"] == "GET, HEAD"


def test_streams_are_bounded(lab: Lab) -> None:
    async def main() -> None:
        transport = httpx.AsyncHTTPTransport(uds=lab.sock)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                     timeout=10) as c:
            streams = []
            try:
                with anyio.fail_after(20):
                    for _ in range(16):
                        cm = c.stream("GET", "/v1/events")
                        resp = await cm.__aenter__()
                        streams.append(cm)
                        assert resp.status_code == 200
                    refused = await c.get("/v1/events")
                    assert refused.status_code == 503
                    assert refused.headers["retry-after"] == "5"
                    assert "too many event streams" in refused.json()["error"]
            finally:
                for cm in streams:
                    await cm.__aexit__(None, None, None)
            # Closed streams free their places.
            with anyio.fail_after(10):
                while True:
                    resp = await c.get("/v1/events?follow=false")
                    if resp.status_code == 200:
                        break
                    await anyio.sleep(0.1)

    anyio.run(main)


def test_events_command_prints_json_and_table(lab: Lab) -> None:
    events = ring(lab.sock)
    proc = run_cli("events", "-H", f"unix://{lab.sock}", "--since", "0", "--no-follow",
                   "-o", "json")
    assert proc.returncode == 0, proc.stderr
    printed = [json.loads(line) for line in proc.stdout.splitlines()]
    assert printed[: len(events)] == events
    proc = run_cli("events", "-H", f"unix://{lab.sock}", "--since", "1h", "--no-follow")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["TIME", "NODE", "PATH", "KIND", "FROM", "TO", "REASON"]
    row = next(line for line in lines if "127.0.0.4 (host)" in line)
    assert row.split()[1:7] == ["c2/gone", "127.0.0.4", "(host)", "http", "unknown",
                                "unreachable"]
    assert len(lines) >= len(events) + 1


def test_events_command_follows_live_changes(lab: Lab) -> None:
    last = ring(lab.sock)[-1]["seq"]
    proc = subprocess.Popen(
        [*healthmesh_cmd(), "events", "-H", f"unix://{lab.sock}", "--since", str(last)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        assert lines.get(timeout=15).split()[0] == "TIME"  # connected (header first)
        lab.peer.stop()
        deadline = time.monotonic() + 15
        rows: list[str] = []
        while not any("127.0.0.3 (host)" in r and "unreachable" in r for r in rows):
            left = deadline - time.monotonic()
            assert left > 0, f"no row within 15s: {rows}"
            rows.append(lines.get(timeout=left))
        row = rows[-1].split()
        assert row[1:7] == ["flappy", "127.0.0.3", "(host)", "http", "reachable", "unreachable"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        lab.peer.start()
        wait_ring(lab.sock, lambda e: e["seq"] > last and is_change(e, "flappy", "reachable"))


def test_events_command_without_an_agent_exits_3(tmp_path: Path) -> None:
    proc = run_cli("events", "-H", f"unix://{tmp_path}/none.sock")
    assert proc.returncode == 3
    assert proc.stderr.startswith("healthmesh: error: no agent is serving on")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("events", "-H", "tcp://x")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_bad_since_from_the_command_is_one_line_exit_2(lab: Lab) -> None:
    proc = run_cli("events", "-H", f"unix://{lab.sock}", "--since", "last-tuesday")
    assert proc.returncode == 2
    assert "since" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_agent_stops_promptly_with_a_stream_open(tmp_path: Path) -> None:
    port = free_port()
    nodes = tmp_path / "n.toml"
    nodes.write_text('[[nodes]]\nname = "p"\naddresses = ["127.0.0.2"]\n')
    sock = tmp_path / "s.sock"
    agent = AgentProcess(tmp_path, config(sock, port, nodes), socket_path=sock)
    agent.start()
    try:
        agent.wait_serving()
        reader = StreamReader(str(sock), "/v1/events?since=0")
        assert reader.next(10)["seq"] == 1
        start = time.monotonic()
        code = agent.stop(timeout=10)
        assert code == 0 and time.monotonic() - start < 5, agent.log()
        # The stream ends with the agent.
        with pytest.raises(AssertionError, match="ended"):
            while True:
                reader.next(5)
    finally:
        agent.stop()


@pytest.mark.root
def test_a_blackholed_peer_times_out_and_recovers(ns: Netns, tmp_path: Path) -> None:
    """iptables DROP (in a namespace the test made) makes probes time out, not fail fast."""
    sock = tmp_path / "health.sock"
    cfg = agent_config(str(sock), 4240, peers='{name = "peer", addresses = ["127.0.0.2"]}',
                       listen=("0.0.0.0",), interval="500ms", timeout="300ms")
    agent = AgentProcess(tmp_path, cfg, socket_path=sock, prefix=ns.cmd())
    with agent:
        agent.wait_serving()
        wait_ring(str(sock), lambda e: is_change(e, "peer", "reachable"))
        reader = StreamReader(str(sock), "/v1/events")
        try:
            ns.run("iptables", "-A", "INPUT", "-d", "127.0.0.2", "-j", "DROP")
            down = reader.wait_for(lambda e: is_change(e, "peer", "unreachable"), 15)
            path = next(e for e in down if e.get("path") == "127.0.0.2")
            assert (path["from"], path["to"]) == ("reachable", "unreachable")
            assert path["reason"].startswith("timeout after 300ms"), path
            ns.run("iptables", "-D", "INPUT", "-d", "127.0.0.2", "-j", "DROP")
            up = reader.wait_for(lambda e: is_change(e, "peer", "reachable"), 15)
            assert up[-1]["from"] == "unreachable" and up[-1]["type"] == "node"
            assert any(e.get("path") == "127.0.0.2" and e["reason"] == "recovered" for e in up)
        finally:
            reader.close()
