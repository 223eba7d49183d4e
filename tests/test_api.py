"""The local API over a real unix socket: Cilium's /v1beta and healthmesh's /v1, validated."""

from __future__ import annotations

import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import require
from tests.test_api_support import (
    LIVE_PEER,
    SNAPSHOT_SCHEMA,
    TWO_PEERS,
    AgentProcess,
    agent_config,
    cilium_validator,
    free_port,
    openapi_document,
    response_validator,
    settled_agent,
    snapshot_validator,
)

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent (a live peer and a dead one) shared by the read-only tests of this module."""
    yield from settled_agent(tmp_path_factory.mktemp("api"), TWO_PEERS)


def test_v1beta_status_validates_against_the_cilium_model(agent: AgentProcess) -> None:
    with agent.client() as c:
        resp = c.get("/v1beta/status")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    doc = resp.json()
    cilium_validator("HealthStatusResponse").validate(doc)
    assert doc["probeInterval"] == "1s"
    assert doc["local"] == {"name": "me"}
    assert RFC3339.match(doc["timestamp"])
    by_name = {n["name"]: n for n in doc["nodes"]}
    # Names are cluster/node unless the cluster is "default"; the local node is listed too.
    assert set(by_name) == {"me", "peer", "c2/dead"}
    live = by_name["peer"]["host"]["primary-address"]
    assert live["ip"] == "127.0.0.2"
    assert live["http"]["status"] == ""
    assert isinstance(live["http"]["latency"], int) and live["http"]["latency"] > 0
    assert RFC3339.match(live["http"]["lastProbed"])
    dead = by_name["c2/dead"]
    assert dead["host"]["primary-address"]["http"]["status"]  # the error text
    assert dead["host"]["primary-address"]["http"]["latency"] == 0
    ep = dead["health-endpoint"]
    assert ep["primary-address"]["ip"] == "127.0.0.4"
    assert [p["ip"] for p in ep["secondary-addresses"]] == ["127.0.0.5"]
    assert dead["endpoint"]["ip"] == "127.0.0.4"  # Cilium's deprecated field, still filled


def test_v1beta_healthz_validates_and_reports_uptime_and_load(agent: AgentProcess) -> None:
    with agent.client() as c:
        resp = c.get("/v1beta/healthz")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    doc = resp.json()
    cilium_validator("HealthResponse").validate(doc)
    assert re.fullmatch(r"(\d+h)?(\d+m)?\d+s", doc["uptime"])
    loads = Path("/proc/loadavg").read_text().split()[:3]
    assert set(doc["system-load"]) == {"last1min", "last5min", "last15min"}
    for value in doc["system-load"].values():
        float(value)
    assert len(loads) == 3


def test_v1beta_probe_runs_a_fresh_round(agent: AgentProcess) -> None:
    with agent.client() as c:
        before = c.get("/v1beta/status").json()
        resp = c.put("/v1beta/status/probe")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    doc = resp.json()
    cilium_validator("HealthStatusResponse").validate(doc)
    peer = next(n for n in doc["nodes"] if n["name"] == "peer")
    probed = peer["host"]["primary-address"]["http"]["lastProbed"]
    old = next(n for n in before["nodes"] if n["name"] == "peer")
    assert probed >= old["host"]["primary-address"]["http"]["lastProbed"]


def test_v1beta_errors_are_json(agent: AgentProcess) -> None:
    with agent.client() as c:
        missing = c.get("/v1beta/nope")
        wrong = c.post("/v1beta/status")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert missing.json()["code"] == 404
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("method", "path", "url"),
    [
        ("GET", "/v1/healthz", "/v1/healthz"),
        ("GET", "/v1/status", "/v1/status"),
        ("GET", "/v1/nodes", "/v1/nodes"),
        ("GET", "/v1/nodes", "/v1/nodes?state=unreachable&cluster=c2"),
        ("GET", "/v1/nodes/{cluster}/{name}", "/v1/nodes/c2/dead"),
        ("GET", "/v1/plugins", "/v1/plugins"),
        ("GET", "/v1/mesh", "/v1/mesh"),
        ("POST", "/v1/probe", "/v1/probe"),
        ("GET", "/v1/openapi.json", "/v1/openapi.json"),
    ],
)
def test_v1_answers_validate_against_our_openapi(
    agent: AgentProcess, method: str, path: str, url: str
) -> None:
    with agent.client() as c:
        resp = c.request(method, url)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    response_validator(path, method, 200).validate(resp.json())


def test_v1_status_is_the_snapshot(agent: AgentProcess) -> None:
    with agent.client() as c:
        snap = c.get("/v1/status").json()
    snapshot_validator().validate(snap)
    counts = {k: snap["summary"][k] for k in ("nodes", "reachable", "unreachable", "unknown")}
    assert counts == {"nodes": 3, "reachable": 2, "unreachable": 1, "unknown": 0}
    assert snap["nodes"][0]["name"] == "me" and snap["nodes"][0]["local"] is True
    assert snap["round"]["completed"] >= 1


def test_v1_nodes_filters_and_single_node(agent: AgentProcess) -> None:
    with agent.client() as c:
        down = c.get("/v1/nodes", params={"state": "unreachable"}).json()["nodes"]
        c2 = c.get("/v1/nodes", params={"cluster": "c2"}).json()["nodes"]
        one = c.get("/v1/nodes/c2/dead").json()
    assert [n["name"] for n in down] == ["dead"]
    assert down[0]["addresses"] == ["127.0.0.3"]
    assert down[0]["health_addresses"] == ["127.0.0.4", "127.0.0.5"]
    assert [n["name"] for n in c2] == ["dead"]
    assert [p["address"] for p in one["paths"]] == ["127.0.0.3", "127.0.0.4", "127.0.0.5"]


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [
        ("GET", "/v1/nodes?state=sideways", 400),
        ("GET", "/v1/nodes/c2/nobody", 404),
        ("GET", "/v1/nope", 404),
        ("GET", "/", 404),
        ("DELETE", "/v1/status", 405),
        ("GET", "/v1/probe", 405),
        ("GET", "/v1/nodes?state=%ff", 400),
    ],
)
def test_v1_bad_requests_get_4xx_with_a_json_error(
    agent: AgentProcess, method: str, url: str, status: int
) -> None:
    with agent.client() as c:
        resp = c.request(method, url)
    assert resp.status_code == status
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in resp.text
    if status == 400:
        response_validator("/v1/nodes", "GET", 400).validate(body)


def test_head_answers_without_a_body(agent: AgentProcess) -> None:
    with agent.client() as c:
        resp = c.head("/v1/status")
    assert resp.status_code == 200
    assert int(resp.headers["content-length"]) > 0
    assert resp.content == b""


def test_openapi_document_is_served_and_its_snapshot_schema_matches_the_docs(
    agent: AgentProcess,
) -> None:
    with agent.client() as c:
        served = c.get("/v1/openapi.json").json()
    doc = openapi_document()
    assert served == doc
    assert doc["openapi"].startswith("3.1")
    import json

    docs = json.loads(SNAPSHOT_SCHEMA.read_text())
    names = {"rfc3339": "SnapshotTimestamp", "state": "SnapshotState", "node": "SnapshotNode",
             "path": "SnapshotPath", "probe": "SnapshotProbe"}

    def rewrite(obj: object) -> object:
        if isinstance(obj, dict):
            return {
                k: ("#/components/schemas/" + names[v.rsplit("/", 1)[-1]]) if k == "$ref"
                else rewrite(v)
                for k, v in obj.items()
            }
        if isinstance(obj, list):
            return [rewrite(v) for v in obj]
        return obj

    schemas = doc["components"]["schemas"]
    root = {k: v for k, v in docs.items() if k not in ("$schema", "$id", "$defs", "title")}
    assert schemas["Snapshot"] == rewrite(root)
    for key, name in names.items():
        assert schemas[name] == rewrite(docs["$defs"][key]), name
    # The same for the mesh matrix (docs/mesh.schema.json).
    docs = json.loads((SNAPSHOT_SCHEMA.parent / "mesh.schema.json").read_text())
    names = {"rfc3339": "MeshTimestamp", "name": "MeshName", "cell": "MeshCell",
             "verdict": "MeshVerdict"}
    root = {k: v for k, v in docs.items() if k not in ("$schema", "$id", "$defs", "title")}
    assert schemas["Mesh"] == rewrite(root)
    for key, name in names.items():
        assert schemas[name] == rewrite(docs["$defs"][key]), name


@pytest.mark.anyio
async def test_concurrent_probe_requests_share_one_round(tmp_path: Path) -> None:
    # A peer that accepts and never answers holds each round open for the probe timeout, so
    # five requests sent together all arrive while one round runs (refused peers alone end a
    # round in a millisecond, before the last request is even read).
    port = free_port()
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.6", port))
    silent.listen(64)
    peers = LIVE_PEER + ', {name = "silent", addresses = ["127.0.0.6"]}'
    sock = tmp_path / "health.sock"
    bodies: list[bytes] = []
    try:
        with AgentProcess(tmp_path, agent_config(str(sock), port, peers=peers, timeout="800ms"),
                          socket_path=sock) as agent:
            agent.wait_serving()
            transport = httpx.AsyncHTTPTransport(uds=str(sock))
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                         timeout=10) as c:

                async def probe() -> None:
                    resp = await c.post("/v1/probe")
                    assert resp.status_code == 200
                    bodies.append(resp.content)

                with anyio.fail_after(15):
                    async with anyio.create_task_group() as tg:
                        for _ in range(5):
                            tg.start_soon(probe)
                    started = anyio.current_time()
                    await probe()  # after the shared round ended: a round of its own
                    assert anyio.current_time() - started >= 0.7  # it waited on the silent peer
    finally:
        silent.close()
    assert len(bodies) == 6
    assert len(set(bodies[:5])) == 1  # one round, one answer
    assert bodies[5] != bodies[0]


# --- the socket file --------------------------------------------------------------------


def test_socket_is_0660_and_removed_on_clean_exit(tmp_path: Path) -> None:
    sock = tmp_path / "health.sock"
    port = free_port()
    agent = AgentProcess(tmp_path, agent_config(str(sock), port, peers=LIVE_PEER),
                         socket_path=sock)
    with agent:
        agent.wait_serving()
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert (tmp_path / "health.sock.lock").exists()
        assert agent.stop() == 0
    assert not sock.exists()
    assert not (tmp_path / "health.sock.lock").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hm")]


def test_mode_and_group_come_from_the_config(tmp_path: Path) -> None:
    import grp

    other = next((g for g in grp.getgrall() if g.gr_gid != os.getgid()), None)
    if other is None:
        require("no group other than our own on this host")
    sock = tmp_path / "health.sock"
    config = agent_config(str(sock), free_port(), peers=LIVE_PEER,
                          api_extra=f'mode = "0600"\ngroup = "{other.gr_name}"\n')
    with AgentProcess(tmp_path, config, socket_path=sock) as agent:
        agent.wait_serving()
        st = os.lstat(sock)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_gid == other.gr_gid


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "health.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays; nobody listens: what a killed agent leaves behind
    old_inode = os.lstat(sock).st_ino
    with AgentProcess(tmp_path, agent_config(str(sock), free_port(), peers=LIVE_PEER),
                      socket_path=sock) as agent:
        agent.wait_serving()
        assert os.lstat(sock).st_ino != old_inode
        assert "stale socket" in agent.log()


def test_second_agent_on_the_same_socket_refuses_instead_of_stealing_it(tmp_path: Path) -> None:
    sock = tmp_path / "health.sock"
    first = AgentProcess(tmp_path, agent_config(str(sock), free_port(), peers=LIVE_PEER),
                         socket_path=sock, name="first")
    with first:
        first.wait_serving()
        inode = os.lstat(sock).st_ino
        second = AgentProcess(
            tmp_path,
            agent_config(str(sock), free_port(), peers=LIVE_PEER, listen=("127.0.0.1",)),
            socket_path=sock, name="second",
        ).start()
        assert second.proc is not None
        assert second.proc.wait(30) == 2
        errors = [line for line in second.log().splitlines() if "error" in line]
        assert len(errors) == 1, second.log()
        assert str(sock) in errors[0]
        assert "in use by another healthmesh agent" in errors[0]
        assert f"pid {first.proc.pid}" in errors[0]  # type: ignore[union-attr]
        assert "Traceback" not in second.log()
        # The first agent keeps its socket and keeps answering.
        assert os.lstat(sock).st_ino == inode
        with first.client() as c:
            assert c.get("/v1beta/healthz").status_code == 200


def test_a_live_foreign_listener_is_not_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "health.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(sock))
    other.listen(1)
    try:
        agent = AgentProcess(tmp_path, agent_config(str(sock), free_port(), peers=LIVE_PEER),
                             socket_path=sock).start()
        assert agent.proc is not None and agent.proc.wait(30) == 2
        assert "in use by another process" in agent.log()
        assert f"pid {os.getpid()}" in agent.log()
        assert sock.exists()
    finally:
        other.close()


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    sock = tmp_path / "health.sock"
    sock.write_text("precious")
    agent = AgentProcess(tmp_path, agent_config(str(sock), free_port(), peers=LIVE_PEER),
                         socket_path=sock).start()
    assert agent.proc is not None and agent.proc.wait(30) == 2
    assert "is not a socket" in agent.log()
    assert sock.read_text() == "precious"


def test_healthmesh_sock_sets_the_default_path(tmp_path: Path) -> None:
    sock = tmp_path / "from-env.sock"
    config = agent_config(None, free_port(), peers=LIVE_PEER)
    with AgentProcess(tmp_path, config, socket_path=sock,
                      env={"HEALTHMESH_SOCK": str(sock)}) as agent:
        agent.wait_serving()
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('mode = "0999"', "outputs.api.mode: '0999' is not an octal mode"),
        ("mode = 0o7777", "outputs.api.mode: 0o7777 is out of range"),
        ('group = "no-such-group-hm"', "outputs.api.group: no group named 'no-such-group-hm'"),
        (f'socket = "/run/{"x" * 120}.sock"', "outputs.api.socket:"),
    ],
)
def test_bad_api_settings_are_config_errors(tmp_path: Path, extra: str, message: str) -> None:
    from tests.conftest import run_cli

    cfg = tmp_path / "bad.toml"
    cfg.write_text(agent_config(None, free_port(), peers=LIVE_PEER, api_extra=extra + "\n"))
    proc = run_cli("config", "check", "-c", str(cfg))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
