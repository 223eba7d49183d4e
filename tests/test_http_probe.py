"""The ``http`` probe against real servers on loopback: our responder and misbehaving ones."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import psutil
import pytest

from healthmesh import Path, ProbeResult
from healthmesh.plugins.http import HttpProbe, HttpSettings, http_get
from tests.responders import port_of, responder

pytestmark = pytest.mark.anyio

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(reply: Reply) -> AsyncIterator[int]:
    """A plain TCP server on 127.0.0.1 whose every connection runs ``reply``; yields its port."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await reply(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()


def sends(data: bytes, *, then_wait: float = 0.0) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if then_wait:
            await asyncio.sleep(then_wait)

    return reply


async def probe(port: int, address: str = "127.0.0.1", timeout: float = 1.0) -> ProbeResult:
    with anyio.fail_after(timeout + 2):
        return await http_get(address, port, "/hello", timeout)


async def test_probe_of_our_responder_over_ipv4_and_ipv6_succeeds_with_phase_timings() -> None:
    async with responder("127.0.0.1:0", "[::1]:0") as r:
        for i, address in enumerate(("127.0.0.1", "::1")):
            result = await probe(port_of(r, i), address)
            assert result.ok, result.error
            assert result.rtt is not None and 0 < result.rtt < 1
            assert 0 <= result.details["connect_ms"] <= result.rtt * 1000
            assert 0 <= result.details["ttfb_ms"] <= result.rtt * 1000


async def test_probe_kind_through_the_plugin_api_uses_the_configured_port_and_path() -> None:
    async with responder("127.0.0.1:0") as r:
        good = HttpProbe(HttpSettings(port=port_of(r)), context=None)  # type: ignore[arg-type]
        path = Path(node_id="default/n1", address="127.0.0.1", role="host", primary=True)
        async with good:
            with anyio.fail_after(3):
                assert (await good.probe(path, 1.0)).ok
        wrong = HttpProbe(HttpSettings(port=port_of(r), path="/nope"), context=None)  # type: ignore[arg-type]
        with anyio.fail_after(3):
            result = await wrong.probe(path, 1.0)
        assert not result.ok
        assert result.error == f"HTTP 404 Not Found from 127.0.0.1:{port_of(r)}"


async def test_port_with_no_listener_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await probe(port)
    assert not result.ok
    assert result.error == f"connect to 127.0.0.1:{port}: connection refused"


async def test_listener_that_accepts_and_never_answers_times_out_on_time() -> None:
    with socket.socket() as s:  # the kernel completes the handshake; nobody ever reads
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        port = s.getsockname()[1]
        start = anyio.current_time()
        result = await probe(port, timeout=0.3)
        took = anyio.current_time() - start
    assert not result.ok
    assert result.error is not None
    expected = f"timeout after 300ms waiting for the response of 127.0.0.1:{port}"
    assert result.error.startswith(expected)
    assert 0.28 <= took < 0.9  # the timeout, with margin for a loaded machine
    assert "connect_ms" in result.details


async def test_server_answering_500_gives_an_error_with_the_code() -> None:
    body = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops"
    async with server(sends(body)) as port:
        result = await probe(port)
    assert not result.ok
    assert result.error == f"HTTP 500 Internal Server Error from 127.0.0.1:{port}"


async def test_server_sending_garbage_fails_at_once_without_waiting_for_the_timeout() -> None:
    async with server(sends(b"SSH-2.0-OpenSSH_9.6\r\n", then_wait=5)) as port:
        start = anyio.current_time()
        result = await probe(port, timeout=2.0)
        assert anyio.current_time() - start < 1.0
    assert not result.ok
    shown = "b'SSH-2.0-OpenSSH_9.6\\r\\n'"
    assert result.error == f"malformed HTTP response from 127.0.0.1:{port}: {shown}"


async def test_bad_status_line_and_bad_header_are_malformed() -> None:
    async with server(sends(b"HTTP/1.1 2000 OK\r\n\r\n")) as port:
        result = await probe(port)
    assert result.error is not None and result.error.startswith("malformed HTTP response")
    async with server(sends(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n")) as port:
        result = await probe(port)
    assert result.error is not None and result.error.startswith("malformed header")


async def test_server_closing_mid_response_is_an_error_naming_the_bytes_received() -> None:
    async with server(sends(b"HTTP/1.1 200 OK\r\nContent-Le")) as port:
        result = await probe(port)
    assert not result.ok
    assert result.error == (
        f"connection closed by 127.0.0.1:{port} after 27 bytes, before the response head ended"
    )
    async with server(sends(b"")) as port:
        result = await probe(port)
    assert result.error == f"connection closed by 127.0.0.1:{port} before sending a response"


async def test_interim_100_continue_is_skipped() -> None:
    async with server(sends(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")) as port:
        result = await probe(port)
    assert result.ok, result.error


async def test_oversized_response_head_is_rejected() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * 20_000 + b"\r\n\r\n"
    async with server(sends(head)) as port:
        result = await probe(port)
    assert result.error == f"response head from 127.0.0.1:{port} exceeds 16384 bytes"


async def test_cancelled_probes_close_their_sockets() -> None:
    me = psutil.Process()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(512)
        port = s.getsockname()[1]
        before = me.num_fds()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(http_get, "127.0.0.1", port, "/hello", 30.0)
                await anyio.sleep(0.2)
                assert me.num_fds() >= before + 200
                tg.cancel_scope.cancel()
        assert me.num_fds() == before


async def test_many_concurrent_probes_all_succeed() -> None:
    async with responder("127.0.0.1:0") as r:
        port = port_of(r)
        results: list[ProbeResult] = []

        async def one() -> None:
            results.append(await http_get("127.0.0.1", port, "/hello", 5.0))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(1000):
                    tg.start_soon(one)
    assert len(results) == 1000
    assert [r.error for r in results if not r.ok] == []


def test_http_settings_are_validated() -> None:
    HttpProbe.validate_settings(HttpSettings(), None)
    with pytest.raises(ValueError, match="port: 70000 is not a TCP port"):
        HttpProbe.validate_settings(HttpSettings(port=70000), None)
    with pytest.raises(ValueError, match="path: 'hello' must start with '/'"):
        HttpProbe.validate_settings(HttpSettings(path="hello"), None)
    with pytest.raises(ValueError, match="path: '/a b'"):
        HttpProbe.validate_settings(HttpSettings(path="/a b"), None)
