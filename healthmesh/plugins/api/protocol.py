"""The API's HTTP connections: a cap with eviction of idle ones, deadlines, JSON errors only.

uvicorn's h11 protocol, made to hold against a local client that misbehaves:

- **Cap with a reserve.** At ``max_connections`` open connections, a new connection closes
  the oldest *idle* one (no request in progress) instead of being refused, so idle or
  half-written connections cannot lock ``healthmesh status`` out. Only when every
  connection has a request in progress is the newcomer answered ``503`` and closed.
- **Deadlines.** A connection must send a complete request head within ``idle_timeout``
  of connecting or of its previous answer. Bytes trickled in do not extend it (a
  half-written request gets ``408``), and an answer the client does not read within
  that time is dropped with the connection.
- **Pipelining.** The next pipelined request is not handled while the previous answer still
  waits for the client to read it, so a client that writes and never reads cannot make
  the agent buffer answers without bound.
- **JSON errors.** Every error this layer answers itself (400 malformed, 431 head too big,
  408, 503 at the cap) carries ``{"error", "code", "message"}``, never uvicorn's text.
- **Lingering close.** A connection closed after an answer shuts down its write side and
  discards what the client still sends for up to ``LINGER`` seconds: closing a unix socket
  with unread input makes the client's read fail with ECONNRESET before it sees the answer.
"""

from __future__ import annotations

import asyncio
import http
import json
from typing import Any

import h11  # uvicorn's own HTTP/1.1 parser (a dependency of uvicorn)
from loguru import logger
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Seconds a closed connection keeps discarding input so that the client reads its answer.
LINGER = 1.0


def error_bytes(status: int, message: str) -> bytes:
    """A whole ``connection: close`` HTTP/1.1 response with a JSON error body.

    The body carries both shapes the API uses (``error`` for /v1, ``code``/``message``
    for /v1beta), because these errors happen before the request's path is known.
    """
    body = json.dumps({"error": message, "code": status, "message": message}).encode()
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class LingeringTransport:
    """A transport whose ``close`` lets the client read the answer first (see LINGER)."""

    def __init__(
        self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, longest: float
    ) -> None:
        self.raw = transport
        self.loop = loop
        self.longest = longest  # while an answer is still being read
        self.lingering = False
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # The calls of every request, bound once rather than looked up through __getattr__.
        self.write = transport.write
        self.get_write_buffer_size = transport.get_write_buffer_size
        self.get_extra_info = transport.get_extra_info

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def is_closing(self) -> bool:
        return self.lingering or self.raw.is_closing()

    def close(self) -> None:
        if self.lingering or self.raw.is_closing():
            return
        self.lingering = True
        try:
            self.raw.write_eof()  # after what is buffered; the client then reads EOF
            self.raw.resume_reading()  # to discard input and see the client's EOF
        except (OSError, RuntimeError, NotImplementedError):
            self.raw.close()
            return
        self._since = self.loop.time()
        self._timer = self.loop.call_later(LINGER, self._linger_end)

    def _linger_end(self) -> None:
        # An answer still being read gets up to the idle timeout; then, or once read, go.
        if self.raw.get_write_buffer_size() and self.loop.time() - self._since < self.longest:
            self._timer = self.loop.call_later(LINGER, self._linger_end)
        else:
            self.abort()

    def client_done(self) -> None:
        """The client sent EOF: close once our answer is out (the timer bounds that)."""
        if not self.raw.get_write_buffer_size():
            self.abort()

    def abort(self) -> None:
        self.cancel()
        self.raw.abort()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ConnectionTable:
    """Every open connection of one server, oldest first, and the limits they live under."""

    def __init__(self, max_connections: int, idle_timeout: float) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.open: dict[ApiProtocol, None] = {}  # insertion order: oldest first
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0

    def admit(self, conn: ApiProtocol) -> bool:
        """Make room for ``conn`` (closing the oldest idle connection); False when none is."""
        if len(self.open) >= self.max_connections:
            victim = next((c for c in self.open if c.idle()), None)
            if victim is None:
                self.refused += 1
                return False
            self.evicted += 1
            victim.drop()
        self.open[conn] = None
        return True

    def forget(self, conn: ApiProtocol) -> None:
        self.open.pop(conn, None)


class _Connection(h11.Connection):
    """h11's connection, remembering the protocol error it raised (for its status hint)."""

    error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error = exc
            raise


class ApiProtocol(H11Protocol):
    """One API connection; ``table`` is set on the subclass made for each server."""

    table: ConnectionTable

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, self.config.h11_max_incomplete_event_size)
        self.timeout_keep_alive = self.table.idle_timeout
        self._held = False  # the next pipelined request waits until the answer is read
        self._admitted = False

    # -- life cycle --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self.lingering = LingeringTransport(
            transport, self.loop, self.table.idle_timeout  # type: ignore[arg-type]
        )
        super().connection_made(self.lingering)  # type: ignore[arg-type]
        if not self.table.admit(self):
            self.connections.discard(self)
            self._reply_and_close(
                503,
                f"the API has {self.table.max_connections} connections, each with a request "
                "in progress; try again shortly",
            )
            return
        self._admitted = True
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.forget(self)
        self.lingering.cancel()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        if self.lingering.lingering:
            self.lingering.client_done()
            return True  # keep the transport open until our answer is out
        return None

    def idle(self) -> bool:
        """No request in progress: nothing is lost by closing this connection."""
        return self.cycle is None or self.cycle.response_complete

    def drop(self) -> None:
        """Close now; an answer still unread by the client is discarded."""
        self.table.forget(self)
        self._unset_keepalive_if_required()
        if self.lingering.raw.is_closing():
            return
        if self.lingering.lingering or self.transport.get_write_buffer_size():
            self.lingering.abort()  # close() would wait for a client that does not read
        else:
            self.lingering.raw.close()

    def _arm(self) -> None:
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    # -- reading -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # Unlike uvicorn, data does not restart the deadline: only a complete request head
        # stops it (in handle_events), so a request trickled in byte by byte still ends.
        if not self._admitted or self.transport.is_closing():
            return  # refused, or closed after an answer: input is discarded
        try:
            self.conn.receive_data(data)
            self.handle_events()
        except Exception as exc:  # a request uvicorn cannot turn into a scope
            logger.debug("api: unreadable request: {!r}", exc)
            self._reply_and_close(400, f"invalid HTTP request: {type(exc).__name__}")

    def send_400_response(self, msg: str) -> None:
        error = self.conn.error
        status = getattr(error, "error_status_hint", 400) or 400
        if status == 431:
            message = (f"request line and headers over {self.config.h11_max_incomplete_event_size}"
                       " bytes")
        else:
            message = f"invalid HTTP request: {error or msg}"
        self._reply_and_close(status, message)

    def timeout_keep_alive_handler(self) -> None:
        if self.transport.is_closing():
            return
        if not self.idle():
            if self.flow.write_paused:
                # An answer in progress that waits only for a client that does not read.
                self.table.timed_out += 1
                self.drop()
            return
        self.table.timed_out += 1
        started = self.conn.their_state is not h11.IDLE or bool(self.conn.trailing_data[0])
        if started and self.conn.our_state is h11.IDLE:
            self._reply_and_close(
                408, f"no complete request within {self.timeout_keep_alive:g}s"
            )
        else:
            self.drop()

    # -- writing -----------------------------------------------------------------------------

    def on_response_complete(self) -> None:
        if not self.transport.is_closing() and self.flow.write_paused:
            # The client has not read this answer yet: handle no pipelined request until it
            # does, and give it idle_timeout to do so.
            self._held = True
            self._arm()
            return
        super().on_response_complete()

    def pause_writing(self) -> None:
        # The client stopped reading, perhaps in the middle of an answer: from now on it has
        # idle_timeout to read on, or the connection goes (else an answer blocked on a client
        # that never reads would hold the connection forever). Every pause restarts the
        # deadline: a client that reads slowly but reads is not cut off.
        super().pause_writing()
        self._arm()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._held:
            self._held = False
            super().on_response_complete()

    def shutdown(self) -> None:
        if self.idle():
            self.drop()
        else:
            super().shutdown()

    def _reply_and_close(self, status: int, message: str) -> None:
        self.table.forget(self)
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size():
            self.transport.abort()
            return
        self.transport.write(error_bytes(status, message))
        self.transport.close()


def protocol_class(table: ConnectionTable) -> type[ApiProtocol]:
    """An ``ApiProtocol`` bound to one server's connection table."""
    return type("ApiProtocolBound", (ApiProtocol,), {"table": table})
