"""A small bounded HTTP/1.1 server for the page, on anyio and h11: read-only, no bodies.

It holds against clients that misbehave, whatever they send:

- **Connections are capped.** At ``max_connections`` a newcomer closes the oldest
  connection that has no request in progress (idle keep-alives, half-written heads); only
  when every one is busy is it answered ``503`` and closed.
- **Deadlines.** A request head must be complete within ``idle_timeout`` of connecting or of
  the previous answer (bytes trickled in do not extend it: ``408``), and each 256 KiB of
  an answer must be read within it, or the connection is dropped. A head over
  ``max_header_bytes`` gets ``431``; garbage gets ``400``; a request with a body gets
  ``413`` and the connection closes unread. One request is handled at a time per
  connection, so pipelining cannot queue answers.
"""

from __future__ import annotations

import http
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import h11
from anyio.abc import SocketStream
from loguru import logger

#: Bytes read from a connection at a time.
READ_SIZE = 65536
#: Bytes of an answer written at a time, each piece under the idle timeout.
WRITE_SIZE = 256 * 1024


@dataclass
class Request:
    """What a handler needs of a request."""

    method: str
    path: str
    query: bytes
    headers: dict[bytes, bytes]


@dataclass
class Response:
    """A whole response: status, headers (lower-case names) and body."""

    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]

#: Headers on the answers this layer makes itself (no request reached the handler).
BASE_HEADERS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"connection", b"close"),
]


def raw_response(status: int, message: str) -> bytes:
    """A whole ``connection: close`` response with a one-line text body."""
    body = (message + "\n").encode()
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    head = f"HTTP/1.1 {status} {reason}\r\n".encode("ascii")
    for name, value in [*BASE_HEADERS, (b"content-length", str(len(body)).encode())]:
        head += name + b": " + value + b"\r\n"
    return head + b"\r\n" + body


class _Conn:
    """One connection's bookkeeping: whether a request is in progress, and how to end it."""

    __slots__ = ("busy", "scope")

    def __init__(self) -> None:
        self.busy = False
        self.scope = anyio.CancelScope()


class Server:
    """Serves ``handler`` on listeners with the limits above; counters for the tests."""

    def __init__(self, handler: Handler, *, max_connections: int, idle_timeout: float,
                 max_header_bytes: int) -> None:
        self.handler = handler
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_header_bytes = max_header_bytes
        self.open: dict[_Conn, None] = {}  # insertion order: oldest first
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0

    def _admit(self, conn: _Conn) -> bool:
        if len(self.open) >= self.max_connections:
            victim = next((c for c in self.open if not c.busy), None)
            if victim is None:
                self.refused += 1
                return False
            self.evicted += 1
            self.open.pop(victim, None)
            victim.scope.cancel()
        self.open[conn] = None
        return True

    async def handle(self, stream: SocketStream) -> None:
        """Serve one connection until it closes, times out or is evicted."""
        conn = _Conn()
        try:
            if not self._admit(conn):
                await self._send_raw(stream, 503, "too many connections with a request in "
                                     "progress; try again shortly")
                return
            with conn.scope:
                await self._serve(stream, conn)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception as exc:  # one connection's surprise must not stop the server
            logger.opt(exception=exc).debug("web: connection failed")
            logger.warning("web: a connection failed: {}: {}", type(exc).__name__, exc)
        finally:
            self.open.pop(conn, None)
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _send_raw(self, stream: SocketStream, status: int, message: str) -> None:
        with anyio.move_on_after(1.0):
            await stream.send(raw_response(status, message))

    async def _serve(self, stream: SocketStream, conn: _Conn) -> None:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
        while True:
            conn.busy = False
            with anyio.move_on_after(self.idle_timeout) as deadline:
                event = await self._next_request(stream, h)
            if deadline.cancelled_caught:
                self.timed_out += 1
                if h.their_state is not h11.IDLE or h.trailing_data[0]:
                    await self._send_raw(stream, 408, "no complete request within "
                                         f"{self.idle_timeout:g}s")
                return
            if event is None:
                return
            conn.busy = True
            # h11 bounds a head only while it is incomplete; one that came in a single read
            # is measured here (request line and "name: value\r\n" lines).
            size = len(event.method) + len(event.target) + 12
            size += sum(len(name) + len(value) + 4 for name, value in event.headers)
            if size > self.max_header_bytes:
                await self._send_raw(stream, 431, "request line and headers over "
                                     f"{self.max_header_bytes} bytes")
                return
            if event.http_version not in (b"1.0", b"1.1"):
                await self._send_raw(stream, 505, "HTTP/1.0 and HTTP/1.1 only")
                return
            request = Request(
                event.method.decode("latin-1"),
                event.target.decode("latin-1").partition("?")[0],
                event.target.partition(b"?")[2],
                {name.lower(): value for name, value in event.headers},
            )
            has_body = any(n == b"transfer-encoding" or (n == b"content-length" and v != b"0")
                           for n, v in request.headers.items())
            if has_body:
                await self._send_raw(stream, 413, "this server takes no request bodies")
                return
            try:
                response = await self.handler(request)
            except Exception as exc:
                logger.opt(exception=exc).error("web: {} {} failed", request.method,
                                                request.path)
                response = Response(500, b"internal error; see the agent's log\n",
                                    [(b"content-type", b"text/plain; charset=utf-8")])
            out = memoryview(self._encode(h, request.method == "HEAD", response))
            # Each piece must go within the idle timeout: a slow reader of a 10 MB matrix
            # keeps its connection while it makes progress, one that stops reading loses it.
            for start in range(0, len(out), WRITE_SIZE):
                with anyio.move_on_after(self.idle_timeout) as deadline:
                    await stream.send(out[start:start + WRITE_SIZE])
                if deadline.cancelled_caught:
                    self.timed_out += 1
                    return  # the client does not read its answer
            # The request had no body, so its end is parsed already; take it to start anew.
            if not isinstance(h.next_event(), h11.EndOfMessage):
                return
            if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                return
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                return

    def _encode(self, h: h11.Connection, head_only: bool, response: Response) -> bytes:
        headers = [*response.headers, (b"content-length", str(len(response.body)).encode())]
        try:
            reason = http.HTTPStatus(response.status).phrase.encode()
        except ValueError:
            reason = b""
        data = h.send(h11.Response(status_code=response.status, headers=headers,
                                   reason=reason)) or b""
        if not head_only and response.body:
            data += h.send(h11.Data(data=response.body)) or b""
        data += h.send(h11.EndOfMessage()) or b""
        return data

    async def _next_request(self, stream: SocketStream, h: h11.Connection) -> Any:
        """The next request event; None when the client closed or sent garbage (answered)."""
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint or 400
                if status == 431:
                    message = f"request line and headers over {self.max_header_bytes} bytes"
                else:
                    message = f"invalid HTTP request: {exc}"
                await self._send_raw(stream, status, message)
                return None
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(READ_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = b""
                h.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                return event
            return None  # ConnectionClosed
