"""The event ring and its followers, the flapping fold, and outputs whose ``events`` misbehave.

The hostile-output test runs a real agent in-process (real responder, real HTTP probes on
loopback, a real unix-socket API) with outputs that raise or hang in ``events``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar

import anyio
import httpx
import msgspec
import pytest

from healthmesh import Event, EventLog, Gap, Output, hookimpl
from healthmesh.core.agent import Agent
from healthmesh.core.config import parse_raw
from healthmesh.core.plugins import PluginRegistry
from healthmesh.core.resolve import resolve
from healthmesh.plugins.webhook.dedup import FlapFolder
from healthmesh.plugins.webhook.output import backoff, sign
from tests.agentproc import free_port
from tests.events_support import event_validator

pytestmark = pytest.mark.anyio


def emit(log: EventLog, n: int, node: str = "n") -> list[Event]:
    return [log.emit("path", node=node, cluster="default", path="10.0.0.1", role="host",
                     kind="http", from_="reachable" if i % 2 else "unreachable",
                     to="unreachable" if i % 2 else "reachable", reason="x")
            for i in range(n)]


def test_ring_keeps_the_last_events_with_consecutive_seqs() -> None:
    log = EventLog("default/me", ring=10, buffer=10)
    emit(log, 25)
    assert log.seq == 25 and len(log) == 10
    assert [e.seq for e in log.replay(0)] == list(range(16, 26))
    assert [e.seq for e in log.replay(20)] == [21, 22, 23, 24, 25]
    assert log.replay(25) == []
    assert log.after_time(0.0) == 15
    assert log.after_time(time.time() + 60) == 25


def test_events_match_the_schema() -> None:
    log = EventLog("c1/me")
    validator = event_validator()
    ev = log.emit("node", node="n2", cluster="c1", from_="absent", to="unknown", reason="added")
    validator.validate(json.loads(msgspec.json.encode(ev)))
    validator.validate(json.loads(msgspec.json.encode(emit(log, 1)[0])))
    comp = log.emit("component", node="me", cluster="c1", component="scheduler",
                    from_="ok", to="degraded", reason="lag 2s")
    doc = comp.to_dict()
    validator.validate(doc)
    assert doc["from"] == "ok" and doc["path"] is None and "suppressed" not in doc
    gap = json.loads(msgspec.json.encode(Gap(after=1, next=5, missed=3, reason="r")))
    validator.validate(gap)
    bad = {**emit(log, 1)[0].to_dict(), "to": "sideways"}
    assert not validator.is_valid(bad)


async def test_follower_replays_then_follows_live() -> None:
    log = EventLog("default/me", ring=100, buffer=10)
    emit(log, 5)
    with log.follow(2) as f, anyio.fail_after(5):
        got = [await f.receive() for _ in range(3)]
        assert [e.seq for e in got if isinstance(e, Event)] == [3, 4, 5]
        assert f.receive_nowait() is None

        async def later() -> None:
            await anyio.sleep(0.05)
            emit(log, 2)

        async with anyio.create_task_group() as tg:
            tg.start_soon(later)
            got = [await f.receive() for _ in range(2)]
        assert [e.seq for e in got if isinstance(e, Event)] == [6, 7]


async def test_a_slow_follower_never_blocks_emit_and_catches_up_from_the_ring() -> None:
    log = EventLog("default/me", ring=1000, buffer=5)
    with log.follow(0) as f:
        emit(log, 50)  # ten times its buffer, without waiting for it
        assert log.overflows == 1
        with anyio.fail_after(5):
            got = [await f.receive() for _ in range(50)]
        assert [e.seq for e in got if isinstance(e, Event)] == list(range(1, 51))


async def test_a_follower_behind_the_ring_gets_a_gap_with_the_count() -> None:
    log = EventLog("default/me", ring=10, buffer=5)
    with log.follow(0) as f:
        emit(log, 30)
        with anyio.fail_after(5):
            got = [await f.receive() for _ in range(16)]
    # What was already in its buffer, then the gap the ring could not fill, then the rest.
    assert [e.seq for e in got[:5] if isinstance(e, Event)] == [1, 2, 3, 4, 5]
    gap = got[5]
    assert isinstance(gap, Gap)
    assert (gap.after, gap.next, gap.missed) == (5, 21, 15)
    assert [e.seq for e in got[6:] if isinstance(e, Event)] == list(range(21, 31))


async def test_an_event_handed_to_a_cancelled_receive_is_not_lost() -> None:
    log = EventLog("default/me")
    with log.follow(0) as f:
        for n in range(1, 21):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def wait(scope: anyio.CancelScope = scope) -> None:
                    with scope:
                        await f.receive()

                tg.start_soon(wait)
                await anyio.sleep(0.01)  # it is waiting now
                emit(log, 1)
                scope.cancel()  # the same tick: the event may be handed over, then cancelled
            with anyio.fail_after(5):
                got = await f.receive() if f.last < n else None
            assert f.last == n, (n, got)


async def test_a_seq_ahead_of_the_agent_replays_from_its_start() -> None:
    log = EventLog("default/me")
    emit(log, 3)
    with log.follow(500) as f:
        gap = f.receive_nowait()
        assert isinstance(gap, Gap) and "restarted" in gap.reason
        assert [f.receive_nowait().seq for _ in range(3)] == [1, 2, 3]  # type: ignore[union-attr]


def ev(seq: int, frm: str, to: str) -> Event:
    return Event(seq=seq, time="2026-12-01T00:00:00.000Z", type="path", node="n",
                 cluster="default", path="10.0.0.1", role="host", kind="http", from_=frm, to=to,
                 reason="r", observer="default/me")


def test_fold_sends_the_first_change_and_folds_the_rest_of_its_window() -> None:
    fold = FlapFolder(10.0)
    assert fold.offer(ev(1, "reachable", "unreachable"), 0.0) == [ev(1, "reachable",
                                                                      "unreachable")]
    assert fold.offer(ev(2, "unreachable", "reachable"), 1.0) == []
    assert fold.offer(ev(3, "reachable", "unreachable"), 2.0) == []
    assert fold.due(9.9) == []
    # Back where the window started: nothing is sent, two changes suppressed.
    assert fold.due(10.0) == [] and fold.suppressed == 2
    # A new window: the next change goes out at once.
    assert fold.offer(ev(4, "unreachable", "reachable"), 11.0) == [ev(4, "unreachable",
                                                                       "reachable")]
    fold.offer(ev(5, "reachable", "unreachable"), 12.0)
    fold.offer(ev(6, "unreachable", "reachable"), 13.0)
    fold.offer(ev(7, "reachable", "unreachable"), 14.0)
    out = fold.due(21.0)
    assert out == [msgspec.structs.replace(ev(7, "reachable", "unreachable"),
                                           from_="reachable", suppressed=2)]
    assert fold.suppressed == 4
    assert FlapFolder(0).offer(ev(8, "a", "b"), 0.0) == [ev(8, "a", "b")]


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    for attempt in range(1, 10):
        base = min(5.0, 0.5 * 2 ** (attempt - 1))
        delays = [backoff(attempt, 0.5, 5.0) for _ in range(200)]
        assert all(base / 2 <= d <= base for d in delays)
        assert max(delays) - min(delays) > base / 4  # jittered
    # The signature is the hex HMAC-SHA256 of the body (RFC 4231 test case 2).
    assert sign(b"Jefe", b"what do ya want for nothing?") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


# -- hostile outputs -----------------------------------------------------------------------


class Recording(Output):
    name = "recording"
    got: ClassVar[list[Event]] = []

    async def events(self, batch: list[Event]) -> None:
        Recording.got.extend(batch)


class Raising(Output):
    name = "raising"
    calls = 0

    async def events(self, batch: list[Event]) -> None:
        Raising.calls += 1
        raise RuntimeError("boom")


class Hanging(Output):
    name = "hanging"
    calls = 0

    async def events(self, batch: list[Event]) -> None:
        Hanging.calls += 1
        await anyio.sleep_forever()


class Hostile:
    @hookimpl
    def register_outputs(self, register: Any) -> None:
        register(Raising)
        register(Hanging)
        register(Recording)


def agent_text(tmp_path: Path, extra: str = "") -> tuple[str, Path]:
    port = free_port()
    sock = tmp_path / "api.sock"
    text = f"""
[node]
name = "me"
addresses = ["127.0.0.1"]
[probing]
interval = "300ms"
timeout = "200ms"
confirm_probes = 1
[plugins]
disable = ["icmp"]
[responder]
listen = ["127.0.0.1:{port}", "127.0.0.2:{port}"]
[probes.http]
port = {port}
[sources.static]
nodes = [{{name = "peer", addresses = ["127.0.0.2"]}}, {{name = "dead", addresses = ["127.0.0.9"]}}]
[outputs.api]
socket = "{sock}"
{extra}"""
    return text, sock


async def test_raising_and_hanging_outputs_block_neither_others_nor_the_agent(
    tmp_path: Path,
) -> None:
    text, sock = agent_text(tmp_path, "[outputs.raising]\n[outputs.hanging]\n[outputs.recording]\n")
    raw = parse_raw(text, "hostile.toml")
    registry = PluginRegistry().load(extra={"hostile": Hostile()})
    agent = Agent(resolve(raw, registry), registry)
    Recording.got = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        with anyio.fail_after(20):
            while not any(e.node == "dead" and e.to == "unreachable" and e.type == "node"
                          for e in Recording.got):
                await anyio.sleep(0.05)
            rounds = agent.scheduler.completed_rounds
            while agent.scheduler.completed_rounds < rounds + 3:  # the agent goes on probing
                await anyio.sleep(0.05)
            # The API still answers, and serves the same events.
            transport = httpx.AsyncHTTPTransport(uds=str(sock))
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
                resp = await c.get("/v1/events?since=0&follow=false")
            served = [json.loads(line) for line in resp.text.splitlines()]
        tg.cancel_scope.cancel()
    seqs = [e.seq for e in Recording.got]
    assert seqs == list(range(1, len(seqs) + 1))  # every event, in order, once
    assert served[: len(seqs)] == [e.to_dict() for e in Recording.got]
    assert Raising.calls >= 1 and Hanging.calls >= 1


async def test_a_quiet_stream_gets_heartbeats(tmp_path: Path) -> None:
    text, sock = agent_text(tmp_path)
    registry = PluginRegistry().load()
    agent = Agent(resolve(parse_raw(text, "hb.toml"), registry), registry)
    api = next(o for o in agent.outputs if o.name == "api")
    api.app.event_streams.heartbeat = 0.3  # type: ignore[attr-defined]
    validator = event_validator()
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        with anyio.fail_after(20):
            while not any(e.node == "dead" and e.type == "node" and e.to == "unreachable"
                          for e in agent.events.replay(0)):
                await anyio.sleep(0.05)
            transport = httpx.AsyncHTTPTransport(uds=str(sock))
            lines: list[dict[str, Any]] = []
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as c, \
                    c.stream("GET", f"/v1/events?since={agent.events.seq}") as resp:
                async for line in resp.aiter_lines():
                    lines.append(json.loads(line))
                    if sum(1 for x in lines if x["type"] == "heartbeat") >= 3:
                        break
        tg.cancel_scope.cancel()
    beats = [x for x in lines if x["type"] == "heartbeat"]
    for beat in beats:
        validator.validate(beat)
        assert beat["seq"] >= 1
