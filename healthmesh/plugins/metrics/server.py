"""A small bounded HTTP/1.1 server (h11 on anyio) for ``GET /metrics``.

It is a listener on the network, so everything is bounded: open connections (the oldest is
closed to make room), the request head (8 KiB), the time to complete a TLS handshake, to send
a head and to read the answer, the idle time between kept-alive requests; a request body is
never read.
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import h11
from anyio.abc import AnyByteStream, Listener, SocketStream
from anyio.streams.tls import TLSStream
from loguru import logger

MAX_HEAD = 8 * 1024
RECV_SIZE = 16 * 1024


@dataclass
class Reply:
    """A response: status, extra headers and body (empty for HEAD)."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


#: ``handler(method, target, headers) -> Reply``; headers are lower-case names.
Handler = Callable[[str, str, dict[str, str]], Reply]


class _Timeout(Exception):
    pass


@dataclass
class Counters:
    """What the server did, for tests and logs."""

    accepted: int = 0
    requests: int = 0
    shed: int = 0
    timed_out: int = 0
    bad: int = 0


class MetricsServer:
    """Serves ``handler`` on one TCP listener until cancelled."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_connections: int,
        header_timeout: float,
        idle_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.counters = Counters()
        self._open: dict[anyio.CancelScope, None] = {}  # insertion order is age

    @staticmethod
    async def bind(host: str, port: int) -> Listener[SocketStream]:
        """The listening socket (OSError when the address cannot be bound)."""
        return await anyio.create_tcp_listener(local_host=host, local_port=port, backlog=64)

    async def serve(self, listener: Listener[SocketStream]) -> None:
        """Serve connections from ``listener`` until cancelled; closes it at the end."""
        async with listener, anyio.create_task_group() as tg:
            await listener.serve(self._connection, task_group=tg)

    async def _connection(self, stream: SocketStream) -> None:
        self.counters.accepted += 1
        if len(self._open) >= self.max_connections:
            excess = len(self._open) - self.max_connections + 1
            for old in list(itertools.islice(self._open, excess)):
                self.counters.shed += 1
                old.cancel()
                self._open.pop(old, None)
        scope = anyio.CancelScope()
        self._open[scope] = None
        conn: AnyByteStream = stream
        try:
            with scope:
                if self.ssl_context is not None:
                    # The handshake counts against the head timeout and the connection cap.
                    with anyio.move_on_after(self.header_timeout):
                        conn = await TLSStream.wrap(
                            stream, server_side=True, ssl_context=self.ssl_context,
                            standard_compatible=False,
                        )
                    if conn is stream:
                        raise _Timeout
                await self._serve(conn)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        except _Timeout:
            self.counters.timed_out += 1
        except Exception as exc:  # a bug must cost one connection, never the listener
            logger.opt(exception=exc).error("metrics: connection failed: {}", exc)
        finally:
            self._open.pop(scope, None)
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                await conn.aclose()
            await anyio.aclose_forcefully(stream)

    async def _receive(self, stream: AnyByteStream, deadline: float) -> bytes:
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            try:
                return await stream.receive(RECV_SIZE)
            except anyio.EndOfStream:
                return b""
        raise _Timeout

    async def _send(self, stream: AnyByteStream, data: bytes) -> None:
        with anyio.move_on_after(self.header_timeout):
            await stream.send(data)
            return
        raise _Timeout

    async def _serve(self, stream: AnyByteStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        deadline = anyio.current_time() + self.idle_timeout
        started = False  # bytes of the next request arrived: the head timeout runs
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.counters.bad += 1
                status = exc.error_status_hint if exc.error_status_hint >= 400 else 400
                await self._reply_error(stream, conn, status, str(exc))
                return
            if event is h11.NEED_DATA:
                data = await self._receive(stream, deadline)
                if data and not started:
                    started = True
                    deadline = min(deadline, anyio.current_time() + self.header_timeout)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                return
            self.counters.requests += 1
            method = event.method.decode("ascii", "replace")
            target = event.target.decode("ascii", "replace")
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
            if not await self._no_body(stream, conn, deadline):
                await self._reply_error(stream, conn, 413, "a request body is not accepted")
                return
            if method not in ("GET", "HEAD"):
                reply = Reply(405, b"405 method not allowed\n", [("allow", "GET, HEAD")])
            else:
                reply = self.handler(method, target, headers)
            await self._reply(stream, conn, reply, head=method == "HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
            deadline = anyio.current_time() + self.idle_timeout
            started = False

    async def _no_body(self, stream: AnyByteStream, conn: h11.Connection, deadline: float) -> bool:
        """Read up to the end of the request; False when it has a body."""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self._receive(stream, deadline))
                continue
            return isinstance(event, h11.EndOfMessage)

    async def _reply(
        self, stream: AnyByteStream, conn: h11.Connection, reply: Reply, *, head: bool
    ) -> None:
        headers = [*reply.headers, ("content-length", str(len(reply.body)))]
        if reply.status >= 400 and reply.status != 404:
            headers.append(("connection", "close"))
        out = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
        if not head and reply.body:
            out += conn.send(h11.Data(data=reply.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await self._send(stream, out)

    async def _reply_error(
        self, stream: AnyByteStream, conn: h11.Connection, status: int, why: str
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{status} {why[:200]}\n".encode("ascii", "replace")
        reply = Reply(status, body, [("content-type", "text/plain; charset=utf-8")])
        try:
            await self._reply(stream, conn, reply, head=False)
        except h11.LocalProtocolError:
            return
