"""The ``http`` probe kind: ``GET /hello`` on a fresh connection, timed per phase.

One probe is one non-blocking socket driven by event-loop callbacks: no task, transport or
stream objects per probe. The probes the scheduler hands over together (one tick's worth) run
as a *train*: one after another, each starting as the one before it answers (or ``step``
later if it does not), so no probe queues behind another and both ends stay awake between
them. That is what keeps a 5,000-peer round cheap and its RTTs true (measurements in
docs/benchmarks.md, design in docs/http.md).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from healthmesh import (
    SO_TIMESTAMPNS,
    AgentContext,
    ComponentSettings,
    Path,
    Probe,
    ProbeResult,
    __version__,
    format_duration,
    kernel_receive_ns,
)
from healthmesh.plugins.http.wire import MalformedHead, _show, parse_status_line

#: A response head longer than this is an error (Cilium's answer is about 100 bytes).
MAX_RESPONSE_HEAD = 16 * 1024
_RECV_SIZE = 65536
#: Room for one SO_TIMESTAMPNS message (a struct timespec: the kernel's receive time).
_ANCILLARY_SIZE = socket.CMSG_SPACE(16)
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)
#: In a train, a probe still unanswered this long after its start no longer holds back the
#: next one (it goes on under its own timeout). Well above a LAN round trip.
TRAIN_STEP = 0.002
#: A train's starts are spread over at most this long, however many probes it has: under the
#: scheduler's grace past the timeout, and one default tick.
TRAIN_SPREAD = 0.05


class HttpSettings(ComponentSettings):
    """``[probes.http]``: where the peers' responders listen."""

    port: int = 4240
    path: str = "/hello"


class HttpProbe(Probe):
    """``GET http://<address>:<port><path>``; 200 is success, anything else an error."""

    name: ClassVar[str] = "http"
    default_enabled: ClassVar[bool] = True
    batched: ClassVar[bool] = True
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

    async def probe_many(self, paths: Sequence[Path], timeout: float) -> list[ProbeResult]:
        """Probe ``paths`` as a train: one at a time, the next as soon as one answers."""
        return await http_train([p.address for p in paths], self.port, self.target, timeout)


async def http_get(address: str, port: int, target: str, timeout: float) -> ProbeResult:
    """One ``GET`` on a new connection to an IP literal, bounded by ``timeout`` seconds.

    Success means a complete ``200`` response head; the body is not read (as Cilium's
    prober). Details: ``connect_ms`` (TCP handshake) and ``ttfb_ms`` (request sent to the
    first response byte). The connection is closed on every outcome, cancellation included.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[ProbeResult] = loop.create_future()

    def deliver(result: ProbeResult) -> None:
        if not future.done():  # not when the awaiting task is being cancelled
            future.set_result(result)

    exchange = _Exchange(loop, address, port, target, timeout, deliver)
    try:
        exchange.start()
        return await future
    finally:
        exchange.close()


async def http_train(
    addresses: Sequence[str], port: int, target: str, timeout: float, step: float = TRAIN_STEP
) -> list[ProbeResult]:
    """``http_get`` of every address, in order, as a train; results in the same order.

    Each probe starts as soon as the one before it has its result, or ``step`` seconds
    after that one started, whichever is first (``step`` shrinks so the starts of a long
    train span at most ``TRAIN_SPREAD``). Over a healthy network only one probe is in flight
    at a time: none waits behind another for the event loop or the peer, and the next one
    is sent from the callback that read the answer, while both processes are still awake.
    A dead peer delays the train by ``step``, not by the timeout.
    """
    if not addresses:
        return []
    train = _Train(asyncio.get_running_loop(), addresses, port, target, timeout,
                   min(step, TRAIN_SPREAD / len(addresses)))
    try:
        train.advance()
        return await train.future
    finally:
        train.close()


class _Train:
    """Probes started one after another; see ``http_train``."""

    __slots__ = (
        "addresses", "advancing", "deadline", "exchanges", "future", "left", "loop", "next",
        "port", "results", "step", "step_timer", "target", "timeout",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, addresses: Sequence[str], port: int,
        target: str, timeout: float, step: float,
    ) -> None:
        self.loop = loop
        self.addresses = addresses
        self.port = port
        self.target = target
        self.timeout = timeout
        self.step = step
        self.future: asyncio.Future[list[ProbeResult]] = loop.create_future()
        self.results: list[ProbeResult | None] = [None] * len(addresses)
        self.exchanges: dict[int, _Exchange] = {}
        self.next = 0  # the next address to start
        self.left = len(addresses)  # results still missing
        self.step_timer: asyncio.TimerHandle | None = None
        self.advancing = False
        #: Every probe ends by then, even when a busy loop started some of them late: the
        #: scheduler allows a batch its timeout plus a grace longer than TRAIN_SPREAD.
        self.deadline = loop.time() + timeout + TRAIN_SPREAD

    def advance(self) -> None:
        """Start probes until one is left waiting for its answer (or none remain)."""
        if self.step_timer is not None:
            self.step_timer.cancel()
            self.step_timer = None
        if self.advancing:  # a probe finished inside start(): the loop below goes on
            return
        self.advancing = True
        try:
            while self.next < len(self.addresses) and not self.future.done():
                i = self.next
                self.next += 1
                timeout = max(0.0, min(self.timeout, self.deadline - self.loop.time()))
                exchange = _Exchange(
                    self.loop, self.addresses[i], self.port, self.target, timeout,
                    self._finisher(i),
                )
                self.exchanges[i] = exchange
                exchange.start()
                if self.results[i] is None:  # in flight: the next waits for it or the step
                    if self.next < len(self.addresses):
                        self.step_timer = self.loop.call_later(self.step, self.advance)
                    return
        finally:
            self.advancing = False

    def _finisher(self, i: int) -> Callable[[ProbeResult], None]:
        def finished(result: ProbeResult) -> None:
            self.results[i] = result
            self.exchanges.pop(i, None)
            self.left -= 1
            if self.left == 0:
                if not self.future.done():
                    self.future.set_result(self.results)  # type: ignore[arg-type]
            elif i == self.next - 1:  # the newest probe answered: start the next now
                self.advance()

        return finished

    def close(self) -> None:
        """Stop every probe still in flight (the awaiting task was cancelled)."""
        if self.step_timer is not None:
            self.step_timer.cancel()
            self.step_timer = None
        self.next = len(self.addresses)
        for exchange in list(self.exchanges.values()):
            exchange.close()
        self.exchanges.clear()


class _Exchange:
    """The state of one request/response on one non-blocking socket."""

    __slots__ = (
        "address", "buf", "fd", "finished", "loop", "on_result", "peer", "reading", "request",
        "sock", "t_connected", "t_first", "t_last", "t_sent", "t_start", "timeout", "timer",
        "writing",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, address: str, port: int, target: str,
        timeout: float, on_result: Callable[[ProbeResult], None],
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
        self.on_result = on_result
        self.finished = False
        self.sock: socket.socket | None = None
        self.fd = -1
        self.reading = self.writing = False
        self.timer: asyncio.TimerHandle | None = None
        self.buf = b""
        self.t_start = self.t_connected = self.t_sent = self.t_first = self.t_last = 0.0

    # -- phases -------------------------------------------------------------------------

    def start(self) -> None:
        port = int(self.peer.rsplit(":", 1)[1])
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
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.fd = sock.fileno()
        except OSError as exc:
            self.t_start = time.time()
            self._fail(f"cannot open a socket to {self.peer}: {_reason(exc)}")
            return
        self.timer = self.loop.call_later(self.timeout, self._on_timeout)
        # The clock starts at connect(), after the socket and the timer are set up, and stops
        # at the kernel's receive time of the answer (SO_TIMESTAMPNS), so neither this
        # process's set-up nor its wake-up is counted as network or peer time. Wall clock,
        # because that is the kernel timestamps' clock.
        self.t_start = time.time()
        err = sock.connect_ex(sockaddr)
        if err == 0:
            self._on_connected(time.time())
        elif err in (errno.EINPROGRESS, errno.EAGAIN):
            # Over loopback (and to a local health endpoint) the handshake has completed by
            # the time connect() returns; sending at once saves a trip through the event loop.
            connected = time.time()
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
            self._on_connected(connected, None if self.request else time.time())
        else:
            self._fail(f"connect to {self.peer}: {os.strerror(err).lower()}")

    def _on_writable(self) -> None:
        assert self.sock is not None
        if self.finished:
            return
        if self.t_connected == 0.0:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(f"connect to {self.peer}: {os.strerror(err).lower()}")
                return
            self.loop.remove_writer(self.fd)
            self.writing = False
            self._on_connected(time.time())
        else:  # the rest of a request that did not fit the send buffer at once
            self._send()

    def _on_connected(self, when: float, sent_at: float | None = None) -> None:
        """Connected at ``when``; ``sent_at`` is when the request went out, if it has."""
        self.t_connected = when
        self.loop.add_reader(self.fd, self._on_readable)
        self.reading = True
        if sent_at is None:
            self._send()
        else:
            self.t_sent = sent_at

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
        self.t_sent = time.time()

    def _on_readable(self) -> None:
        assert self.sock is not None
        if self.finished:
            return
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(_RECV_SIZE, _ANCILLARY_SIZE)
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
        self.t_last = _received_at(ancillary)
        if self.t_first == 0.0:
            self.t_first = self.t_last
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
        if status != 200:
            text = f"HTTP {status} {reason}".rstrip()
            self._fail(f"{text} from {self.peer}")
            return
        sent = self.t_sent or self.t_connected
        rtt = self.t_last - self.t_start
        if not 0.0 <= rtt <= self.timeout + 1.0:  # the wall clock was stepped meanwhile
            rtt = max(0.0, min(rtt, self.timeout))
        self._done(
            ProbeResult.success(
                rtt,
                connect_ms=round((self.t_connected - self.t_start) * 1000.0, 3),
                ttfb_ms=round(max(0.0, self.t_first - sent) * 1000.0, 3),
            )
        )

    def _on_timeout(self) -> None:
        self.timer = None
        if self.finished:
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
        if self.finished:
            return
        self.finished = True
        self.close()
        self.on_result(result)

    def close(self) -> None:
        """Stop watching the socket and close it; safe to call more than once."""
        self.finished = True
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


def _received_at(ancillary: list[tuple[int, int, bytes]]) -> float:
    """The kernel's receive time of the data just read, or now when it gave none."""
    ns = kernel_receive_ns(ancillary)
    return ns * 1e-9 if ns else time.time()


def _status_line_ok(line: bytes) -> bool:
    try:
        parse_status_line(line)
    except MalformedHead:
        return False
    return True


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()
