"""``GET /v1/events``: the agent's state-change events as an NDJSON stream.

``?since=SEQ`` replays the events after SEQ from the ring, ``?since=RFC3339`` those at or
after that time; then live events follow (``?follow=false``: stop after the replay). A
heartbeat line comes after ``HEARTBEAT`` seconds without an event, so proxies and clients
can tell a quiet stream from a dead one. At most ``MAX_STREAMS`` streams at once.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import anyio
import msgspec
from loguru import logger

from healthmesh import AgentContext, Event, Gap, rfc3339
from healthmesh.plugins.api.app import HttpError

MAX_STREAMS = 16
HEARTBEAT = 15.0
#: Lines written in one chunk at most (a replay of the whole ring goes out in pieces).
CHUNK_LINES = 256

Scope = dict[str, Any]


def parse_since(value: str | None, context: AgentContext) -> int | None:
    """The seq to replay after, from a seq or an RFC 3339 time; None replays nothing."""
    if value is None or value == "":
        return None
    if value.isdigit():
        if len(value) > 18:
            raise HttpError(400, f"since: {value!r} is too large")
        return int(value)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise HttpError(
            400, f"since: {value!r} is neither a seq (0, 42) nor an RFC 3339 time "
            "(2026-12-01T18:00:00Z)"
        ) from None
    if when.tzinfo is None:
        raise HttpError(400, f"since: {value!r} has no time zone; add Z or +00:00")
    return context.events.after_time(when.timestamp())


def parse_follow(value: str | None) -> bool:
    if value is None or value.lower() in ("", "true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise HttpError(400, f"follow: {value!r} is not true or false")


class EventStreams:
    """Serves /v1/events; counts open streams to keep them bounded."""

    def __init__(self, context: AgentContext, *, heartbeat: float = HEARTBEAT,
                 max_streams: int = MAX_STREAMS) -> None:
        self.context = context
        self.heartbeat = heartbeat
        self.max_streams = max_streams
        self.open = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any, query: dict[str, str]) -> None:
        """Serve one request: HttpError (before any byte is sent) when it is refused."""
        after, follow = self.check(scope.get("method", "GET"), query)
        await self.serve(scope, receive, send, after, follow)

    def check(self, method: str, query: dict[str, str]) -> tuple[int | None, bool]:
        """Validate a request before any byte is sent: (after, follow) or HttpError."""
        if method not in ("GET", "HEAD"):
            raise HttpError(405, f"method {method} is not allowed on /v1/events; use GET, HEAD",
                              ((b"allow", b"GET, HEAD"),))
        unknown = sorted(set(query) - {"since", "follow"})
        if unknown:
            raise HttpError(400, f"{unknown[0]}: unknown query parameter (since, follow)")
        after = parse_since(query.get("since"), self.context)
        follow = parse_follow(query.get("follow"))
        if self.open >= self.max_streams:
            raise HttpError(503, f"too many event streams open ({self.max_streams}); "
                              "close one or try again later", ((b"retry-after", b"5"),))
        return after, follow

    async def serve(self, scope: Scope, receive: Any, send: Any, after: int | None,
                    follow: bool) -> None:
        """Write the stream until the client leaves (or the replay ends without follow)."""
        log = self.context.events
        if after is None:
            after = log.seq if follow else 0  # live only, or the whole ring
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/x-ndjson"),
                (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no"),  # nginx: do not buffer a live stream
            ],
        })
        if scope.get("method") == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        self.open += 1
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
                await self._write(log, after, follow, send)
                tg.cancel_scope.cancel()
        except Exception as exc:  # the response has started: log, end the stream
            logger.opt(exception=exc).error("api: /v1/events stream failed")
        finally:
            self.open -= 1
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            await send({"type": "http.response.body", "body": b""})

    async def _write(self, log: Any, after: int, follow: bool, send: Any) -> None:
        end = log.seq
        with log.follow(after) as follower:
            if not follow:
                while follower.last < end:
                    item = follower.receive_nowait()
                    if item is None:
                        break
                    items = follower.batch(item, CHUNK_LINES)
                    await _send_lines(send, [i for i in items
                                             if isinstance(i, Gap) or i.seq <= end])
                return
            while True:
                item: Event | Gap | None = None
                with anyio.move_on_after(self.heartbeat):
                    item = await follower.receive()
                if item is None:
                    await _send_lines(send, [{"type": "heartbeat", "time": rfc3339(time.time()),
                                              "seq": log.seq}])
                    continue
                await _send_lines(send, follower.batch(item, CHUNK_LINES))


_encoder = msgspec.json.Encoder()


async def _send_lines(send: Any, items: list[Any]) -> None:
    if items:
        body = b"".join(_encoder.encode(i) + b"\n" for i in items)
        await send({"type": "http.response.body", "body": body, "more_body": True})


async def _watch_disconnect(receive: Any, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            scope.cancel()
            return
