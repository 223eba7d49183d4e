"""The ledger of echo requests in flight: which reply or ICMP error belongs to which probe.

Requests are keyed by (family, identifier, sequence) while in flight and remembered by
serial for ``horizon`` seconds afterwards, so that a reply arriving after its probe gave up
is counted as late (and credited to no one), and a second reply to the same request is
counted as a duplicate (and ignored).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import deque
from dataclasses import dataclass, field

ANSWERED = 1
EXPIRED = 2
LATE = 3
FAILED = 4
#: Finished requests are pruned in groups finished within this many seconds of each other.
MARK_EVERY = 0.5


def echo_key(family: int, ident: int, seq: int) -> int:
    """The in-flight key of one echo request."""
    return (family << 32) | (ident << 16) | seq


@dataclass(eq=False, slots=True)
class Echo:
    """One echo request of a probe."""

    burst: Burst
    serial: int
    key: int = -1
    sent_ns: int = 0  # wall clock, the same clock as kernel receive timestamps
    sent_mono: float = 0.0
    rtt: float | None = None
    error: str | None = None


@dataclass(eq=False, slots=True)
class Burst:
    """The echo requests of one probe of one address, and the future its probe awaits."""

    address: str
    family: int
    planned: int
    future: asyncio.Future[None]
    echoes: list[Echo] = field(default_factory=list)
    settled: int = 0
    deadline: float = 0.0  # on the event loop's clock

    def settle(self) -> None:
        """One more echo got its answer (a reply, an error, or a failed send)."""
        self.settled += 1
        if self.settled >= self.planned and not self.future.done():
            self.future.set_result(None)

    def stop_sending(self) -> None:
        """No more echoes will be sent: done as soon as those already sent are settled."""
        self.planned = len(self.echoes)
        if self.settled >= self.planned and not self.future.done():
            self.future.set_result(None)


@dataclass
class Counters:
    """Totals since start, for logs, benchmarks and tests."""

    sent: int = 0
    replies: int = 0
    errors: int = 0
    late: int = 0
    duplicates: int = 0
    stray: int = 0
    send_failures: int = 0
    socket_errors: int = 0


class EchoLedger:
    """Requests in flight and recently finished ones, shared by every socket of a probe."""

    def __init__(self, horizon: float = 30.0) -> None:
        self.token = os.urandom(8)
        self.horizon = horizon
        self.in_flight: dict[int, Echo] = {}
        self.counters = Counters()
        self._serial = random.getrandbits(48)
        # Finished requests, by serial: the address (a string shared with the probe's path)
        # while a late reply would be credited to it, else the status (a small int). About
        # 80 bytes per request instead of 250: at 5,000 peers and 10 s the ledger remembers
        # 30,000 requests. Their serials in finishing order, and marks of (time, how many had
        # been appended then) at most one per MARK_EVERY seconds, drive the pruning.
        self._recent: dict[int, str | int] = {}
        self._recent_order: deque[int] = deque()
        self._marks: deque[tuple[float, int]] = deque()
        self._appended = 0
        self._pruned = 0
        self._late: dict[str, int] = {}

    def new_echo(self, burst: Burst) -> Echo:
        """A fresh echo request of ``burst`` with a never-repeating serial."""
        self._serial += 1
        echo = Echo(burst, self._serial)
        burst.echoes.append(echo)
        return echo

    def tag(self, serial: int) -> bytes:
        """The 16 echo data bytes that identify a request: token + serial."""
        return self.token + serial.to_bytes(8, "big")

    def sent(self, echo: Echo, key: int) -> None:
        """``echo`` is about to leave under ``key``."""
        echo.key = key
        self.in_flight[key] = echo
        self.counters.sent += 1

    def send_failed(self, echo: Echo, error: str) -> None:
        """``echo`` could not be sent: ``error`` is its answer."""
        self.counters.send_failures += 1
        echo.error = error
        echo.burst.settle()

    def reply(self, key: int, tag: bytes, source: str, rx_ns: int, now_mono: float) -> None:
        """An echo reply with ``key`` and data ``tag`` arrived from ``source``."""
        if tag[:8] != self.token:
            self.counters.stray += 1  # another pinger's reply (raw sockets see every one)
            return
        serial = int.from_bytes(tag[8:16], "big")
        echo = self.in_flight.get(key)
        if echo is None or echo.serial != serial:
            self._finished_reply(serial)
            return
        if source != echo.burst.address:
            self.counters.stray += 1
            return
        elapsed = now_mono - echo.sent_mono
        rtt = (rx_ns - echo.sent_ns) * 1e-9 if rx_ns else elapsed
        if not 0.0 <= rtt <= elapsed + 0.001:
            rtt = elapsed  # the wall clock was stepped between send and receive
        echo.rtt = rtt
        self.counters.replies += 1
        self._finish(echo, ANSWERED, now_mono)

    def error(self, key: int, tag: bytes, destination: str, text: str, now_mono: float) -> None:
        """An ICMP error quoting the request ``key`` to ``destination`` arrived."""
        echo = self.in_flight.get(key)
        if len(tag) >= 16 and tag[:8] != self.token:
            self.counters.stray += 1
            return
        if (
            echo is None
            or echo.burst.address != destination
            or (len(tag) >= 16 and int.from_bytes(tag[8:16], "big") != echo.serial)
        ):
            self.counters.stray += 1
            return
        echo.error = text
        self.counters.errors += 1
        self._finish(echo, FAILED, now_mono)

    def retire(self, burst: Burst, now_mono: float) -> None:
        """``burst``'s probe is over (answered, timed out or cancelled): forget its echoes."""
        for echo in burst.echoes:
            if echo.key >= 0 and self.in_flight.get(echo.key) is echo:
                del self.in_flight[echo.key]
                self._remember(echo, EXPIRED, now_mono)

    def take_late(self, address: str) -> int:
        """Late replies from ``address`` since the last call, for its next result."""
        return self._late.pop(address, 0)

    def prune(self, now_mono: float) -> None:
        """Forget finished requests older than the horizon (kept up to ``MARK_EVERY`` longer)."""
        order, recent, marks = self._recent_order, self._recent, self._marks
        limit = now_mono - self.horizon - MARK_EVERY  # a mark covers MARK_EVERY seconds
        while marks and marks[0][0] < limit:
            upto = marks.popleft()[1]
            while self._pruned < upto:
                recent.pop(order.popleft(), None)
                self._pruned += 1

    # -- internals -------------------------------------------------------------------

    def _finish(self, echo: Echo, status: int, now_mono: float) -> None:
        del self.in_flight[echo.key]
        self._remember(echo, status, now_mono)
        echo.burst.settle()

    def _remember(self, echo: Echo, status: int, now_mono: float) -> None:
        serial = echo.serial
        self._recent[serial] = echo.burst.address if status == EXPIRED else status
        self._recent_order.append(serial)
        self._appended += 1
        marks = self._marks
        if marks and now_mono - marks[-1][0] < MARK_EVERY:
            marks[-1] = (marks[-1][0], self._appended)
        else:
            marks.append((now_mono, self._appended))

    def _finished_reply(self, serial: int) -> None:
        record = self._recent.get(serial)
        if record is None:
            self.counters.stray += 1  # older than the horizon, or not ours
        elif type(record) is str:  # expired: this reply is late
            self._recent[serial] = LATE
            self.counters.late += 1
            address = record
            if len(self._late) >= 100_000:  # addresses never probed again; keep memory bounded
                self._late.clear()
            self._late[address] = self._late.get(address, 0) + 1
        else:
            self.counters.duplicates += 1
