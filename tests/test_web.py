"""``[outputs.web]`` over real TCP against a real agent: endpoints, the mesh contract, safe
headers, read-only, basic and bearer auth, config errors; and the history ring's bounds."""

from __future__ import annotations

import base64
import http.client
import json
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest

from healthmesh.plugins.web.history import History
from healthmesh.plugins.web.mesh import cell_of, compact, local_mesh
from tests.agentproc import free_port
from tests.conftest import ROOT, run_cli
from tests.web_support import PEERS, web_config, web_mesh

SAFE = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def request(host_port: str, path: str, method: str = "GET",
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = host_port.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def assert_safe(headers: dict[str, str]) -> None:
    for name, value in SAFE.items():
        assert headers.get(name) == value, (name, headers)
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["cache-control"] in ("no-store", "no-cache")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with web_mesh(tmp_path_factory.mktemp("web")) as m:
        m.agent.wait_for(lambda d: d["summary"]["reachable"] == 1 + len(PEERS), timeout=20)
        yield m


def test_the_assets_and_endpoints_answer_with_the_safe_headers(mesh: Any) -> None:
    for path, ctype in [("/", "text/html"), ("/app.js", "text/javascript"),
                        ("/app.css", "text/css"), ("/favicon.svg", "image/svg+xml"),
                        ("/api/mesh", "application/json"), ("/api/matrix", "application/json"),
                        ("/api/agent", "application/json"), ("/api/snapshot", "application/json"),
                        ("/api/history?node=default/n2", "application/json")]:
        status, headers, body = request(mesh.host_port, path)
        assert status == 200, (path, body)
        assert headers["content-type"].startswith(ctype), (path, headers)
        assert_safe(headers)
        assert int(headers["content-length"]) == len(body) > 0
    # The page loads nothing from anywhere else: no absolute URL in the HTML.
    html = request(mesh.host_port, "/")[2].decode()
    assert "http://" not in html and "https://" not in html and "//" not in html.replace(
        "<!doctype", "")
    # HEAD: the headers, no body.
    status, headers, body = request(mesh.host_port, "/api/agent", "HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_the_mesh_endpoint_keeps_the_contract(mesh: Any) -> None:
    doc = json.loads(request(mesh.host_port, "/api/mesh")[2])
    assert set(doc) >= {"timestamp", "observers", "targets", "cells", "verdicts", "local_only"}
    names = ["default/n1", *(f"{c}/{n}" for n, c, _a in PEERS)]
    assert sorted(doc["targets"]) == sorted(names)
    assert "default/n1" in doc["observers"]
    for target in names:
        c = doc["cells"]["default/n1"][target]
        assert c["state"] == "reachable"
        assert c["kinds"] == {"http": "reachable"}
        assert isinstance(c["rtt_ms"], float) and c["rtt_ms"] > 0
    matrix = json.loads(request(mesh.host_port, "/api/matrix")[2])
    row = matrix["observers"].index("default/n1")
    assert matrix["rows"][row] == "r" * len(matrix["targets"])
    one = json.loads(request(mesh.host_port, "/api/cell?observer=default/n1&target=east/n4")[2])
    assert one["state"] == "reachable" and one["target"] == "east/n4"


def test_the_snapshot_endpoint_is_the_snapshot_contract(mesh: Any) -> None:
    schema = json.loads((ROOT / "docs/snapshot.schema.json").read_text())
    doc = json.loads(request(mesh.host_port, "/api/snapshot")[2])
    jsonschema.validate(doc, schema)
    agent = json.loads(request(mesh.host_port, "/api/agent")[2])
    assert agent["interval_s"] == 1.0
    assert {c["name"] for c in agent["components"]} >= {"outputs.web", "responder"}
    assert agent["stale_after_s"] >= 3 * agent["interval_s"]
    assert agent["history"]["points_per_path"] == 3600  # an hour at 1 s (max_points caps it)


def test_history_grows_one_point_per_round(mesh: Any) -> None:
    def points() -> int:
        doc = json.loads(request(mesh.host_port, "/api/history?node=east/n4")[2])
        (path,) = doc["paths"]
        assert (path["address"], path["kind"]) == ("127.0.0.4", "http")
        return len(path["points"]["t"])

    before = points()
    mesh.agent.next_doc(timeout=10)
    mesh.agent.next_doc(timeout=10)
    assert points() >= before + 1


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_the_page_is_read_only(mesh: Any, method: str) -> None:
    status, headers, body = request(mesh.host_port, "/api/mesh", method)
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert "read-only" in json.loads(body)["error"]
    assert_safe(headers)


def test_unknown_paths_and_bad_queries(mesh: Any) -> None:
    assert request(mesh.host_port, "/etc/passwd")[0] == 404
    assert request(mesh.host_port, "/../app.js")[0] == 404
    assert request(mesh.host_port, "/api/history")[0] == 400
    assert request(mesh.host_port, "/api/history?node=%ff")[0] == 400
    assert request(mesh.host_port, "/api/cell?observer=a/b&target=c/d")[0] == 404
    assert request(mesh.host_port, "/api/mesh?" + "a" * 3000)[0] == 414


def test_basic_auth_and_bearer_token(tmp_path: Path) -> None:
    web = 'username = "ops"\npassword = "s3cret"\ntoken = "t0ken-abc"'
    with web_mesh(tmp_path, web=web) as m:
        def basic(user: str, password: str) -> dict[str, str]:
            raw = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {raw}"}

        for path in ("/", "/app.js", "/api/mesh", "/nope"):
            status, headers, _ = request(m.host_port, path)
            assert status == 401, path
            assert headers["www-authenticate"].startswith('Basic realm="healthmesh"')
            assert_safe(headers)
        assert request(m.host_port, "/api/mesh", headers=basic("ops", "s3cret"))[0] == 200
        assert request(m.host_port, "/", headers=basic("ops", "s3cret"))[0] == 200
        assert request(m.host_port, "/api/mesh", headers=basic("ops", "wrong"))[0] == 401
        assert request(m.host_port, "/api/mesh", headers=basic("root", "s3cret"))[0] == 401
        assert request(m.host_port, "/api/mesh",
                       headers={"Authorization": "Basic !!!"})[0] == 401
        bearer = {"Authorization": "Bearer t0ken-abc"}
        assert request(m.host_port, "/api/agent", headers=bearer)[0] == 200
        assert request(m.host_port, "/api/agent",
                       headers={"Authorization": "Bearer t0ken-abd"})[0] == 401


@pytest.mark.parametrize("web,expected", [
    ('listen = "localhost:9968"', "outputs.web.listen: 'localhost' is not an IP address"),
    ('listen = "127.0.0.1:99999"', "outputs.web.listen: '99999' is not a TCP port"),
    ('username = "ops"', "outputs.web.password: required with username"),
    ('max_connections = 1', "outputs.web.max_connections: 1 is out of range"),
    ('history = "10s"', "outputs.web.history: '10s' is out of range"),
    ('colour = "red"', "colour"),
])
def test_config_errors_name_the_key(tmp_path: Path, web: str, expected: str) -> None:
    config = web_config(tmp_path, free_port(), web=web)
    text = config.read_text().replace('listen = "127.0.0.1:0"\n', "") if "listen" in web \
        else config.read_text()
    config.write_text(text)
    proc = run_cli("config", "check", "-c", str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2


def test_a_port_in_use_is_a_one_line_start_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = web_config(tmp_path, free_port())
        config.write_text(config.read_text().replace(
            'listen = "127.0.0.1:0"\n', f'listen = "127.0.0.1:{port}"\n', 1))
        proc = run_cli("run", "-c", str(config), timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"outputs.web: cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_demo_config_logs_the_url_and_serves_the_demo_mesh(tmp_path: Path) -> None:
    """``make demo``'s config (examples/loopback.toml, on free ports)."""
    from tests.agentproc import AgentProc
    from tests.test_run import loopback_config
    from tests.web_support import wait_for_url

    with AgentProc(loopback_config(tmp_path, free_port())) as agent:
        url = wait_for_url(agent)
        host_port = url.split("//")[1].rstrip("/")
        agent.wait_for(lambda d: d["summary"]["reachable"] == 5, timeout=20)
        agent.next_doc(timeout=10)
        matrix = json.loads(request(host_port, "/api/matrix")[2])
        assert matrix["observers"] == ["default/demo-1"]
        assert len(matrix["targets"]) == 5 and "east/demo-5" in matrix["targets"]
        assert matrix["rows"] == ["rrrrr"]
        assert request(host_port, "/")[0] == 200


# --- the pieces, without an agent -------------------------------------------------------------


def test_listen_addresses_and_urls() -> None:
    from healthmesh.plugins.web.settings import parse_web_listen, url_of

    assert parse_web_listen("127.0.0.1:9968") == ("127.0.0.1", 9968)
    assert parse_web_listen("[::1]:0") == ("::1", 0)
    assert url_of("::", 9968) == "http://[::1]:9968/"
    assert url_of("0.0.0.0", 80) == "http://127.0.0.1:80/"
    for bad in ("::1:9968", "[::1]9968", "127.0.0.1", "host:1"):
        with pytest.raises(ValueError, match="listen"):
            parse_web_listen(bad)


def _snapshot(n: int, t: str, state: str = "reachable") -> dict[str, Any]:
    view = {"state": state, "rtt_ms": 0.5 if state == "reachable" else None,
            "loss_pct": 0.0, "error": None, "last_change": t}
    return {
        "timestamp": t, "interval_s": 1.0, "local": {"name": "n0", "cluster": "default"},
        "nodes": [{"name": f"n{i}", "cluster": "default", "state": state, "paths": [
            {"address": f"10.0.{i // 250}.{i % 250}", "role": "host", "primary": True,
             "probes": {"http": view, "icmp": view}}]} for i in range(n)],
    }


def test_the_history_ring_is_bounded_and_keeps_transitions() -> None:
    h = History(history_s=60.0, max_points=3600)  # 60 points at 1 s
    for k in range(150):
        state = "unreachable" if 100 <= k < 110 else "reachable"
        h.record(_snapshot(3, f"2026-01-01T00:{k // 60:02d}:{k % 60:02d}Z", state),
                 point=True)
    assert h.capacity == 60
    (path,) = [p for p in h.of_node("default/n1") if p["kind"] == "http"]
    assert len(path["points"]["t"]) == 60  # the newest 60 of 150
    assert path["points"]["t"] == sorted(path["points"]["t"])
    assert [(t["from"], t["to"]) for t in path["transitions"]] == [
        ("reachable", "unreachable"), ("unreachable", "reachable")]
    assert path["points"]["rtt_ms"][-1] == 0.5
    # 17 bytes a point: float64 time, float32 RTT and loss, one byte of state.
    assert h.nbytes() == 6 * 60 * 17


def test_history_memory_per_path_is_what_the_docs_say() -> None:
    import tracemalloc

    h = History(history_s=3600.0, max_points=3600)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        h.record({**_snapshot(500, "2026-01-01T00:00:00Z"), "interval_s": 30.0}, point=True)
        per_ring = (tracemalloc.get_traced_memory()[0] - base) / len(h.rings)
    finally:
        tracemalloc.stop()
    assert h.capacity == 120
    # docs/web.md: 120 points × 17 bytes = 2,040 bytes, plus under 1 KiB of fixed overhead.
    assert 120 * 17 <= per_ring <= 120 * 17 + 1024, per_ring


def test_the_local_row_fallback_has_the_mesh_shape() -> None:
    data = _snapshot(2, "2026-01-01T00:00:00Z")
    bad = {"state": "unreachable", "rtt_ms": None, "loss_pct": 100.0}
    data["nodes"][1]["paths"][0]["probes"]["http"] = bad  # ICMP answers, HTTP does not
    mesh = local_mesh(data)
    assert mesh["observers"] == ["default/n0"] and mesh["local_only"] is True
    assert mesh["targets"] == ["default/n0", "default/n1"]
    assert mesh["verdicts"] == []
    cells = mesh["cells"]["default/n0"]
    assert cells["default/n0"]["state"] == "reachable"
    assert cells["default/n1"] == {"state": "degraded",
                                   "kinds": {"http": "unreachable", "icmp": "reachable"},
                                   "rtt_ms": 0.5, "loss_pct": 100.0}
    assert compact(mesh)["rows"] == ["rd"]
    # Every kind down: unreachable; nothing probed yet: unknown.
    node = {"paths": [{"primary": True, "role": "host", "probes": {"http": bad, "icmp": bad}}]}
    assert cell_of(node)["state"] == "unreachable"
    assert cell_of({"paths": []})["state"] == "unknown"


@pytest.mark.anyio
async def test_snapshots_arriving_during_a_build_are_coalesced() -> None:
    """The output returns at once; the builder serves the newest snapshot, not every one."""
    import anyio

    from healthmesh import Snapshot
    from healthmesh.plugins.web.output import Store
    from healthmesh.plugins.web.settings import WebSettings

    context: Any = SimpleNamespace(config=SimpleNamespace(components={}))
    store = Store(context, WebSettings())
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.builder)
        for k in range(50):  # a burst, as state changes every few ms would be
            store.publish(Snapshot(_snapshot(200, f"2026-01-01T00:00:{k:02d}Z")),
                          point=False)
            await anyio.sleep(0.002)
        with anyio.fail_after(10):
            while store.current is None or json.loads(store.current.matrix)[
                    "timestamp"] != "2026-01-01T00:00:49Z":
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert 1 <= store.builds < 50


def test_transitions_come_from_events_once_the_agent_sends_them() -> None:
    """A flap between two snapshots is two events; both are kept, at their own times."""
    from healthmesh import Event

    h = History(history_s=60.0, max_points=100)
    h.record(_snapshot(2, "2026-01-01T00:00:00Z"), point=True)

    def event(seq: int, t: str, before: str, after: str, reason: str) -> Event:
        return Event(seq=seq, time=t, type="path", node="n1", cluster="default",
                     path="10.0.0.1", role="host", kind="http", from_=before, to=after,
                     reason=reason, observer="default/n0")

    h.event(event(1, "2026-01-01T00:00:01.200Z", "reachable", "unreachable", "timeout"))
    h.event(event(2, "2026-01-01T00:00:01.700Z", "unreachable", "reachable", "recovered"))
    node_event = Event(seq=3, time="2026-01-01T00:00:01.700Z", type="node", node="n1",
                       cluster="default", path=None, role=None, kind=None, from_="reachable",
                       to="unreachable", reason="x", observer="default/n0")
    h.event(node_event)  # node events are not a path's history
    # The next snapshot shows reachable again: no transition of its own is added.
    h.record(_snapshot(2, "2026-01-01T00:00:02Z"), point=True)
    (path,) = [p for p in h.of_node("default/n1") if p["kind"] == "http"]
    assert [(t["from"], t["to"], t["error"]) for t in path["transitions"]] == [
        ("reachable", "unreachable", "timeout"), ("unreachable", "reachable", "recovered")]
    assert path["transitions"][0]["at"] == 1767225601.2
    assert len(path["points"]["t"]) == 2
