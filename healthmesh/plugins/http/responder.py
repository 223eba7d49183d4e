"""The 4240 responder: ``/hello`` → 200 with an empty body, anything else → 404, as Cilium's.

An asyncio protocol per connection and a bounded head parser (``wire``): cheap per
request, and bounded in every dimension a client controls — head size, header count,
time to send a head, idle time between requests, and the number of open connections
(at the cap the oldest connection is dropped, so a flood of idle connections cannot lock
probes out). Why this and not an ASGI server: docs/http.md and docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import resource
import time
from email.utils import formatdate
from typing import Any, ClassVar

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from healthmesh import AgentContext, ComponentSettings, Duration, Service
from healthmesh.plugins.http.listen import bind, check_listen, format_listen, ipv6_unavailable
from healthmesh.plugins.http.wire import MalformedHead, parse_request_head

HELLO = b"/hello"
DEFAULT_LISTEN = ("0.0.0.0:4240", "[::]:4240")
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
        servers: list[asyncio.Server] = []
        try:
            for sock in socks:
                server = await loop.create_server(pool.connection, sock=sock, backlog=s.backlog)
                servers.append(server)
            self.addresses = [format_listen(*sock.getsockname()[:2]) for sock in socks]
            logger.info("responder listening on {}", ", ".join(self.addresses))
            task_status.started()
            await pool.sweep_forever()
        finally:
            for server in servers:
                server.close()
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


class ConnectionPool:
    """Every open connection, oldest first: enforces the cap and the timeouts."""

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

    def connection(self) -> Connection:
        """Protocol factory for ``create_server``."""
        return Connection(self)

    def add(self, conn: Connection) -> None:
        while len(self.open) >= self.cap:
            oldest = next(iter(self.open))
            self.evicted += 1
            oldest.abort()
        self.open[conn] = None

    def discard(self, conn: Connection) -> None:
        self.open.pop(conn, None)

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
                conn.abort()

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.abort()
        self.open.clear()


class Connection(asyncio.Protocol):
    """One client connection: reads request heads, answers each, keeps alive when asked."""

    __slots__ = ("buf", "closing", "deadline", "pool", "transport")

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.closing = False
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.deadline = self.pool.loop.time() + self.pool.settings.header_timeout
        self.pool.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.discard(self)
        self.transport = None

    def pause_writing(self) -> None:
        # A client that sends requests but does not read the answers: stop reading from it.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        pool = self.pool
        s = pool.settings
        if not self.buf:
            self.deadline = pool.loop.time() + s.header_timeout
        buf = self.buf + data if self.buf else data
        transport = self.transport
        assert transport is not None
        while buf:
            if buf[:2] == b"\r\n":  # stray line ends before a request line are allowed
                buf = buf.lstrip(b"\r\n")
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0 or end > s.max_head_bytes:
                if end > s.max_head_bytes or len(buf) > s.max_head_bytes:
                    self._reject(431, f"request head over {s.max_head_bytes} bytes")
                    return
                break
            try:
                head = parse_request_head(buf[:end], s.max_headers)
            except MalformedHead as exc:
                self._reject(exc.status, str(exc))
                return
            buf = buf[end + 4 :]
            pool.requests += 1
            keep = head.keep_alive and not head.has_body
            if head.path == HELLO:
                transport.write(REPLIES.hello(keep, head.minor))
            else:
                transport.write(
                    REPLIES.text(404, "Not Found", NOT_FOUND, keep_alive=keep, minor=head.minor,
                                 head_only=head.method == b"HEAD")
                )
            if not keep:  # a request body is never read: answer, then close
                self.closing = True
                transport.close()
                return
            if buf:
                self.deadline = pool.loop.time() + s.header_timeout
            else:
                self.deadline = pool.loop.time() + s.idle_timeout
        self.buf = buf

    def eof_received(self) -> bool:
        return False  # close our side too

    def _reject(self, status: int, why: str) -> None:
        self.pool.rejected += 1
        self.closing = True
        self.buf = b""
        reason = _REASONS.get(status, "Bad Request")
        body = f"{status} {reason}: {why}\n".encode("ascii", "replace")
        assert self.transport is not None
        self.transport.write(
            REPLIES.text(status, reason, body, keep_alive=False, minor=1, head_only=False)
        )
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (timeout, cap, shutdown)."""
        self.pool.discard(self)
        if self.transport is not None:
            self.closing = True
            self.transport.abort()
