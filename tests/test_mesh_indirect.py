"""Indirect probes (SWIM's ping-req) over real loopback TCP: answered only when signed,
fresh, unreplayed, from a member at its own address, about a member; rate-limited."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from healthmesh import Node
from healthmesh.plugins.clustermesh.indirect import (
    MAX_LINE,
    IndirectServer,
    TokenBucket,
    ask,
    sign,
)
from tests.agentproc import free_port

SECRET = b"0123456789abcdef-secret"
CALLER = Node(name="a", addresses=("127.0.0.1",), info={"heartbeat": "alive"})
HELPER = Node(name="h", addresses=("127.0.0.1",), info={"heartbeat": "alive"})
TARGET = Node(name="t", addresses=("127.0.0.3",))
ELSEWHERE = Node(name="far", addresses=("127.0.0.9",))

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Lab:
    def __init__(self, members: list[Node], rate: float = 100.0) -> None:
        self.probed: list[str] = []
        self.server = IndirectServer(SECRET, lambda: members, self.probe, rate=rate,
                                     timeout=0.5)
        self.port = free_port()

    async def probe(self, node_id: str, timeout: float) -> dict[str, bool]:
        self.probed.append(node_id)
        return {"http": node_id == "default/t", "icmp": False}


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    the_lab = Lab([CALLER, TARGET, ELSEWHERE])
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=the_lab.port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, the_lab.server.handle)
        yield the_lab
        tg.cancel_scope.cancel()


async def raw(port: int, payload: bytes) -> dict[str, Any] | None:
    with anyio.fail_after(5):
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(payload)
            buf = b""
            try:
                while b"\n" not in buf:
                    buf += await s.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None
    return json.loads(buf)


def request(sender: str = "default/a", target: str = "default/t", *, ts: float | None = None,
            nonce: str = "n1", secret: bytes = SECRET) -> bytes:
    ts = time.time() if ts is None else ts
    req = {"from": sender, "target": target, "ts": ts, "nonce": nonce,
           "mac": sign(secret, sender, target, ts, nonce)}
    return json.dumps(req).encode() + b"\n"


async def test_a_member_asking_about_a_member_gets_a_signed_answer(lab: Lab) -> None:
    reached = await ask(SECRET, "default/a", HELPER, lab.port, "default/t", 0.5)
    assert reached is True and lab.probed == ["default/t"]
    # Nobody reaches "far" by any kind: False (an answer), not None (no answer).
    assert await ask(SECRET, "default/a", HELPER, lab.port, "default/far", 0.5) is False


async def test_a_wrong_secret_gets_nothing_and_a_forged_answer_is_not_believed(lab: Lab) -> None:
    assert await ask(b"another-secret-16b", "default/a", HELPER, lab.port, "default/t",
                     0.5) is None
    assert lab.server.refused == {"bad signature": 1} and lab.probed == []


@pytest.mark.parametrize(
    ("make", "why"),
    [  # built when the test runs: a request built at collection time would be stale
        (lambda: request(ts=time.time() - 120), "stale request"),
        (lambda: request(sender="default/far"), "caller is not a mesh member at this address"),
        (lambda: request(sender="default/stranger"),
         "caller is not a mesh member at this address"),
        (lambda: request(target="default/nowhere"), "target is not a mesh member"),
        (lambda: request(target="default/a"), "target is not a mesh member"),
        (lambda: b'{"from": "default/a"}\n', "malformed request"),
        (lambda: b"not json\n", "malformed request"),
    ],
)
async def test_refusals_never_probe(lab: Lab, make: Any, why: str) -> None:
    answer = await raw(lab.port, make())
    assert answer == {"error": why}
    assert lab.probed == []


async def test_a_replayed_request_is_refused(lab: Lab) -> None:
    payload = request(nonce="once")
    assert "kinds" in (await raw(lab.port, payload) or {})
    assert await raw(lab.port, payload) == {"error": "replayed request"}
    assert lab.probed == ["default/t"]


async def test_an_oversized_request_is_dropped_unanswered(lab: Lab) -> None:
    assert await raw(lab.port, b"x" * (MAX_LINE * 4)) is None
    assert lab.probed == []


async def test_callers_are_rate_limited() -> None:
    the_lab = Lab([CALLER, TARGET], rate=1.0)  # bursts of 2
    answers = [await the_lab.server.answer("127.0.0.1", request(nonce=f"r{i}")[:-1])
               for i in range(4)]
    assert ["kinds" in a for a in answers] == [True, True, False, False]
    assert answers[2] == {"error": "rate limited"}
    # Another caller address has its own bucket.
    other = await the_lab.server.answer("127.0.0.2", request(nonce="x")[:-1])
    assert other.get("error") == "caller is not a mesh member at this address"


def test_token_bucket_refills() -> None:
    b = TokenBucket(rate=2.0, burst=2.0)
    assert [b.allow("k", now=0.0) for _ in range(3)] == [True, True, False]
    assert b.allow("k", now=0.5) is True
