"""Indirect probes (SWIM's ping-req): ask k other agents whether they reach a target.

An agent whose own row says a target is unreachable asks ``indirect_k`` other members
(heartbeat alive) to probe it; their answers show in the verdicts' evidence. The endpoint is
its own TCP port (``indirect_port``): one request per connection, one JSON line each way,
both authenticated with HMAC-SHA256 over a shared secret (``indirect_secret_file``).

It is never an open proxy: the caller must be a mesh member connecting from one of its own
addresses, the target is named by its node id and resolved to that member's addresses here
(a caller cannot name an address), requests are size- and time-bounded, carry a timestamp
(±30 s) and a nonce never accepted twice, and each caller address gets a token bucket.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketStream
from loguru import logger

from healthmesh import Node

MAX_LINE = 1024
READ_TIMEOUT = 2.0
CLOCK_SKEW = 30.0
NONCES_KEPT = 10_000


def sign(secret: bytes, *parts: object) -> str:
    """HMAC-SHA256 of the parts joined with ``|``, hex."""
    msg = "|".join(str(p) for p in parts).encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


class TokenBucket:
    """``rate`` requests per second per key, bursts of ``burst``; at most ``keys`` keys."""

    def __init__(self, rate: float, burst: float, keys: int = 4096) -> None:
        self.rate, self.burst, self.keys = rate, burst, keys
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._state.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._state[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self._state) > self.keys:
            self._state.popitem(last=False)
        return ok


class IndirectServer:
    """Answers members' indirect probe requests about members."""

    def __init__(
        self,
        secret: bytes,
        members: Callable[[], Iterable[Node]],
        probe: Callable[[str, float], Any],
        *,
        rate: float,
        timeout: float,
    ) -> None:
        self.secret = secret
        self.members = members
        self.probe = probe
        self.bucket = TokenBucket(rate, max(1.0, 2 * rate))
        self.timeout = timeout
        self._nonces: OrderedDict[str, None] = OrderedDict()
        self.refused: dict[str, int] = {}

    def _refuse(self, why: str) -> dict[str, Any]:
        self.refused[why] = self.refused.get(why, 0) + 1
        return {"error": why}

    async def handle(self, stream: SocketStream) -> None:
        async with stream:
            try:
                peer = str(stream.extra(SocketAttribute.remote_address)[0])
            except Exception:
                return
            try:
                with anyio.fail_after(READ_TIMEOUT):
                    line = await _read_line(stream)
            except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError,
                    ValueError):  # fmt: skip
                return
            answer = await self.answer(peer, line)
            try:
                with anyio.fail_after(READ_TIMEOUT):
                    await stream.send(json.dumps(answer).encode() + b"\n")
            except (TimeoutError, anyio.BrokenResourceError, OSError):
                return

    async def answer(self, peer: str, line: bytes) -> dict[str, Any]:
        """The reply to one request line from address ``peer``."""
        if not self.bucket.allow(peer):
            return self._refuse("rate limited")
        try:
            req = json.loads(line)
            sender, target = str(req["from"]), str(req["target"])
            ts, nonce, mac = float(req["ts"]), str(req["nonce"]), str(req["mac"])
        except (ValueError, KeyError, TypeError):
            return self._refuse("malformed request")
        if not hmac.compare_digest(mac, sign(self.secret, sender, target, ts, nonce)):
            return self._refuse("bad signature")
        if abs(time.time() - ts) > CLOCK_SKEW or len(nonce) > 64:
            return self._refuse("stale request")
        if nonce in self._nonces:
            return self._refuse("replayed request")
        self._nonces[nonce] = None
        while len(self._nonces) > NONCES_KEPT:
            self._nonces.popitem(last=False)
        members = {n.id: n for n in self.members()}
        origin = members.get(sender)
        if origin is None or peer not in {*origin.addresses, *origin.health_addresses}:
            return self._refuse("caller is not a mesh member at this address")
        if target not in members or target == sender:
            return self._refuse("target is not a mesh member")
        with anyio.move_on_after(self.timeout + 1.0):
            kinds = await self.probe(target, self.timeout)
            reply = {"target": target, "kinds": kinds, "nonce": nonce}
            reply["mac"] = sign(self.secret, target, json.dumps(kinds, sort_keys=True), nonce)
            return reply
        return self._refuse("probe timed out")


async def _read_line(stream: SocketStream) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive(MAX_LINE)
        buf += chunk
        if len(buf) > MAX_LINE:
            raise ValueError("request too long")
    return buf.split(b"\n", 1)[0]


async def ask(
    secret: bytes, me: str, helper: Node, port: int, target: str, timeout: float
) -> bool | None:
    """Ask ``helper`` to probe ``target``: True/False (reached by some kind), None on no answer."""
    nonce = secrets.token_hex(16)
    ts = time.time()
    req = {"from": me, "target": target, "ts": ts, "nonce": nonce,
           "mac": sign(secret, me, target, ts, nonce)}  # fmt: skip
    try:
        with anyio.fail_after(timeout + 2.0):
            async with await anyio.connect_tcp(helper.addresses[0], port) as stream:
                await stream.send(json.dumps(req).encode() + b"\n")
                line = await _read_line(stream)
        reply = json.loads(line)
        kinds = reply["kinds"]
        good = sign(secret, target, json.dumps(kinds, sort_keys=True), nonce)
        if reply.get("nonce") != nonce or not hmac.compare_digest(str(reply["mac"]), good):
            return None
        return any(bool(v) for v in kinds.values())
    except (OSError, TimeoutError, ValueError, KeyError, TypeError, anyio.EndOfStream,
            anyio.BrokenResourceError):  # fmt: skip
        return None


class IndirectProber:
    """Asks k helpers about every target this agent's row shows unreachable, each interval."""

    def __init__(
        self,
        context: Any,
        secret: bytes,
        members: Callable[[], list[Node]],
        *,
        k: int,
        port: int,
        timeout: float,
        interval: float,
    ) -> None:
        self.context = context
        self.secret = secret
        self.members = members
        self.k, self.port, self.timeout, self.interval = k, port, timeout, interval
        self.results: dict[str, dict[str, Any]] = {}

    async def round(self) -> None:
        row = self.context.local_row()
        me = row["observer"]
        down = [t for t, c in row["cells"].items() if t != me and c["state"] == "unreachable"]
        alive = [n for n in self.members()
                 if n.info.get("heartbeat") == "alive" and n.addresses]  # fmt: skip
        results: dict[str, dict[str, Any]] = {}
        for target in down[:64]:  # bounded work per round
            helpers = [n for n in alive if n.id not in (me, target)]
            chosen = random.sample(helpers, min(self.k, len(helpers)))
            answers: dict[str, bool | None] = {}

            async def one(h: Node, target: str = target,
                          answers: dict[str, bool | None] = answers) -> None:
                answers[h.id] = await ask(self.secret, me, h, self.port, target, self.timeout)

            async with anyio.create_task_group() as tg:
                for h in chosen:
                    tg.start_soon(one, h)
            results[target] = {
                "asked": sorted(answers),
                "reached": sorted(h for h, ok in answers.items() if ok),
                "failed": sorted(h for h, ok in answers.items() if ok is False),
            }
        self.results = results
        self.context.publish_indirect(results)

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception as exc:  # never let one round stop the loop
                logger.warning("indirect probes: {}: {}", type(exc).__name__, exc)
            await anyio.sleep(self.interval)
