"""The 4240 responder: ``/hello`` → 200 with an empty body, anything else → 404, as Cilium's.

Event-loop reader/writer callbacks on bare sockets (no transport, protocol or task per
connection) and a bounded head parser (``wire``): cheap per request, and bounded in every
dimension a client controls — head size, header count, time to send a head, idle time
between requests, and the number of open connections (at the cap the oldest connection is
dropped, so a flood of idle connections cannot lock probes out).
Why this and not an ASGI server: docs/http.md and docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import resource
import socket
import time
from email.utils import formatdate
from typing import Any, ClassVar

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from healthmesh import AgentContext, ComponentSettings, Duration, Service
from healthmesh.plugins.http.listen import bind, check_listen, format_listen, ipv6_unavailable
from healthmesh.plugins.http.wire import (
    MIN_HEAD_BYTES,
    MalformedHead,
    check_request_line,
    head_end,
    heads_in,
    parse_request_head,
)

HELLO = b"/hello"
DEFAULT_LISTEN = ("0.0.0.0:4240", "[::]:4240")
#: Seconds a closing connection may go on sending input we discard (see ``_finish``).
LINGER = 2.0
ACCEPTS_PER_WAKEUP = 64
#: Queued (pipelined) requests answered per event-loop iteration, over all connections: the
#: work a flood of pipelined requests adds to each iteration stays the same however many
#: connections carry it, so a probe on another connection waits for at most this many.
TURNS_PER_ITERATION = 16
#: Bytes read per wake-up: a request head at most 8 KiB by default, a little pipelining.
_RECV_SIZE = 16384
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: File descriptors kept free for everything else the process does (API socket, probes).
FD_RESERVE = 256


class ResponderSettings(ComponentSettings):
    """``[responder]``: where to listen and the limits that keep the responder standing."""

    listen: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_LISTEN))
    #: Open connections at most; at the cap the oldest is closed to make room.
    max_connections: int = 4096
    #: Time a client has to send a complete request head, from its first byte (or accept).
    header_timeout: Duration = Duration(5.0)
    #: Time a kept-alive connection may sit idle between requests.
    idle_timeout: Duration = Duration(30.0)
    #: Request line plus headers, in bytes; longer heads get 431 and a close.
    max_head_bytes: int = 8192
    max_headers: int = 64
    #: Requests a client may queue behind the one being answered; past it the client gets
    #: that many answers, the last with ``Connection: close``, and the connection is closed.
    max_pipelined: int = 16
    backlog: int = 1024


class Responder(Service):
    """Answers peers' ``GET /hello`` on every listen address until cancelled."""

    name: ClassVar[str] = "responder"
    section: ClassVar[str] = "responder"
    default_enabled: ClassVar[bool] = True
    run_once: ClassVar[bool] = True
    Settings: ClassVar[type[ComponentSettings]] = ResponderSettings

    def __init__(self, settings: ResponderSettings, context: AgentContext | None = None) -> None:
        super().__init__(settings, context)  # type: ignore[arg-type]
        self.addresses: list[str] = []  # bound, as ADDR:PORT (the real port when 0 was asked)
        self.pool: ConnectionPool | None = None

    @classmethod
    def validate_settings(cls, settings: ResponderSettings, config: Any) -> None:
        """Check the listen addresses and that every limit is positive."""
        check_listen(settings.listen)
        for key in ("max_connections", "max_head_bytes", "max_headers", "backlog"):
            if getattr(settings, key) < 1:
                raise ValueError(f"{key}: must be at least 1")
        if settings.max_pipelined < 0:
            raise ValueError("max_pipelined: must be at least 0")
        if settings.max_head_bytes < 256:
            raise ValueError("max_head_bytes: must be at least 256")
        for key in ("header_timeout", "idle_timeout"):
            if getattr(settings, key) <= 0:
                raise ValueError(f"{key}: must be greater than zero")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind every address (OSError naming the one that fails), report ready, serve."""
        s: ResponderSettings = self.settings
        pairs = check_listen(s.listen)
        cap = _connection_cap(s.max_connections)
        socks = []
        try:
            for address, port in pairs:
                try:
                    socks.append(bind(address, port, s.backlog))
                except OSError as exc:
                    # A host without IPv6 still serves IPv4 on the default dual listen list.
                    if address == "::" and len(pairs) > 1 and ipv6_unavailable(exc):
                        logger.warning("responder: {}; serving IPv4 only", exc)
                        continue
                    raise
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        loop = asyncio.get_running_loop()
        pool = self.pool = ConnectionPool(loop, s, cap)
        pool.telemetry = getattr(self.context, "telemetry", None)  # counts status codes
        listeners: list[Listener] = []
        try:
            for sock in socks:
                listeners.append(Listener(pool, sock))
            self.addresses = [format_listen(*sock.getsockname()[:2]) for sock in socks]
            logger.info("responder listening on {}", ", ".join(self.addresses))
            if self.context is not None:  # None for `healthmesh responder` alone
                self.context.report(self, "ok", ", ".join(self.addresses))
            task_status.started()
            await pool.sweep_forever()
        finally:
            for listener in listeners:
                listener.close()
            for sock in socks:
                sock.close()
            pool.close_all()


def _connection_cap(wanted: int) -> int:
    """``wanted``, lowered to fit the open-file limit (raised to its hard maximum first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        cap = max(16, soft - FD_RESERVE)
        logger.warning(
            "responder: max_connections lowered from {} to {} (open-file limit {})",
            wanted, cap, soft,
        )
        return cap
    return wanted


class _Replies:
    """Pre-built response bytes; the Date header is refreshed once a second."""

    def __init__(self) -> None:
        self.second = -1
        self.date = b""
        self.hello_keep = self.hello_close = self.hello_keep10 = b""

    def refresh(self) -> None:
        now = int(time.time())
        if now == self.second:
            return
        self.second = now
        self.date = formatdate(now, usegmt=True).encode("ascii")
        base = b"HTTP/1.1 200 OK\r\nDate: " + self.date + b"\r\nContent-Length: 0\r\n"
        self.hello_keep = base + b"\r\n"
        self.hello_keep10 = base + b"Connection: keep-alive\r\n\r\n"
        self.hello_close = base + b"Connection: close\r\n\r\n"

    def hello(self, keep_alive: bool, minor: int) -> bytes:
        self.refresh()
        if not keep_alive:
            return self.hello_close
        return self.hello_keep if minor else self.hello_keep10

    def text(self, status: int, reason: str, body: bytes, *, keep_alive: bool, minor: int,
             head_only: bool) -> bytes:
        self.refresh()
        conn = b"" if keep_alive and minor else (
            b"Connection: keep-alive\r\n" if keep_alive else b"Connection: close\r\n"
        )
        return (
            f"HTTP/1.1 {status} {reason}\r\n".encode("ascii")
            + b"Content-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n"
            + b"Date: " + self.date + b"\r\n"
            + f"Content-Length: {len(body)}\r\n".encode("ascii")
            + conn + b"\r\n" + (b"" if head_only else body)
        )


REPLIES = _Replies()
NOT_FOUND = b"404 page not found\n"
_REASONS = {400: "Bad Request", 431: "Request Header Fields Too Large"}


class Listener:
    """Accepts on one listening socket and hands each connection to the pool."""

    def __init__(self, pool: ConnectionPool, sock: socket.socket) -> None:
        self.pool = pool
        self.sock = sock
        self.fd = sock.fileno()
        self.retry: asyncio.TimerHandle | None = None
        pool.loop.add_reader(self.fd, self.on_readable)

    def on_readable(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._out_of_resources(exc)
                    return
                continue  # the client gave up before we accepted (ECONNABORTED and the like)
            self.pool.accept(conn)

    def _out_of_resources(self, exc: OSError) -> None:
        # Free the oldest connections and pause accepting briefly instead of spinning.
        self.pool.shed(max(1, len(self.pool.open) // 16))
        now = time.monotonic()
        if now - self.pool.last_warning > 10:
            self.pool.last_warning = now
            logger.warning("responder: accept failed ({}); closed the oldest connections", exc)
        self.pool.loop.remove_reader(self.fd)
        self.retry = self.pool.loop.call_later(0.05, self._resume)

    def _resume(self) -> None:
        self.retry = None
        self.pool.loop.add_reader(self.fd, self.on_readable)

    def close(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
        else:
            self.pool.loop.remove_reader(self.fd)


class ConnectionPool:
    """Every open connection, oldest first: enforces the cap and the timeouts."""

    telemetry: Any = None  # the agent's Telemetry (None for the standalone responder)

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: ResponderSettings,
                 cap: int) -> None:
        self.loop = loop
        self.settings = settings
        self.cap = cap
        self.open: dict[Connection, None] = {}  # insertion order is age
        self.requests = 0
        self.evicted = 0
        self.timed_out = 0
        self.rejected = 0
        self.last_warning = 0.0
        self.turns: collections.deque[Connection] = collections.deque()  # waiting to go on
        self.turns_handle: asyncio.Handle | None = None

    def queue_turn(self, conn: Connection) -> None:
        """Answer ``conn``'s next queued request in a later loop iteration, in turn."""
        if conn.queued:
            return
        conn.queued = True
        self.turns.append(conn)
        if self.turns_handle is None:
            self.turns_handle = self.loop.call_soon(self._run_turns)

    def _run_turns(self) -> None:
        turns = self.turns
        for _ in range(min(len(turns), TURNS_PER_ITERATION)):
            conn = turns.popleft()
            conn.queued = False
            conn.on_turn()
        self.turns_handle = self.loop.call_soon(self._run_turns) if turns else None

    def accept(self, sock: socket.socket) -> None:
        if len(self.open) >= self.cap:
            self.shed(len(self.open) - self.cap + 1)
        sock.setblocking(False)
        conn = Connection(self, sock)
        self.open[conn] = None
        conn.on_readable()  # the request usually arrives with the handshake: answer it now

    def shed(self, count: int) -> None:
        """Close the ``count`` oldest connections to make room."""
        for conn in list(itertools.islice(self.open, count)):
            self.evicted += 1
            conn.close()

    async def sweep_forever(self) -> None:
        """Close connections past their deadline, a few times per (shortest) timeout."""
        s = self.settings
        tick = max(0.05, min(1.0, s.header_timeout / 4, s.idle_timeout / 4))
        while True:
            await anyio.sleep(tick)
            now = self.loop.time()
            late = [c for c in self.open if c.deadline < now]
            for conn in late:
                self.timed_out += 1
                conn.close()

    def close_all(self) -> None:
        if self.turns_handle is not None:
            self.turns_handle.cancel()
            self.turns_handle = None
        self.turns.clear()
        for conn in list(self.open):
            conn.close()
        self.open.clear()


class Connection:
    """One client connection: reads request heads, answers each, keeps alive when asked.

    Driven by reader/writer callbacks on the bare socket; the common probe (one request,
    ``Connection: close``) is answered inside the accept callback without registering it.
    At most one request is answered per callback: the requests a client pipelines wait
    for their turn (``ConnectionPool.queue_turn``), a bounded number per loop iteration, so
    every other connection is served in between; a client with more than ``max_pipelined``
    requests queued behind the one being answered gets that many answers, the last with
    ``Connection: close``, and is closed without reading the rest.
    """

    __slots__ = ("buf", "deadline", "draining", "fd", "left", "out", "pool", "queued", "reading",
                 "sock", "writing")

    def __init__(self, pool: ConnectionPool, sock: socket.socket) -> None:
        self.pool = pool
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.buf = b""  # input not answered yet; never holds a complete head while reading
        self.out = b""  # response bytes the socket did not take yet
        self.reading = self.writing = False
        self.draining = False  # answered and shut down for writing; discarding input until EOF
        self.left: int | None = None  # answers left before a close, once over the pipeline limit
        self.queued = False  # waiting in the pool's turns for its next request
        self.deadline = pool.loop.time() + pool.settings.header_timeout

    # -- input ------------------------------------------------------------------------------

    def on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            self._want_read(True)
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        if self.draining:
            return
        s = self.pool.settings
        if not self.buf:
            self.deadline = self.pool.loop.time() + s.header_timeout
            self.buf = data
        else:
            self.buf += data
        # Reading stops while a complete head waits, so this counts one read's requests.
        # (A read shorter than max_pipelined + 2 minimal heads cannot be over: not counted.)
        if (self.left is None and len(self.buf) >= MIN_HEAD_BYTES * (s.max_pipelined + 2)
                and heads_in(self.buf) > s.max_pipelined + 1):
            self.left = s.max_pipelined + 1
        self._next()

    def on_turn(self) -> None:
        self._next()

    def _next(self) -> None:
        """Answer the first request in the input, if it is complete; then wait for the next."""
        if self.sock is None or self.draining:
            return
        pool = self.pool
        s = pool.settings
        buf = self.buf
        if buf[:1] in (b"\r", b"\n"):  # stray line ends before a request line are allowed
            buf = self.buf = buf.lstrip(b"\r\n")
        end, after = head_end(buf)
        if end < 0 or end > s.max_head_bytes:
            if end > s.max_head_bytes or len(buf) > s.max_head_bytes:
                self._reject(431, f"request head over {s.max_head_bytes} bytes")
                return
            line_end = buf.find(b"\n")
            if line_end >= 0:  # refuse a bad request line (HTTP/0.9) without waiting for more
                try:
                    check_request_line(buf[:line_end].rstrip(b"\r"))
                except MalformedHead as exc:
                    self._reject(exc.status, str(exc))
                    return
            self._want_read(True)
            return
        try:
            head = parse_request_head(buf[:end], s.max_headers)
        except MalformedHead as exc:
            self._reject(exc.status, str(exc))
            return
        buf = self.buf = buf[after:]
        pool.requests += 1
        keep = head.keep_alive and not head.has_body
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:  # pipelined past the limit: this is the last answer
                keep = False
        if head.path == HELLO:
            self._send(REPLIES.hello(keep, head.minor))
        else:
            self._send(
                REPLIES.text(404, "Not Found", NOT_FOUND, keep_alive=keep, minor=head.minor,
                             head_only=head.method == b"HEAD")
            )
        if self.sock is None:  # the client reset the connection
            return
        if not keep:  # a request body is never read: answer, then close
            if self.left == 0:  # a flood: the rest is not worth reading (closed at once)
                self._finish(unread=False)
            else:
                self._finish(unread=bool(buf) or head.has_body)
            return
        if self.out:  # the client is not reading its answers: wait until it does
            self._want_read(False)
            self.deadline = pool.loop.time() + s.header_timeout
            return
        if buf:  # more input: the next request waits for the next loop iteration
            self._want_read(False)
            self.deadline = pool.loop.time() + s.header_timeout
            pool.queue_turn(self)
            return
        self.left = None  # caught up: a later burst is counted afresh
        self.deadline = pool.loop.time() + s.idle_timeout
        self._want_read(True)

    def _reject(self, status: int, why: str) -> None:
        self.pool.rejected += 1
        reason = _REASONS.get(status, "Bad Request")
        body = f"{status} {reason}: {why}\n".encode("ascii", "replace")
        self._send(REPLIES.text(status, reason, body, keep_alive=False, minor=1, head_only=False))
        self._finish(unread=True)

    # -- output -----------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """Send ``data`` or queue what the socket does not take; a reset closes quietly."""
        sock = self.sock
        if sock is None:
            return
        if self.pool.telemetry is not None:  # every response passes here: "HTTP/1.1 NNN ..."
            self.pool.telemetry.responded(int(data[9:12]))
        if self.out:
            self.out += data
            return
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self.out = data[sent:]
            self._want_write(True)

    def on_writable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            sent = sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.out = self.out[sent:]
        if self.out:
            return
        self._want_write(False)
        if self.draining:
            if self.left == 0:
                self.close()
            else:
                self._linger()
        elif self.buf:  # pipelined requests waiting behind the slow reader
            self._next()
        else:
            self.left = None
            self.deadline = self.pool.loop.time() + self.pool.settings.idle_timeout
            self._want_read(True)

    def _finish(self, *, unread: bool) -> None:
        """The last answer is queued: close, gently when the client may still be sending."""
        self.buf = b""
        if self.sock is None:
            return
        if not unread and not self.out:
            self.close()
            return
        # Closing with unread input would reset the connection and could destroy the answer
        # in flight; shut down our side and discard input until the client closes (bounded).
        self.draining = True
        self.deadline = self.pool.loop.time() + LINGER
        if not self.out:
            self._linger()

    def _linger(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self._want_read(True)

    # -- registration -----------------------------------------------------------------------

    def _want_read(self, on: bool) -> None:
        if on != self.reading and self.sock is not None:
            if on:
                self.pool.loop.add_reader(self.fd, self.on_readable)
            else:
                self.pool.loop.remove_reader(self.fd)
            self.reading = on

    def _want_write(self, on: bool) -> None:
        if on != self.writing and self.sock is not None:
            if on:
                self.pool.loop.add_writer(self.fd, self.on_writable)
            else:
                self.pool.loop.remove_writer(self.fd)
            self.writing = on

    def close(self) -> None:
        """Close the connection at once (done, timeout, cap, shutdown); idempotent."""
        sock = self.sock
        if sock is None:
            return
        self._want_read(False)
        self._want_write(False)
        self.sock = None
        self.buf = self.out = b""
        self.pool.open.pop(self, None)
        sock.close()
