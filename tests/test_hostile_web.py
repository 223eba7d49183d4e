"""``[outputs.web]`` against a hostile client on loopback: garbage, oversized and trickled
requests, bodies, idle connections past the cap, pipelining and a bounded request flood.
The agent must answer every one within its limits and go on serving and probing."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_web import request
from tests.web_support import PEERS, web_mesh

CAP = 8
IDLE = 1.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    web = f'max_connections = {CAP}\nidle_timeout = "{IDLE:g}s"\nmax_header_bytes = 2048'
    with web_mesh(tmp_path_factory.mktemp("hostile-web"), web=web) as m:
        m.agent.wait_for(lambda d: d["summary"]["reachable"] == 1 + len(PEERS), timeout=20)
        yield m
        # Whatever happened, the agent still serves and probes, and logged no traceback.
        assert request(m.host_port, "/api/agent")[0] == 200
        m.agent.next_doc(timeout=10)
        assert "Traceback" not in m.agent.stderr()


def connect(mesh: Any, timeout: float = 5.0) -> socket.socket:
    host, port = mesh.host_port.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes (each recv bounded by the socket's timeout)."""
    chunks = []
    while data := s.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def exchange(mesh: Any, data: bytes) -> bytes:
    with connect(mesh) as s:
        s.sendall(data)
        return read_all(s)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02 GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET /\r\n\r\n",
    b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost : b\r\n\r\n",
])
def test_garbage_gets_400_and_a_close(mesh: Any, garbage: bytes) -> None:
    raw = exchange(mesh, garbage)
    assert status_of(raw) == 400, raw[:200]
    assert b"x-content-type-options: nosniff" in raw


def test_another_http_version_gets_505(mesh: Any) -> None:
    assert status_of(exchange(mesh, b"GET / HTTP/9.9\r\nHost: a\r\n\r\n")) == 505


def test_an_oversized_head_gets_431(mesh: Any) -> None:
    raw = exchange(mesh, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
    assert status_of(raw) == 431, raw[:200]


def test_a_request_body_gets_413_unread(mesh: Any) -> None:
    raw = exchange(mesh, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert status_of(raw) == 413
    raw = exchange(mesh, b"POST /api/mesh HTTP/1.1\r\nHost: a\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert status_of(raw) == 413


def test_a_trickled_request_gets_408_at_the_deadline(mesh: Any) -> None:
    with connect(mesh) as s:
        started = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\n")
        raw = b""
        for _ in range(40):  # a byte every 0.1 s: never a complete head
            try:
                s.sendall(b"X")
            except OSError:
                break
            time.sleep(0.1)
            s.setblocking(False)
            try:
                raw += s.recv(65536)
            except BlockingIOError:
                pass
            s.setblocking(True)
            if raw:
                break
        s.settimeout(5)
        raw += read_all(s) if raw else b""
        took = time.monotonic() - started
    assert status_of(raw) == 408, raw[:200]
    assert IDLE * 0.9 <= took <= IDLE + 3.0, took


def test_idle_connections_past_the_cap_do_not_lock_the_page_out(mesh: Any) -> None:
    idle = [connect(mesh) for _ in range(5 * CAP)]
    try:
        started = time.monotonic()
        status, _, body = request(mesh.host_port, "/api/matrix")
        assert status == 200 and body
        assert time.monotonic() - started < 3
        # The oldest idle connections were closed to make room: at most the cap stay open.
        closed = 0
        for s in idle:
            s.settimeout(IDLE + 3)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except OSError:
                closed += 1
        assert closed == len(idle)  # evicted or timed out after IDLE, none kept forever
    finally:
        for s in idle:
            s.close()


def test_pipelined_requests_are_answered_in_order(mesh: Any) -> None:
    n = 50
    with connect(mesh) as s:
        s.sendall(b"GET /api/agent HTTP/1.1\r\nHost: a\r\n\r\n" * (n - 1)
                  + b"GET /app.css HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        raw = read_all(s)
    assert raw.count(b"HTTP/1.1 200 OK") == n
    answers = raw.split(b"HTTP/1.1 200 OK")[1:]
    assert all(b"application/json" in a.split(b"\r\n\r\n")[0] for a in answers[:-1])
    assert b"text/css" in answers[-1].split(b"\r\n\r\n")[0]  # in order: the stylesheet last


def test_a_bounded_flood_of_requests_is_served(mesh: Any) -> None:
    """2,000 requests over 4 keep-alive connections, bounded in time: all answered 200."""
    import http.client

    host, port = mesh.host_port.rsplit(":", 1)
    conns = [http.client.HTTPConnection(host, int(port), timeout=5) for _ in range(4)]
    deadline = time.monotonic() + 60
    ok = 0
    try:
        for i in range(2000):
            assert time.monotonic() < deadline, f"only {ok} answers within 60 s"
            c = conns[i % 4]
            c.request("GET", "/api/matrix" if i % 2 else "/api/agent")
            r = c.getresponse()
            r.read()
            ok += r.status == 200
    finally:
        for c in conns:
            c.close()
    assert ok == 2000


def test_a_client_that_never_reads_is_dropped(mesh: Any) -> None:
    """2,000 pipelined requests, no answer read: the agent writes one answer at a time,
    stalls when the socket is full, and drops the connection after the idle timeout."""
    host, port = mesh.host_port.rsplit(":", 1)
    n = 2000
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it sticks
        s.settimeout(5)
        s.connect((host, int(port)))
        s.setblocking(False)
        sent = 0
        request_bytes = b"GET /api/snapshot HTTP/1.1\r\nHost: a\r\n\r\n" * n
        deadline = time.monotonic() + 10
        while sent < len(request_bytes) and time.monotonic() < deadline:
            try:
                sent += s.send(request_bytes[sent:])
            except BlockingIOError:
                time.sleep(0.05)
            except OSError:
                break
        time.sleep(IDLE + 2.0)
        s.settimeout(5)
        total = 0
        try:
            while data := s.recv(65536):
                total += len(data)
        except OSError:
            pass  # reset: dropped with answers unsent
    one = len(request(mesh.host_port, "/api/snapshot")[2])
    assert total < n * one, (total, n * one)  # dropped long before all the answers
