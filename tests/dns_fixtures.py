"""Real DNS servers for the check tests: dnsmasq on a loopback address, and a scripted one.

``Dnsmasq`` runs Debian's dnsmasq in the foreground on 127.0.53.N and a free port, answering
only from its command line (``--no-resolv --no-hosts``): ``ok.test`` → 127.0.0.5, 40
addresses for ``big.test`` (too many for 512 bytes of UDP: truncated, so the client falls
back to TCP), anything else under ``test`` → NXDOMAIN. ``ScriptedDns`` is a small UDP
server for what dnsmasq will not do on demand: answer late, or answer SERVFAIL.
"""

from __future__ import annotations

import itertools
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset

from tests.conftest import require_binary

_ADDRESSES = itertools.count(10)


def loopback_address() -> str:
    """A fresh 127.0.53.N address for one server (all of 127/8 is loopback on Linux)."""
    return f"127.0.53.{next(_ADDRESSES) % 250 + 2}"


def free_udp_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host`` right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
            return port
    raise AssertionError("no free port")


class Dnsmasq:
    """dnsmasq answering from its command line on ``host:port``."""

    def __init__(self, tmp: Path, host: str | None = None, port: int | None = None) -> None:
        self.binary = require_binary("dnsmasq", "dnsmasq")
        self.host = host or loopback_address()
        self.port = port or free_udp_port(self.host)
        hosts = tmp / f"big-{self.port}.hosts"
        hosts.write_text("".join(f"127.0.1.{i} big.test\n" for i in range(1, 41)))
        self.argv = [
            self.binary, "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--user=root", "--pid-file=", "--log-facility=-",
            f"--listen-address={self.host}", "--bind-interfaces", f"--port={self.port}",
            "--address=/ok.test/127.0.0.5", "--address=/ok.test/::5", "--local=/test/",
            f"--addn-hosts={hosts}",
        ]
        self.log_path = tmp / f"dnsmasq-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Dnsmasq:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        self.wait_answering()
        return self

    def wait_answering(self, within: float = 10.0) -> None:
        """Wait (bounded) until a query for ok.test is answered."""
        query = dns.message.make_query("ok.test", "A").to_wire()
        deadline = time.monotonic() + within
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"dnsmasq exited: {self.log_path.read_text()}")
                try:
                    s.sendto(query, (self.host, self.port))
                    s.recvfrom(4096)
                    return
                except OSError:
                    time.sleep(0.05)
        raise AssertionError(f"dnsmasq did not answer within {within}s")

    def pause(self) -> None:
        """SIGSTOP: the socket stays open, nothing answers (queries time out)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@contextmanager
def dnsmasq(tmp: Path, host: str | None = None, port: int | None = None) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp, host, port).start()
    try:
        yield server
    finally:
        server.stop()


class ScriptedDns:
    """A UDP DNS server in a thread: answers after ``delay`` seconds with ``rcode``.

    A NOERROR answer carries one A record, 127.0.0.7. Each query is answered on its own
    timer, so a slow answer does not hold up the next query.
    """

    def __init__(self, delay: float = 0.0, rcode: int = dns.rcode.NOERROR) -> None:
        self.delay = delay
        self.rcode = rcode
        self.host = loopback_address()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                continue
            self.queries += 1
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            answer = dns.message.make_response(query)
            answer.set_rcode(self.rcode)
            if self.rcode == dns.rcode.NOERROR:
                answer.answer.append(
                    dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "127.0.0.7")
                )
            timer = threading.Timer(self.delay, self._send, (answer.to_wire(), peer))
            timer.daemon = True
            timer.start()

    def _send(self, wire: bytes, peer: tuple[str, int]) -> None:
        if not self._stop.is_set():
            try:
                self.sock.sendto(wire, peer)
            except OSError:
                return

    def __enter__(self) -> ScriptedDns:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

