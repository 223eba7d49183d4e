"""The responder under abuse, run as ``healthmesh responder`` in its own process.

Idle-connection floods, slow-loris clients and 100,000 requests: afterwards ``/hello``
still answers within 100 ms and the process has not grown. Loads are bounded in count and
time; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator

import anyio
import psutil
import pytest

from healthmesh.plugins.http import http_get
from tests.conftest import ROOT, healthmesh_cmd, require_binary


class Child:
    """A responder subprocess on 127.0.0.1 and a free port."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*healthmesh_cmd(), "responder", "--listen", "127.0.0.1:0", *args],
            stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"responder did not start: {line}{self.proc.stderr.read()}")
        self.port = int(line.strip().rsplit(":", 1)[1])
        self.ps = psutil.Process(self.proc.pid)

    def hello_ms(self) -> float:
        """Time of one probe of /hello in ms; fails the test when it does not succeed."""
        result = anyio.run(http_get, "127.0.0.1", self.port, "/hello", 1.0, backend="asyncio")
        assert result.ok, result.error
        assert result.rtt is not None
        return result.rtt * 1000

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        try:
            assert self.proc.wait(5) == 0
        finally:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.stop()


def open_idle(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def test_hello_answers_within_100ms_with_2000_idle_connections_open(child: Child) -> None:
    socks = open_idle(child.port, 2000)
    try:
        time.sleep(0.2)
        assert len(child.ps.net_connections()) >= 2000  # they are all held open
        timings = [child.hello_ms() for _ in range(5)]
        assert min(timings) < 100, timings
    finally:
        for s in socks:
            s.close()
    # 2,000 connections closed at once are 2,000 events in one loop iteration: let them pass,
    # then probe as before (the best of a few, as the machine is shared).
    time.sleep(0.2)
    assert min(child.hello_ms() for _ in range(3)) < 100


def test_flood_beyond_the_connection_cap_evicts_the_oldest_and_hello_still_answers() -> None:
    child = Child("--max-connections", "500")
    try:
        socks = open_idle(child.port, 2000)
        try:
            time.sleep(0.2)
            assert len(child.ps.net_connections()) <= 501
            assert child.hello_ms() < 100
            socks[0].settimeout(1)
            assert socks[0].recv(10) == b""  # the oldest was closed to make room
        finally:
            for s in socks:
                s.close()
    finally:
        child.stop()


def test_slow_loris_clients_are_cut_off_and_hello_still_answers() -> None:
    child = Child("--header-timeout", "1s")
    try:
        socks = open_idle(child.port, 200)
        start = time.monotonic()
        try:
            closed: set[int] = set()
            while time.monotonic() - start < 3.0 and len(closed) < len(socks):
                for i, s in enumerate(socks):
                    if i in closed:
                        continue
                    try:
                        s.send(b"X")  # one byte at a time, never finishing the head
                    except OSError:
                        closed.add(i)
                assert child.hello_ms() < 100
                time.sleep(0.1)
            assert len(closed) == len(socks)
            assert time.monotonic() - start < 3.0
        finally:
            for s in socks:
                s.close()
        assert child.hello_ms() < 100
    finally:
        child.stop()


def test_oversized_request_line_and_headers_are_refused_and_hello_still_answers(
    child: Child,
) -> None:
    for request in (
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
        b"GET /hello HTTP/1.1\r\n" + b"X-Big: y\r\n" * 10_000 + b"\r\n",
    ):
        with socket.create_connection(("127.0.0.1", child.port), timeout=2) as s:
            try:
                s.sendall(request)
            except OSError:
                pass  # it may close on us before we finish: that is the point
            reply = s.recv(100)
        assert reply.startswith(b"HTTP/1.1 431 "), reply
    assert child.hello_ms() < 100


def test_memory_stays_flat_across_100000_requests(child: Child) -> None:
    ab = require_binary("ab", "apache2-utils")
    url = f"http://127.0.0.1:{child.port}/hello"

    def load(n: int, *extra: str) -> None:
        out = subprocess.run(
            [ab, "-q", "-n", str(n), "-c", "8", *extra, url],
            capture_output=True, text=True, timeout=60,
        ).stdout
        failed = re.search(r"Failed requests:\s+(\d+)", out)
        assert failed is not None and failed.group(1) == "0", out
        assert "Non-2xx" not in out, out

    load(10_000)  # warm up: allocator pools, caches
    before = child.rss_mb()
    load(40_000)  # one new connection per request, like probes
    load(50_000, "-k")  # kept-alive connections
    after = child.rss_mb()
    assert after - before < 4.0, (before, after)
    assert child.hello_ms() < 100
