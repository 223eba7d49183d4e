"""HTTP probes run as a train (``HttpProbe.probe_many``) against real servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import psutil
import pytest

from healthmesh import Duration, Path
from healthmesh.core.config import ProbingSettings
from healthmesh.core.scheduler import Scheduler
from healthmesh.core.state import StateStore
from healthmesh.plugins.http import HttpProbe, HttpSettings
from healthmesh.plugins.http.probe import TRAIN_SPREAD, http_train
from tests.responders import port_of, responder

pytestmark = pytest.mark.anyio


@dataclass
class Recorder:
    """What a test server saw: when each connection came, and how many were open at once."""

    port: int = 0
    accepted: list[float] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0


@asynccontextmanager
async def recording_server(
    host: str = "127.0.0.1", port: int = 0, *, answer: bool = True
) -> AsyncIterator[Recorder]:
    """A server on ``host`` that records connections; the n-th answers 200 when n is even
    and 503 when odd (so the order of results can be checked), or never answers."""
    rec = Recorder()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = len(rec.accepted)
        rec.accepted.append(time.monotonic())
        rec.open_now += 1
        rec.most_open = max(rec.most_open, rec.open_now)
        try:
            await reader.readuntil(b"\r\n\r\n")
            if not answer:
                await reader.read()  # until the prober gives up and closes
                return
            status = b"200 OK" if n % 2 == 0 else b"503 Service Unavailable"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            rec.open_now -= 1
            writer.close()

    srv = await asyncio.start_server(on_connection, host, port)
    rec.port = srv.sockets[0].getsockname()[1]
    try:
        yield rec
    finally:
        srv.close()


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_train_probes_one_peer_at_a_time_and_keeps_the_order() -> None:
    async with recording_server() as rec:
        with anyio.fail_after(10):
            results = await http_train(["127.0.0.1"] * 40, rec.port, "/hello", 2.0)
    assert len(results) == 40 == len(rec.accepted)
    # Connection n answered 200 when n is even: the results line up with the starts.
    assert [r.ok for r in results] == [i % 2 == 0 for i in range(40)]
    assert all(r.error == f"HTTP 503 Service Unavailable from 127.0.0.1:{rec.port}"
               for r in results[1::2])
    assert rec.most_open == 1  # each probe started only after the one before it answered
    assert all(r.rtt is not None and 0 < r.rtt < 0.5 for r in results[::2])


async def test_a_peer_that_never_answers_holds_the_train_up_by_one_step_only() -> None:
    async with recording_server("127.0.0.2", answer=False) as silent:
        async with recording_server("127.0.0.3", silent.port) as live:
            train = ["127.0.0.2"] * 10 + ["127.0.0.3"] * 10
            start = time.monotonic()
            with anyio.fail_after(5):
                results = await http_train(train, silent.port, "/hello", 0.5)
            took = time.monotonic() - start
    assert all(r.error is not None and r.error.startswith(
        f"timeout after 500ms waiting for the response of 127.0.0.2:{silent.port}")
        for r in results[:10])
    assert [r.ok for r in results[10:]] == [i % 2 == 0 for i in range(10)]
    # The live peers were reached ten 2 ms steps after the first silent one, not ten
    # timeouts later, and still one after another: a train starts the next probe on an
    # answer or 2 ms later, so on a loaded machine an answer slower than 2 ms may overlap
    # the next probe (at most two open; all ten at once would be a burst).
    assert live.accepted[0] - silent.accepted[0] < 0.2
    assert live.most_open <= 2
    assert 0.5 <= took < 1.5  # about one timeout, not ten (margin for a loaded machine)


async def test_a_long_train_starts_within_the_spread_and_ends_by_its_timeout() -> None:
    with socket.socket() as s:  # the kernel completes every handshake; nobody ever reads
        s.bind(("127.0.0.1", 0))
        s.listen(512)
        start = time.monotonic()
        with anyio.fail_after(5):
            results = await http_train(["127.0.0.1"] * 300, s.getsockname()[1], "/hello", 0.4)
        took = time.monotonic() - start
    assert all(r.error is not None and "waiting for the response" in r.error for r in results)
    # 300 steps of 2 ms would take 0.6 s: the starts are squeezed into TRAIN_SPREAD, and
    # the last probe ends within the timeout of the first (margin for a loaded machine,
    # still below the 1.0 s that unsqueezed starts would take).
    assert 0.4 <= took < 0.4 + TRAIN_SPREAD + 0.4


async def test_instant_failures_in_a_train_do_not_stop_it() -> None:
    port = refused_port()  # nothing listens on 127.0.0.2 at this port: refused at once
    async with recording_server("127.0.0.3", port) as live:
        train = ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.2", "127.0.0.3", "::1"]
        with anyio.fail_after(5):
            results = await http_train(train, port, "/hello", 1.0)
            assert await http_train([], port, "/hello", 1.0) == []
    assert [r.ok for r in results] == [False, True, False, False, False, False]
    assert results[0].error == f"connect to 127.0.0.2:{port}: connection refused"
    assert results[4].error == f"HTTP 503 Service Unavailable from 127.0.0.3:{port}"
    assert results[5].error == f"connect to [::1]:{port}: connection refused"
    assert len(live.accepted) == 2


async def test_a_cancelled_train_closes_every_socket() -> None:
    me = psutil.Process()
    async with recording_server(answer=False) as silent:
        before = me.num_fds()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(http_train, ["127.0.0.1"] * 200, silent.port, "/hello", 30.0)
                await anyio.sleep(0.3)
                assert me.num_fds() >= before + 200
                tg.cancel_scope.cancel()
        await anyio.sleep(0.1)
        assert me.num_fds() <= before + 1  # the server may still hold its side for a moment


async def test_the_scheduler_hands_a_ticks_http_probes_to_one_train() -> None:
    async with responder("127.0.0.1:0") as live:
        probing = ProbingSettings(interval=Duration(0.5), timeout=Duration(1.0))
        store = StateStore(probing.failure_threshold, probing.window)
        probe = HttpProbe(HttpSettings(port=port_of(live)), context=None)  # type: ignore[arg-type]
        calls: list[int] = []
        real = probe.probe_many

        async def counting(paths, timeout):  # type: ignore[no-untyped-def]
            calls.append(len(paths))
            return await real(paths, timeout)

        probe.probe_many = counting  # type: ignore[method-assign]
        sched = Scheduler(probing, {"http": probe}, store, seed="t")
        paths = [Path(node_id=f"default/n{i}", address="127.0.0.1", role="host",
                      primary=True) for i in range(100)]
        sched.set_paths(paths)
        async with anyio.create_task_group() as tg:
            await tg.start(sched.run)
            with anyio.fail_after(5):
                while sched.completed_rounds < 2:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    # 100 paths over 0.5 s are 200 starts a second: ten per 50 ms tick, in one call each.
    assert sum(calls) >= 200
    assert max(calls) >= 5
    for p in paths:
        st = store.get(p.key, "http")
        assert st is not None and st.last is not None and st.last.ok, st
