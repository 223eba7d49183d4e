"""A real agent with service checks: the snapshot's checks, /v1/checks, and ``status``."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import run_cli
from tests.dns_fixtures import dnsmasq
from tests.test_api_support import (
    AgentProcess,
    agent_config,
    free_port,
    response_validator,
    snapshot_validator,
)

PEER = '{name = "peer", addresses = ["127.0.0.2"]}'


def checks_config(sock: Path | None, port: int, dns_server: str, later_port: int) -> str:
    text = agent_config(str(sock) if sock else None, port, peers=PEER)
    return text + f"""
[checks.cluster-dns]
kind = "dns"
server = "{dns_server}"
names = ["ok.test"]
interval = "500ms"
timeout = "300ms"
confirm_spacing = "50ms"

[checks.responder]
kind = "tcp"
targets = ["127.0.0.1:{port}"]
interval = "1s"

[checks.later]
kind = "http"
targets = ["http://127.0.0.1:{later_port}/"]
interval = "300ms"
timeout = "200ms"
confirm_spacing = "20ms"
"""


class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return


def checks_of(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    with agent.client() as c:
        body = c.get("/v1/checks").json()
    return {ch["name"]: ch for ch in body["checks"]}


def wait_checks(agent: AgentProcess, want: dict[str, str], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        seen = {n: c["state"] for n, c in checks_of(agent).items()}
        if all(seen.get(n) == s for n, s in want.items()):
            return
        time.sleep(0.05)
    raise AssertionError(f"checks {seen}, wanted {want}; log:\n{agent.log()}")


def status(sock: Path, *args: str) -> Any:
    return run_cli("status", "-H", f"unix://{sock}", *args, timeout=30)


def test_agent_reports_checks_apart_from_nodes(tmp_path: Path) -> None:
    sock = tmp_path / "health.sock"
    port, later_port = free_port(), free_port()
    with dnsmasq(tmp_path) as dns_server, AgentProcess(
        tmp_path, checks_config(sock, port, dns_server.server, later_port), socket_path=sock
    ) as agent:
        agent.wait_serving()
        wait_checks(agent, {"cluster-dns": "ok", "responder": "ok", "later": "failing"})

        with agent.client() as c:
            snap = c.get("/v1/status").json()
            body = c.get("/v1/checks").json()
        snapshot_validator().validate(snap)
        response_validator("/v1/checks", "GET", 200).validate(body)
        assert [ch["name"] for ch in body["checks"]] == ["cluster-dns", "responder", "later"]
        assert snap["summary"]["reachable"] == snap["summary"]["nodes"] == 2
        later = checks_of(agent)["later"]["targets"][0]
        assert later["error"] == "connect: connection refused"
        assert later["consecutive_failures"] >= 3  # confirmed before it was failing

        # Three layers, in order; a failing check with every node reachable exits 4.
        shown = status(sock)
        assert shown.returncode == 4, shown.stdout + shown.stderr
        out = shown.stdout
        assert out.index("Cluster health: 2/2 reachable") < out.index("Checks: 2/3 ok")
        if snap.get("components"):
            first = snap["components"][0]["name"]
            assert out.index(first[:1].upper() + first[1:] + ":") < out.index("Cluster health")
        assert "  later (http): failing" in out
        assert f"http://127.0.0.1:{later_port}/  failing  connect: connection refused" in out
        assert "  cluster-dns (dns, server " + dns_server.server + "): ok" in out
        verbose = status(sock, "--verbose")
        assert verbose.returncode == 4 and "consecutive failures" in verbose.stdout

        # The service comes up: the check turns ok, status exits 0.
        server = http.server.ThreadingHTTPServer(("127.0.0.1", later_port), Ok)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        try:
            wait_checks(agent, {"later": "ok"})
            ok = status(sock)
            assert ok.returncode == 0, ok.stdout
            assert "Checks: 3/3 ok" in ok.stdout
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)

        # DNS server paused: its check times out and fails; probing goes on, nodes reachable.
        with agent.client() as c:
            rounds = c.get("/v1/healthz").json()["rounds_completed"]
        dns_server.pause()
        try:
            wait_checks(agent, {"cluster-dns": "failing"})
            error = checks_of(agent)["cluster-dns"]["targets"][0]["error"]
            assert error.startswith(f"timeout: no answer from {dns_server.server}")
            agent.wait_rounds(rounds + 2)
            with agent.client() as c:
                summary = c.get("/v1/status").json()["summary"]
            assert summary["reachable"] == summary["nodes"] == 2
        finally:
            dns_server.resume()
        wait_checks(agent, {"cluster-dns": "ok"})


def test_run_once_reports_checks_and_exits_on_nodes_alone(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "once.toml"
    with dnsmasq(tmp_path) as dns_server:
        config.write_text(checks_config(None, port, dns_server.server, free_port()))
        result = run_cli("run", "-c", str(config), "--once", "-o", "json", timeout=60)
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    snapshot_validator().validate(snap)
    states = {ch["name"]: ch["state"] for ch in snap["checks"]}
    assert states == {"cluster-dns": "ok", "responder": "ok", "later": "failing"}
    assert snap["summary"]["reachable"] == snap["summary"]["nodes"] == 2
