"""The local API against a hostile local client: idle floods, half-written and malformed
requests, oversized ones, a full cap, SIGTERM mid-request. Real agents, real unix sockets."""

from __future__ import annotations

import json
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from healthmesh.plugins.api.app import ApiApp
from tests.agentproc import AgentProc
from tests.conftest import run_cli
from tests.test_api_support import (
    LIVE_PEER,
    AgentProcess,
    agent_config,
    free_port,
    response_validator,
)

#: The idle timeout of the module's agent: short, so that closing can be watched.
IDLE = 1.0


def connect(path: str | Path, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the agent closes (each recv bounded by the socket's timeout)."""
    chunks = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def exchange(path: str | Path, data: bytes, timeout: float = 5.0) -> bytes:
    with connect(path, timeout) as s:
        s.sendall(data)
        return read_all(s)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one HTTP/1.1 response."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response: {raw[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest[: int(headers["content-length"])]


def assert_json_error(raw: bytes, status: int) -> dict[str, Any]:
    got, headers, body = parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/json", headers
    doc = json.loads(body)
    # /v1's shape, go-swagger's (/v1beta), or both: always one line saying what is wrong.
    message = doc.get("error") or doc.get("message")
    assert isinstance(message, str) and message and "\n" not in message, doc
    if "code" in doc:
        assert doc["code"] == status
    return doc


def _module_agent(tmp: Path, api_extra: str) -> Iterator[AgentProcess]:
    sock = tmp / "health.sock"
    config = agent_config(str(sock), free_port(), peers=LIVE_PEER, api_extra=api_extra)
    proc = AgentProcess(tmp, config, socket_path=sock)
    proc.start()
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()
        assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """An agent with the default limits."""
    yield from _module_agent(tmp_path_factory.mktemp("hostile"), "")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """An agent whose idle timeout is short enough to watch."""
    yield from _module_agent(tmp_path_factory.mktemp("quick"), f'idle_timeout = "{IDLE:g}s"\n')


# --- idle floods and the cap ------------------------------------------------------------------


def test_600_idle_connections_do_not_lock_out_status(tmp_path: Path) -> None:
    sock = tmp_path / "health.sock"
    config = agent_config(str(sock), free_port(), peers=LIVE_PEER)  # default limits
    idle: list[socket.socket] = []
    with AgentProcess(tmp_path, config, socket_path=sock) as agent:
        agent.wait_serving()
        agent.wait_rounds(1)
        try:
            for _ in range(600):  # more than the default cap of 512, each sending nothing
                idle.append(connect(sock))
            started = time.monotonic()
            proc = run_cli("status", "-H", f"unix://{sock}", timeout=20)
            took = time.monotonic() - started
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "reachable" in proc.stdout
            assert took < 15
            # The oldest idle connections made room: the agent holds no more than its cap.
            for s in idle[: 600 - 512]:
                s.settimeout(5.0)
                assert s.recv(1) == b""
        finally:
            for s in idle:
                s.close()
        assert "Traceback" not in agent.log()


def test_503_at_the_cap_when_every_connection_has_a_request_in_progress(
    tmp_path: Path,
) -> None:
    # A peer that accepts and never answers holds a probe round open for the timeout, so
    # the 4 PUT /v1beta/status/probe requests are all in progress when the 5th connects.
    port = free_port()
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.6", port))
    silent.listen(64)
    peers = LIVE_PEER + ', {name = "silent", addresses = ["127.0.0.6"]}'
    sock = tmp_path / "health.sock"
    config = agent_config(str(sock), port, peers=peers, interval="10s", timeout="3s",
                          api_extra="max_connections = 4\n")
    try:
        with AgentProcess(tmp_path, config, socket_path=sock) as agent:
            agent.wait_serving()
            busy = [connect(sock, timeout=10) for _ in range(4)]
            try:
                for s in busy:
                    s.sendall(b"PUT /v1beta/status/probe HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                time.sleep(0.5)  # let the agent read all four
                refused = exchange(sock, b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                doc = assert_json_error(refused, 503)
                assert "4 connections" in doc["error"]
                for s in busy:  # the requests in progress are answered in full
                    status, _, _ = parse(read_all(s))
                    assert status == 200
            finally:
                for s in busy:
                    s.close()
            # Once they are answered there is room again.
            with agent.client() as c:
                assert c.get("/v1/healthz").status_code == 200
            assert "Traceback" not in agent.log()
    finally:
        silent.close()


# --- deadlines ----------------------------------------------------------------------------


def test_idle_and_half_written_connections_are_closed_after_the_timeout(
    quick: AgentProcess,
) -> None:
    sock = quick.socket_path
    silent = connect(sock)  # connects and sends nothing
    half = connect(sock)
    half.sendall(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n")  # never ends its head
    kept = connect(sock)  # one request answered, then kept alive and idle
    kept.sendall(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    try:
        assert silent.recv(65536) == b""
        t_silent = time.monotonic() - started
        assert_json_error(read_all(half), 408)
        t_half = time.monotonic() - started
        status, _, _ = parse(kept.recv(65536))
        assert status == 200
        assert read_all(kept) == b""
        t_kept = time.monotonic() - started
    finally:
        for s in (silent, half, kept):
            s.close()
    for took in (t_silent, t_half, t_kept):
        assert IDLE * 0.9 <= took < IDLE + 4  # closed by the deadline, not before it


def test_a_request_trickled_in_does_not_extend_the_deadline(quick: AgentProcess) -> None:
    request = b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    answer = b""
    with connect(quick.socket_path) as s:
        started = time.monotonic()
        for byte in request:  # one byte every 50 ms: 10 s in all, far past the deadline
            readable, _, _ = select.select([s], [], [], 0.05)
            if readable:  # the agent answered (408) and closed
                answer = read_all(s)
                break
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
        closed = time.monotonic() - started
    assert closed < IDLE + 4, "the trickling client was not cut off"
    assert_json_error(answer, 408)


def test_a_client_that_pipelines_and_never_reads_is_cut_off(quick: AgentProcess) -> None:
    import psutil

    assert quick.proc is not None
    proc = psutil.Process(quick.proc.pid)

    def open_conns() -> int:
        # The listener and its accepted connections: the only named unix sockets of the agent
        # (named after the private path the socket was bound at before its rename).
        return sum(bool(c.laddr) for c in proc.net_connections("unix"))

    # Connections left by earlier tests on this agent are closed by its idle deadline at the
    # latest: wait for the listener alone, so that the count below is this test's connection.
    settled = time.monotonic() + IDLE + 6
    while open_conns() > 1:
        assert time.monotonic() < settled, "earlier tests' connections were never closed"
        time.sleep(0.05)
    before, rss = open_conns(), proc.memory_info().rss
    # Thousands of requests whose answers would be megabytes if all were buffered.
    requests = b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n" * 20000
    with connect(quick.socket_path, timeout=0.25) as s:
        deadline = time.monotonic() + 5
        while open_conns() < before + 1:
            assert time.monotonic() < deadline, "the connection was never accepted"
            time.sleep(0.02)
        sent = 0
        started = time.monotonic()
        while sent < len(requests) and time.monotonic() - started < 2:
            try:
                sent += s.send(requests[sent : sent + 65536])
            except TimeoutError:
                pass  # the agent stopped reading: what should happen
            except (BrokenPipeError, ConnectionResetError):
                break
        # Never reading, the client is cut off after the idle timeout (its answer unread).
        while open_conns() > before:
            assert time.monotonic() - started < IDLE + 6, "the non-reading client was kept"
            time.sleep(0.1)
        grown = proc.memory_info().rss - rss
    assert grown < 8 * 1024 * 1024, f"the agent grew by {grown / 1e6:.1f} MB"


# --- every error is JSON --------------------------------------------------------------------

BIG_HEADER = b"X-Big: " + b"a" * 20000 + b"\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", 400, id="not-http"),
        pytest.param(b"GET /v1/healthz HTTP/1.1\r\nHost x\r\n\r\n", 400, id="bad-header"),
        pytest.param(b"GET /v1/healthz HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
                     b"\r\n", 400, id="two-lengths"),
        pytest.param(b"GET /v1/\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="non-ascii-path"),
        pytest.param(b"GET /v1/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404,
                     id="404"),
        pytest.param(b"GET /v1beta/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404,
                     id="404-v1beta"),
        pytest.param(b"DELETE /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405,
                     id="405"),
        pytest.param(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n" + BIG_HEADER + b"\r\n", 431,
                     id="431-headers"),
        pytest.param(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n" + BIG_HEADER, 431,
                     id="431-incomplete-head"),
        pytest.param(b"GET /v1/nodes?" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n", 414, id="414-query"),
        pytest.param(b"PUT /v1beta/status/probe HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 100000\r\n\r\n", 413, id="413-body"),
        pytest.param(b"POST /v1/probe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                     411, id="411-chunked"),
    ],
)
def test_every_error_reply_is_json(agent: AgentProcess, request_bytes: bytes, status: int) -> None:
    assert_json_error(exchange(agent.socket_path, request_bytes), status)
    assert "Traceback" not in agent.log()


def test_documented_error_shapes(agent: AgentProcess) -> None:
    with agent.client() as c:
        bad = c.get("/v1/nodes", params={"state": "sideways"})
        beta = c.get("/v1beta/nope")
    response_validator("/v1/nodes", "GET", 400).validate(bad.json())
    assert beta.json() == {"code": 404, "message": "no such path: /v1beta/nope"}


# --- shutdown -------------------------------------------------------------------------------


def test_sigterm_during_a_slow_probe_request_answers_cleanly(tmp_path: Path) -> None:
    # A blackholed peer (accepts, never answers) makes PUT /v1beta/status/probe last the
    # probe timeout (4 s); SIGTERM arrives while the request is in progress.
    port = free_port()
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.6", port))
    silent.listen(64)
    sock = tmp_path / "health.sock"
    peers = LIVE_PEER + ', {name = "silent", addresses = ["127.0.0.6"]}'
    config = tmp_path / "agent.toml"
    config.write_text(agent_config(str(sock), port, peers=peers, interval="10s", timeout="4s"))
    answer: dict[str, Any] = {}

    def probe() -> None:
        try:
            answer["raw"] = exchange(
                sock, b"PUT /v1beta/status/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                b"\r\n", timeout=10)
        except OSError as exc:
            answer["error"] = exc

    try:
        with AgentProc(config, "--log-level", "INFO") as agent:
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert time.monotonic() < deadline, agent.stderr()
                assert agent.proc.poll() is None, agent.stderr()
                time.sleep(0.02)
            time.sleep(0.3)  # serving: the socket is renamed into place once listening
            asker = threading.Thread(target=probe)
            asker.start()
            time.sleep(1.0)  # the request is read and its round waits on the silent peer
            assert asker.is_alive(), answer
            code, took = agent.stop(signal.SIGTERM, timeout=8)
            asker.join(10)
            stderr = agent.stderr()
    finally:
        silent.close()
    assert code == 0, stderr
    assert took < 5, stderr
    assert "Traceback" not in stderr and "KeyError" not in stderr, stderr
    assert "error" not in answer, answer
    raw = answer["raw"]
    if raw:  # a clean answer; a clean close (no bytes) is fine too
        doc = assert_json_error(raw, 503)
        assert "shutting down" in doc["message"]
    assert not sock.exists()


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("max_connections = 1", "outputs.api.max_connections: 1 is out of range (4 to 65536)"),
        ("max_connections = 10000000", "outputs.api.max_connections: 10000000 is out of range"),
        ('idle_timeout = "1ms"', "outputs.api.idle_timeout: '1ms' is out of range"),
        ('idle_timeout = "1000h"',
         "outputs.api.idle_timeout: '1000h' is longer than the limit of 24h"),
        ("max_header_bytes = 10", "outputs.api.max_header_bytes: 10 is out of range"),
        ("max_body_bytes = -1", "outputs.api.max_body_bytes: -1 is out of range"),
        ('max_connections = "many"', "outputs.api.max_connections"),
    ],
)
def test_absurd_limits_are_config_errors(tmp_path: Path, extra: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(agent_config(None, free_port(), peers=LIVE_PEER, api_extra=extra + "\n"))
    proc = run_cli("config", "check", "-c", str(cfg))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr


# --- component states in /v1/healthz ----------------------------------------------------------


def test_v1_healthz_reports_component_states(agent: AgentProcess) -> None:
    with agent.client() as c:
        doc = c.get("/v1/healthz").json()
    response_validator("/v1/healthz", "GET", 200).validate(doc)
    assert doc["status"] in ("ok", "degraded", "failed")
    assert isinstance(doc["components"], list)


class _Context:
    """An AgentContext with given component states, for the route's own logic (unknown states
    included, which a real agent never reports)."""

    def __init__(self) -> None:
        self.started_at = time.time() - 3723

    local_node = type("N", (), {"name": "me", "cluster": "default"})()

    def components(self) -> list[dict[str, Any]]:
        return [
            {"name": "responder", "state": "ok", "message": "", "restarts": 0,
             "since": "2026-12-01T10:00:00Z"},
            {"name": "source:file", "state": "degraded", "restarts": 2,
             "message": "restarted after: OSError", "since": "2026-12-01T10:05:00Z"},
            {"name": "weird", "state": "sideways", "message": "", "since": "", "restarts": 0},
        ]


def test_v1_healthz_status_is_the_worst_component_state() -> None:
    views = type("V", (), {"rounds_completed": 3})()
    app = ApiApp(_Context(), views, runner=None)  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []

    async def call() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        with anyio.fail_after(5):
            await app({"type": "http", "method": "GET", "path": "/v1/healthz",
                       "query_string": b"", "headers": []}, receive, send)

    anyio.run(call)
    assert sent[0]["status"] == 200
    doc = json.loads(sent[1]["body"])
    response_validator("/v1/healthz", "GET", 200).validate(doc)
    # An unknown state counts as failed: the worst wins.
    assert doc["status"] == "failed"
    assert [c["state"] for c in doc["components"]] == ["ok", "degraded", "failed"]
    assert doc["components"][1]["restarts"] == 2
    assert doc["uptime"].startswith("1h2m")
