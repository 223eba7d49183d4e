"""The 4240 responder: Cilium's answers, dual-stack binding, limits, timeouts and its command."""

from __future__ import annotations

import errno
import re
import signal
import socket
import subprocess
import time

import anyio
import pytest
from anyio.abc import SocketStream

from healthmesh.plugins.http import Responder, ResponderSettings, http_get
from healthmesh.plugins.http.listen import parse_listen
from tests.conftest import ROOT, healthmesh_cmd, run_cli
from tests.responders import port_of, responder

pytestmark = pytest.mark.anyio


async def exchange(port: int, request: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``request`` and read until the server closes (at most 2 s)."""
    out = b""
    with anyio.fail_after(2):
        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send(request)
            out = await read_until_closed(stream)
    return out


async def read_until_closed(stream: SocketStream) -> bytes:
    out = b""
    try:
        while True:
            out += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
        return out


def free_dual_stack_port() -> int:
    """A port free on both 127.0.0.1 and ::1 right now."""
    for _ in range(20):
        with socket.socket() as s4:
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            with socket.socket(socket.AF_INET6) as s6:
                try:
                    s6.bind(("::1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on both families")


# -- answers --------------------------------------------------------------------------


async def test_hello_is_200_with_an_empty_body_and_other_paths_are_404() -> None:
    async with responder("127.0.0.1:0") as r:
        port = port_of(r)
        get = await exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = await exchange(port, b"HEAD /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        query = await exchange(port, b"GET /hello?x=1 HTTP/1.0\r\n\r\n")
        absolute = await exchange(port, b"GET http://h:4240/hello HTTP/1.0\r\n\r\n")
        other = await exchange(port, b"GET /hello/x HTTP/1.0\r\nHost: x\r\n\r\n")
        head404 = await exchange(port, b"HEAD /nope HTTP/1.0\r\n\r\n")
    for reply in (get, head, query, absolute):
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nContent-Length: 0\r\n" in reply
        assert reply.endswith(b"\r\n\r\n")
    assert other.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert other.endswith(b"\r\n\r\n404 page not found\n")
    assert head404.startswith(b"HTTP/1.1 404 Not Found\r\n") and head404.endswith(b"\r\n\r\n")


async def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    async with responder("127.0.0.1:0") as r:
        request = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /x HTTP/1.1\r\nHost: x\r\n\r\n"
        last = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        reply = await exchange(port_of(r), request + last)
    assert reply.count(b"HTTP/1.1 ") == 3
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", reply) == [b"200", b"404", b"200"]


async def test_http10_keep_alive_is_honoured_as_apachebench_expects() -> None:
    async with responder("127.0.0.1:0") as r:
        with anyio.fail_after(2):
            async with await anyio.connect_tcp("127.0.0.1", port_of(r)) as stream:
                for _ in range(3):
                    await stream.send(b"GET /hello HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                    reply = await stream.receive()
                    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
                    assert b"Connection: keep-alive\r\n" in reply


async def test_request_with_a_body_is_answered_then_closed() -> None:
    async with responder("127.0.0.1:0") as r:
        reply = await exchange(
            port_of(r), b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        )
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in reply


# -- limits -----------------------------------------------------------------------------


async def test_oversized_request_line_gets_431_and_a_close() -> None:
    async with responder("127.0.0.1:0", max_head_bytes=1024) as r:
        long_line = b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n"
        reply = await exchange(port_of(r), long_line)
        unfinished = await exchange(port_of(r), b"GET /" + b"a" * 5000)  # never ends its line
        assert (await http_get("127.0.0.1", port_of(r), "/hello", 1.0)).ok
    assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert unfinished.startswith(b"HTTP/1.1 431 ")


async def test_too_many_or_too_large_headers_get_431() -> None:
    async with responder("127.0.0.1:0", max_headers=10, max_head_bytes=4096) as r:
        many = b"GET /hello HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(11))
        big = b"GET /hello HTTP/1.1\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n"
        assert (await exchange(port_of(r), many + b"\r\n")).startswith(b"HTTP/1.1 431 ")
        assert (await exchange(port_of(r), big)).startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello
        b"GET /hello\r\n\r\n",  # HTTP/0.9
        b"GET /hello HTTP/2.0\r\n\r\n",
        b"GET  /hello HTTP/1.1\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nNo-Colon\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    ],
)
async def test_malformed_requests_get_400_and_a_close(request_bytes: bytes) -> None:
    async with responder("127.0.0.1:0") as r:
        reply = await exchange(port_of(r), request_bytes)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close\r\n" in reply


async def test_slow_loris_is_cut_off_at_the_header_timeout_and_hello_still_answers() -> None:
    async with responder("127.0.0.1:0", header_timeout=0.4) as r:
        port = port_of(r)
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                start = anyio.current_time()
                closed_after = None
                try:
                    for byte in b"GET /hello HTTP/1.1\r\nX-Slow: " + b"z" * 100:
                        await stream.send(bytes([byte]))
                        t0 = anyio.current_time()
                        assert (await http_get("127.0.0.1", port, "/hello", 1.0)).ok
                        assert anyio.current_time() - t0 < 0.1
                        await anyio.sleep(0.05)
                except (anyio.BrokenResourceError, ConnectionResetError, BrokenPipeError):
                    closed_after = anyio.current_time() - start
                if closed_after is None:
                    with anyio.fail_after(2):
                        assert await read_until_closed(stream) == b""
                    closed_after = anyio.current_time() - start
        assert 0.35 <= closed_after < 1.2
        assert r.pool is not None and r.pool.timed_out >= 1


async def test_silent_connection_is_closed_at_the_header_timeout() -> None:
    async with responder("127.0.0.1:0", header_timeout=0.3) as r:
        with anyio.fail_after(3):
            async with await anyio.connect_tcp("127.0.0.1", port_of(r)) as stream:
                start = anyio.current_time()
                assert await read_until_closed(stream) == b""
                assert 0.25 <= anyio.current_time() - start < 1.0


async def test_at_the_connection_cap_the_oldest_connection_makes_room() -> None:
    async with responder("127.0.0.1:0", max_connections=50) as r:
        port = port_of(r)
        assert r.pool is not None
        with anyio.fail_after(5):
            streams = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(120)]
            while len(r.pool.open) < 50 or r.pool.evicted < 70:
                await anyio.sleep(0.01)
            result = await http_get("127.0.0.1", port, "/hello", 1.0)
            assert result.ok, result.error
            assert len(r.pool.open) <= 50
            assert await read_until_closed(streams[0]) == b""  # the oldest went first
            for stream in streams:
                await stream.aclose()


# -- binding ----------------------------------------------------------------------------


async def test_ipv4_and_ipv6_wildcards_share_one_port() -> None:
    port = free_dual_stack_port()
    async with responder(f"0.0.0.0:{port}", f"[::]:{port}") as r:
        assert r.addresses == [f"0.0.0.0:{port}", f"[::]:{port}"]
        for address in ("127.0.0.1", "::1"):
            with anyio.fail_after(3):
                assert (await http_get(address, port, "/hello", 1.0)).ok


@pytest.mark.parametrize("order", [("0.0.0.0", "[::]"), ("[::]", "0.0.0.0")])
async def test_each_address_binds_on_its_own_in_either_order(order: tuple[str, str]) -> None:
    port = free_dual_stack_port()
    async with responder(f"{order[0]}:{port}"):
        async with responder(f"{order[1]}:{port}"):  # separate responders, same port
            for address in ("127.0.0.1", "::1"):
                with anyio.fail_after(3):
                    assert (await http_get(address, port, "/hello", 1.0)).ok


async def test_address_in_use_is_an_oserror_naming_the_address() -> None:
    async with responder("127.0.0.1:0") as r:
        port = port_of(r)
        second = Responder(ResponderSettings(listen=["[::1]:0", f"127.0.0.1:{port}"]))
        with pytest.raises(OSError) as info, anyio.fail_after(3):
            await second.run()
    assert str(info.value).startswith(f"cannot listen on 127.0.0.1:{port}: address already in use")
    assert info.value.errno == errno.EADDRINUSE


def test_listen_addresses_are_validated_naming_the_entry() -> None:
    assert parse_listen("[::]:4240") == ("::", 4240)
    assert parse_listen("10.0.0.1:80") == ("10.0.0.1", 80)
    ok = ResponderSettings(listen=["0.0.0.0:4240", "[::]:4240"])
    Responder.validate_settings(ok, None)
    cases = {
        "::4240": "listen[1]: '::4240' is not a listen address",
        "[::]:99999": "listen[1]: '99999' is not a TCP port",
        "localhost:4240": "listen[1]: 'localhost' is not an IP address",
        "0.0.0.0:4240": "listen[1]: '0.0.0.0:4240' is listed twice",
    }
    for bad, message in cases.items():
        with pytest.raises(ValueError) as info:
            Responder.validate_settings(ResponderSettings(listen=["0.0.0.0:4240", bad]), None)
        assert str(info.value).startswith(message)
    with pytest.raises(ValueError, match="header_timeout: must be greater than zero"):
        Responder.validate_settings(ResponderSettings(header_timeout=0.0), None)  # type: ignore[arg-type]


def test_bad_listen_address_in_a_config_is_a_config_error(tmp_path: object) -> None:
    from pathlib import Path

    config = Path(str(tmp_path)) / "bad.toml"
    config.write_text(
        '[node]\nname = "n1"\naddresses = ["127.0.0.1"]\n'
        '[responder]\nlisten = ["0.0.0.0:4240", "[::]4240"]\n'
        '[sources.static]\nnodes = [{name = "n2", addresses = ["127.0.0.2"]}]\n'
    )
    proc = run_cli("config", "check", "-c", str(config))
    assert proc.returncode == 2, proc.stderr
    assert "responder.listen[1]: '[::]4240' is not a listen address" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the command --------------------------------------------------------------------------


def start_command(*args: str) -> tuple[subprocess.Popen[str], int]:
    """``healthmesh responder ARGS`` in a subprocess; returns it and the port it listens on."""
    proc = subprocess.Popen(
        [*healthmesh_cmd(), "responder", *args], stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the "listening on" line, or an error
    if "listening on" not in line:
        proc.kill()
        raise AssertionError(f"responder did not start: {line}{proc.stderr.read()}")
    port = int(line.strip().rsplit(":", 1)[1])
    return proc, port


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_responder_command_serves_and_exits_cleanly_on_signals(signum: int) -> None:
    proc, port = start_command("--listen", "127.0.0.1:0")
    try:
        result = anyio.run(http_get, "127.0.0.1", port, "/hello", 2.0, backend="asyncio")
        assert result.ok, result.error
        start = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - start < 2.0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_responder_command_reports_a_taken_port_in_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = run_cli("responder", "--listen", f"127.0.0.1:{port}", timeout=20)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (
        f"Error: cannot listen on 127.0.0.1:{port}: address already in use "
        "(another process listens there; is a healthmesh agent already running?)"
    )
    assert "Traceback" not in proc.stderr


def test_responder_command_rejects_a_bad_listen_address_as_usage_error() -> None:
    proc = run_cli("responder", "--listen", "4240", timeout=20)
    assert proc.returncode == 2
    assert "'4240' is not a listen address" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_responder_command_help_explains_itself() -> None:
    proc = run_cli("responder", "--help", timeout=20)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # click wraps lines
    for phrase in ("--listen ADDR:PORT", "health-endpoint network namespace", "SIGTERM"):
        assert phrase in text
