"""One address family's ICMP socket: identifier rotation, sending, and the reader callback.

The reader is an asyncio ``add_reader`` callback on the one socket of the family: every
reply and error for every probe in flight arrives there and is matched in the ledger.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from typing import Any

from loguru import logger

from healthmesh import kernel_receive_ns
from healthmesh.plugins.icmp.ledger import Echo, EchoLedger, echo_key
from healthmesh.plugins.icmp.packets import REPLY, EchoCodec, error_text
from healthmesh.plugins.icmp.settings import IcmpSettings
from healthmesh.plugins.icmp.sockets import (
    MSG_ERRQUEUE,
    SO_EE_ORIGIN_ICMP,
    SO_EE_ORIGIN_ICMP6,
    Channel,
    SocketRefused,
    extended_error,
    is_transient_send_error,
)

#: Datagrams read per reader wake-up before yielding to the event loop.
BATCH = 512
RECEIVE_SIZE = 2048
ANCILLARY_SIZE = 512
#: How long a rotated-out datagram socket stays open, past the longest timeout, for late replies.
DRAIN = 5.0


class Endpoint:
    """The ICMP socket of one family, the identifiers it sends under, and its reader."""

    def __init__(
        self,
        family: int,
        raw: bool,
        settings: IcmpSettings,
        ledger: EchoLedger,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.family = family
        self.raw = raw
        self.settings = settings
        self.ledger = ledger
        self.loop = loop
        self.channel = Channel(family, raw, settings.receive_buffer)
        self.codec = EchoCodec(family, raw, ledger.token, settings.payload_size)
        self.max_timeout = 1.0
        self.rotations = 0
        self._draining: list[Channel] = []
        self._ident = self.channel.ident if self.channel.ident is not None else _random_ident()
        self._seq = random.getrandbits(16)
        self._rotate_at = time.monotonic() + settings.identifier_rotation
        self._af = socket.AF_INET if family == 4 else socket.AF_INET6
        self._sockaddrs: dict[str, Any] = {}
        self._watch(self.channel)

    @property
    def mode(self) -> str:
        """"raw" or "datagram"."""
        return self.channel.mode

    @property
    def ident(self) -> int:
        """The identifier the next echo request is sent with."""
        return self._ident

    def close(self) -> None:
        """Stop reading and close every socket of this family."""
        for channel in [self.channel, *self._draining]:
            self._unwatch(channel)
        self._draining.clear()

    def sockaddr(self, address: str) -> Any:
        """The socket address of ``address`` (cached; its [0] is the canonical text form)."""
        cached = self._sockaddrs.get(address)
        if cached is None:
            if "%" in address:  # an IPv6 zone: let the resolver find the interface index
                cached = socket.getaddrinfo(
                    address, None, self._af, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST
                )[0][4]
            else:
                text = socket.inet_ntop(self._af, socket.inet_pton(self._af, address))
                cached = (text, 0) if self.family == 4 else (text, 0, 0, 0)
            if len(self._sockaddrs) >= 100_000:
                self._sockaddrs.clear()
            self._sockaddrs[address] = cached
        return cached

    # -- sending -------------------------------------------------------------------------

    def send(self, echo: Echo, sockaddr: Any) -> str | None:
        """Send one echo request: None when it left, else the error text.

        Raises BlockingIOError when the send buffer is full (the caller waits and retries).
        """
        key = self._next_key(time.monotonic())
        packet = self.codec.build(self._ident, self._seq, echo.serial)
        sock = self.channel.sock
        for attempt in (0, 1):
            echo.sent_mono = time.monotonic()
            echo.sent_ns = time.time_ns()
            try:
                sock.sendto(packet, sockaddr)
            except BlockingIOError:
                raise
            except OSError as exc:
                # A socket reports an earlier ICMP error on its next call; try once more
                # so that another path's error is not taken for this one's.
                if attempt == 0 and is_transient_send_error(exc):
                    continue
                return f"cannot send echo request: {exc.strerror or exc}"
            # Registered after the send: the reply is read by a later callback, never before.
            self.ledger.sent(echo, key)
            return None
        return None  # pragma: no cover - the loop always returns

    def _next_key(self, now: float) -> int:
        if now >= self._rotate_at:
            self._rotate(now)
        in_flight = self.ledger.in_flight
        family = self.family << 32
        for _ in range(0x10000):
            self._seq = (self._seq + 1) & 0xFFFF
            if self._seq == 0 and self.raw:
                self._ident = _random_ident(self._ident)  # a new identifier at every wrap
            key = family | (self._ident << 16) | self._seq  # echo_key(), inlined: hot path
            if key not in in_flight:
                return key
        raise RuntimeError("65536 echo requests in flight under one identifier")

    def _rotate(self, now: float) -> None:
        self._rotate_at = now + self.settings.identifier_rotation
        self.rotations += 1
        if self.raw:
            self._ident = _random_ident(self._ident)
            return
        # A datagram socket's identifier is its port: rotating means a fresh socket. The old
        # one stays open a little so replies still in flight are matched (or counted late).
        try:
            fresh = Channel(self.family, False, self.settings.receive_buffer)
        except (SocketRefused, OSError) as exc:
            logger.warning("icmp: cannot open a new ICMPv{} socket to rotate: {}",
                           self.family, exc)
            return
        old, self.channel = self.channel, fresh
        assert fresh.ident is not None
        self._ident = fresh.ident
        self._watch(fresh)
        self._draining.append(old)
        self.loop.call_later(self.max_timeout + DRAIN, self._retire_channel, old)

    def _retire_channel(self, channel: Channel) -> None:
        if channel in self._draining:
            self._draining.remove(channel)
            self._unwatch(channel)

    # -- receiving -----------------------------------------------------------------------

    def _watch(self, channel: Channel) -> None:
        self.loop.add_reader(channel.fileno(), self._on_readable, channel)

    def _unwatch(self, channel: Channel) -> None:
        try:
            self.loop.remove_reader(channel.fileno())
        except (ValueError, OSError, RuntimeError):  # already closed, or the loop is closing
            pass
        channel.close()

    def _on_readable(self, channel: Channel) -> None:
        if not channel.raw:
            self._read_error_queue(channel)  # first: it also clears the socket's pending error
        sock, parse, ledger = channel.sock, self.codec.parse, self.ledger
        family, af = self.family, self.family << 32
        for _ in range(BATCH):
            try:
                data, ancillary, _flags, addr = sock.recvmsg(RECEIVE_SIZE, ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # An earlier ICMP error reported as the socket's error: already matched
                # from the ICMP message itself (raw) or the error queue (datagram).
                ledger.counters.socket_errors += 1
                continue
            msg = parse(data)
            if msg is None:
                continue
            key = af | (msg.ident << 16) | msg.seq  # echo_key(), inlined: hot path
            if msg.kind == REPLY:
                rx_ns = kernel_receive_ns(ancillary)
                ledger.reply(key, msg.tag, addr[0], rx_ns, time.monotonic())
            else:
                assert msg.quoted_destination is not None
                text = error_text(family, msg.icmp_type, msg.icmp_code, addr[0])
                ledger.error(key, msg.tag, msg.quoted_destination, text, time.monotonic())
        ledger.prune(time.monotonic())

    def _read_error_queue(self, channel: Channel) -> None:
        sock, family, ident = channel.sock, self.family, channel.ident
        assert ident is not None
        for _ in range(BATCH):
            try:
                data, ancillary, _flags, addr = sock.recvmsg(
                    RECEIVE_SIZE, ANCILLARY_SIZE, MSG_ERRQUEUE
                )
            except OSError:  # EAGAIN: the queue is empty
                return
            error = extended_error(family, ancillary)
            quoted = self.codec.parse_request(data)
            if error is None or quoted is None:
                continue
            err, origin, icmp_type, code, offender = error
            if origin in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
                text = error_text(family, icmp_type, code, offender or addr[0])
            else:
                text = os.strerror(err).lower()
            _ident, seq, tag = quoted
            # The kernel wrote the socket's identifier into the request; match on it.
            key = echo_key(family, ident, seq)
            self.ledger.error(key, tag, addr[0], text, time.monotonic())


def _random_ident(avoid: int | None = None) -> int:
    while True:
        ident = random.getrandbits(16)
        if ident != avoid:
            return ident
