"""The ``http`` probe kind: ``GET /hello`` on a fresh connection, timed per phase.

One probe is one non-blocking socket driven by event-loop callbacks and one future: no
task, transport or stream objects per probe. That is what keeps a 5,000-peer round cheap
(measurements in docs/benchmarks.md, design in docs/http.md).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from typing import Any, ClassVar

from healthmesh import (
    AgentContext,
    ComponentSettings,
    Path,
    Probe,
    ProbeResult,
    __version__,
    format_duration,
)
from healthmesh.plugins.http.wire import MalformedHead, _show, parse_status_line

#: A response head longer than this is an error (Cilium's answer is about 100 bytes).
MAX_RESPONSE_HEAD = 16 * 1024
_RECV_SIZE = 65536
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)


class HttpSettings(ComponentSettings):
    """``[probes.http]``: where the peers' responders listen."""

    port: int = 4240
    path: str = "/hello"


class HttpProbe(Probe):
    """``GET http://<address>:<port><path>``; 200 is success, anything else an error."""

    name: ClassVar[str] = "http"
    default_enabled: ClassVar[bool] = True
    Settings: ClassVar[type[ComponentSettings]] = HttpSettings

    def __init__(self, settings: HttpSettings, context: AgentContext) -> None:
        super().__init__(settings, context)
        self.port = settings.port
        self.target = settings.path

    @classmethod
    def validate_settings(cls, settings: HttpSettings, config: Any) -> None:
        """Reject a port out of range or a path that cannot be sent as a request target."""
        if not 1 <= settings.port <= 65535:
            raise ValueError(f"port: {settings.port} is not a TCP port (1-65535)")
        p = settings.path
        if not p.startswith("/") or not p.isascii() or any(c <= " " or c == "\x7f" for c in p):
            raise ValueError(f"path: {p!r} must start with '/' and have no spaces or controls")

    async def probe(self, path: Path, timeout: float) -> ProbeResult:
        """Probe one path: connect, send the request, wait for the response head."""
        return await http_get(path.address, self.port, self.target, timeout)


async def http_get(address: str, port: int, target: str, timeout: float) -> ProbeResult:
    """One ``GET`` on a new connection to an IP literal, bounded by ``timeout`` seconds.

    Success means a complete ``200`` response head; the body is not read (as Cilium's
    prober). Details: ``connect_ms`` (TCP handshake) and ``ttfb_ms`` (request sent to the
    first response byte). The connection is closed on every outcome, cancellation included.
    """
    exchange = _Exchange(asyncio.get_running_loop(), address, port, target, timeout)
    try:
        exchange.start()
        return await exchange.future
    finally:
        exchange.close()


class _Exchange:
    """The state of one request/response on one non-blocking socket."""

    __slots__ = (
        "address", "buf", "fd", "future", "loop", "peer", "reading", "request", "sock",
        "t_connected", "t_first", "t_sent", "t_start", "timeout", "timer", "writing",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, address: str, port: int, target: str,
        timeout: float,
    ) -> None:
        self.loop = loop
        self.address = address
        self.timeout = timeout
        v6 = ":" in address
        host = address.split("%", 1)[0]
        self.peer = f"[{address}]:{port}" if v6 else f"{address}:{port}"
        hostport = f"[{host}]:{port}" if v6 else f"{host}:{port}"
        self.request = (
            f"GET {target} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: healthmesh/{__version__}"
            "\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        self.future: asyncio.Future[ProbeResult] = loop.create_future()
        self.sock: socket.socket | None = None
        self.fd = -1
        self.reading = self.writing = False
        self.timer: asyncio.TimerHandle | None = None
        self.buf = b""
        self.t_start = self.t_connected = self.t_sent = self.t_first = 0.0

    # -- phases -------------------------------------------------------------------------

    def start(self) -> None:
        port = int(self.peer.rsplit(":", 1)[1])
        self.t_start = time.perf_counter()
        try:
            if ":" in self.address:
                family = socket.AF_INET6
                sockaddr: tuple[Any, ...] = (self.address, port, 0, 0)
                if "%" in self.address:  # a link-local address with its zone
                    sockaddr = socket.getaddrinfo(
                        self.address, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
                    )[0][4]
            else:
                family, sockaddr = socket.AF_INET, (self.address, port)
            sock = self.sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
            if not _NONBLOCK:
                sock.setblocking(False)
            self.fd = sock.fileno()
        except OSError as exc:
            self._fail(f"cannot open a socket to {self.peer}: {_reason(exc)}")
            return
        self.timer = self.loop.call_later(self.timeout, self._on_timeout)
        err = sock.connect_ex(sockaddr)
        if err == 0:
            self._on_connected()
        elif err in (errno.EINPROGRESS, errno.EAGAIN):
            # Over loopback (and to a local health endpoint) the handshake has usually
            # completed by now; sending at once saves a trip through the event loop.
            try:
                sent = sock.send(self.request)
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(self.fd, self._on_writable)
                self.writing = True
                return
            except OSError as exc:
                self._fail(f"connect to {self.peer}: {_reason(exc)}")
                return
            self.request = self.request[sent:]
            self._on_connected()
        else:
            self._fail(f"connect to {self.peer}: {os.strerror(err).lower()}")

    def _on_writable(self) -> None:
        assert self.sock is not None
        if self.future.done():
            return
        if self.t_connected == 0.0:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(f"connect to {self.peer}: {os.strerror(err).lower()}")
                return
            self.loop.remove_writer(self.fd)
            self.writing = False
            self._on_connected()
        else:  # the rest of a request that did not fit the send buffer at once
            self._send()

    def _on_connected(self) -> None:
        self.t_connected = time.perf_counter()
        self.loop.add_reader(self.fd, self._on_readable)
        self.reading = True
        self._send()

    def _send(self) -> None:
        assert self.sock is not None
        try:
            sent = self.sock.send(self.request)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(f"sending the request to {self.peer}: {_reason(exc)}")
            return
        self.request = self.request[sent:]
        if self.request:
            if not self.writing:
                self.loop.add_writer(self.fd, self._on_writable)
                self.writing = True
            return
        if self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False
        self.t_sent = time.perf_counter()

    def _on_readable(self) -> None:
        assert self.sock is not None
        if self.future.done():
            return
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(f"reading the response of {self.peer}: {_reason(exc)}")
            return
        if not data:
            if self.buf:
                where = f"after {len(self.buf)} bytes, before the response head ended"
            else:
                where = "before sending a response"
            self._fail(f"connection closed by {self.peer} {where}")
            return
        if self.t_first == 0.0:
            self.t_first = time.perf_counter()
        seen = len(self.buf)
        self.buf += data
        self._parse(max(0, seen - 3))

    def _parse(self, search_from: int) -> None:
        buf = self.buf
        if not buf.startswith(b"HTTP/"[: len(buf)]):
            self._fail(f"malformed HTTP response from {self.peer}: {_show(buf)}")
            return
        end = buf.find(b"\r\n\r\n", search_from)
        if end < 0 or end > MAX_RESPONSE_HEAD:
            if len(buf) > MAX_RESPONSE_HEAD:
                self._fail(f"response head from {self.peer} exceeds {MAX_RESPONSE_HEAD} bytes")
            elif b"\r\n" in buf and not _status_line_ok(buf[: buf.find(b"\r\n")]):
                self._fail(f"malformed HTTP response from {self.peer}: {_show(buf)}")
            return
        lines = buf[:end].split(b"\r\n")
        try:
            status, reason = parse_status_line(lines[0])
        except MalformedHead:
            self._fail(f"malformed HTTP response from {self.peer}: {_show(buf)}")
            return
        for line in lines[1:]:
            if b":" not in line or line[:1] in (b" ", b"\t"):
                self._fail(f"malformed header in the response of {self.peer}: {_show(line)}")
                return
        if 100 <= status < 200 and status != 101:  # an interim response: the real one follows
            self.buf = buf[end + 4 :]
            if self.buf:
                self._parse(0)
            return
        now = time.perf_counter()
        if status != 200:
            text = f"HTTP {status} {reason}".rstrip()
            self._fail(f"{text} from {self.peer}")
            return
        sent = self.t_sent or self.t_connected
        self._done(
            ProbeResult.success(
                now - self.t_start,
                connect_ms=round((self.t_connected - self.t_start) * 1000.0, 3),
                ttfb_ms=round((self.t_first - sent) * 1000.0, 3),
            )
        )

    def _on_timeout(self) -> None:
        self.timer = None
        if self.future.done():
            return
        took = format_duration(self.timeout)
        if self.t_connected == 0.0:
            self._fail(f"timeout after {took} connecting to {self.peer}")
        elif not self.buf:
            connect_ms = (self.t_connected - self.t_start) * 1000.0
            self._fail(
                f"timeout after {took} waiting for the response of {self.peer} "
                f"(connected in {connect_ms:.1f}ms)"
            )
        else:
            self._fail(
                f"timeout after {took} reading the response of {self.peer} "
                f"({len(self.buf)} bytes received)"
            )

    # -- outcome ------------------------------------------------------------------------

    def _fail(self, error: str, **details: Any) -> None:
        if self.t_connected:
            details.setdefault("connect_ms", round((self.t_connected - self.t_start) * 1e3, 3))
        self._done(ProbeResult.failure(error, **details))

    def _done(self, result: ProbeResult) -> None:
        if not self.future.done():
            self.future.set_result(result)
        self.close()

    def close(self) -> None:
        """Stop watching the socket and close it; safe to call more than once."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is None:
            return
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False
        self.sock.close()
        self.sock = None


def _status_line_ok(line: bytes) -> bool:
    try:
        parse_status_line(line)
    except MalformedHead:
        return False
    return True


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()
