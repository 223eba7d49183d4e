"""ICMP echo requests built, and echo replies and ICMP errors parsed, for IPv4 and IPv6.

The echo data starts with 16 bytes that identify the request beyond its identifier and
sequence number: the agent's random 8-byte token and a 64-bit serial that never repeats.
A reply is credited only when it echoes both, so a late reply can never be mistaken for the
answer to a newer request that reuses the same identifier and sequence.
"""

from __future__ import annotations

import socket
import struct
from array import array
from typing import NamedTuple

ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}

#: ICMP message types that quote one of our echo requests and say why it failed.
_V4_ERRORS = {3, 11, 12}
_V6_ERRORS = {1, 2, 3, 4}

_V4_TEXT = {
    (3, 0): "destination network unreachable",
    (3, 1): "destination host unreachable",
    (3, 2): "destination protocol unreachable",
    (3, 3): "destination port unreachable",
    (3, 4): "fragmentation needed",
    (3, 5): "source route failed",
    (3, 6): "destination network unknown",
    (3, 7): "destination host unknown",
    (3, 8): "source host isolated",
    (3, 9): "destination network administratively prohibited",
    (3, 10): "destination host administratively prohibited",
    (3, 11): "destination network unreachable for type of service",
    (3, 12): "destination host unreachable for type of service",
    (3, 13): "communication administratively prohibited",
    (3, 14): "host precedence violation",
    (3, 15): "precedence cutoff in effect",
    (11, 0): "time to live exceeded",
    (11, 1): "fragment reassembly time exceeded",
}
_V6_TEXT = {
    (1, 0): "no route to destination",
    (1, 1): "communication administratively prohibited",
    (1, 2): "beyond scope of source address",
    (1, 3): "destination address unreachable",
    (1, 4): "destination port unreachable",
    (1, 5): "source address failed ingress/egress policy",
    (1, 6): "reject route to destination",
    (3, 0): "hop limit exceeded",
    (3, 1): "fragment reassembly time exceeded",
}
_V4_TYPE_TEXT = {3: "destination unreachable", 11: "time exceeded", 12: "parameter problem"}
_V6_TYPE_TEXT = {
    1: "destination unreachable",
    2: "packet too big",
    3: "time exceeded",
    4: "parameter problem",
}

REPLY = 1
ERROR = 2


class Message(NamedTuple):
    """An echo reply, or an ICMP error quoting one of our echo requests."""

    kind: int  # REPLY or ERROR
    ident: int
    seq: int
    tag: bytes  # the first 16 echo data bytes (token + serial); shorter when not quoted
    icmp_type: int = 0
    icmp_code: int = 0
    quoted_destination: str | None = None  # the destination of the quoted request


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``, in network byte order as an int."""
    if len(data) & 1:
        data += b"\0"
    total = sum(array("H", data))  # native order; one's complement sums are order-free
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return socket.ntohs(~total & 0xFFFF)


class EchoCodec:
    """Builds this agent's echo requests and parses what one socket receives.

    ``raw`` IPv4 sockets receive the IP header in front of the ICMP message; raw ICMPv6
    sockets and unprivileged datagram sockets receive the ICMP message alone. The kernel
    fills in the checksum for ICMPv6 and for datagram sockets, so only raw IPv4 computes it.
    """

    def __init__(self, family: int, raw: bool, token: bytes, payload_size: int) -> None:
        self.family = family
        self.raw = raw
        self.token = token
        self._type = ECHO_REQUEST[family]
        self._reply = ECHO_REPLY[family]
        self._errors = _V4_ERRORS if family == 4 else _V6_ERRORS
        self._padding = bytes(max(0, payload_size - 16))
        self._checksum = family == 4 and raw
        self._ip_header = family == 4 and raw
        # One's complement sum of everything but identifier, sequence and serial, so that
        # a request's checksum is a few integer additions (this runs once per request).
        self._fixed_sum = (self._type << 8) + _word_sum(token + self._padding)

    def build(self, ident: int, seq: int, serial: int) -> bytes:
        """An echo request carrying ``ident``, ``seq`` and the token + ``serial`` tag."""
        csum = 0
        if self._checksum:
            total = (
                self._fixed_sum + ident + seq
                + (serial >> 48) + ((serial >> 32) & 0xFFFF)
                + ((serial >> 16) & 0xFFFF) + (serial & 0xFFFF)
            )
            total = (total & 0xFFFF) + (total >> 16)
            total = (total & 0xFFFF) + (total >> 16)
            csum = ~total & 0xFFFF
        header = struct.pack("!BBHHH", self._type, 0, csum, ident, seq)
        return header + self.token + serial.to_bytes(8, "big") + self._padding

    def parse(self, data: bytes) -> Message | None:
        """The echo reply or ICMP error in ``data``, or None for anything else."""
        off = ((data[0] & 0x0F) << 2) if self._ip_header and data else 0
        if len(data) < off + 8:
            return None
        kind = data[off]
        if kind == self._reply:
            ident, seq = struct.unpack_from("!HH", data, off + 4)
            return Message(REPLY, ident, seq, data[off + 8 : off + 24])
        if kind in self._errors:
            quoted = self._quoted_request(data, off + 8)
            if quoted is None:
                return None
            ident, seq, tag, destination = quoted
            return Message(ERROR, ident, seq, tag, kind, data[off + 1], destination)
        return None

    def parse_request(self, data: bytes) -> tuple[int, int, bytes] | None:
        """Identifier, sequence and tag of one of our own echo requests (the error queue's)."""
        if len(data) < 8 or data[0] != self._type:
            return None
        ident, seq = struct.unpack_from("!HH", data, 4)
        return ident, seq, data[8:24]

    def _quoted_request(self, data: bytes, inner: int) -> tuple[int, int, bytes, str] | None:
        if self.family == 4:
            if len(data) < inner + 20 or data[inner] >> 4 != 4 or data[inner + 9] != 1:
                return None
            destination = socket.inet_ntop(socket.AF_INET, data[inner + 16 : inner + 20])
            start = inner + ((data[inner] & 0x0F) << 2)
        else:
            if len(data) < inner + 40 or data[inner] >> 4 != 6 or data[inner + 6] != 58:
                return None
            destination = socket.inet_ntop(socket.AF_INET6, data[inner + 24 : inner + 40])
            start = inner + 40
        if len(data) < start + 8 or data[start] != self._type:
            return None
        ident, seq = struct.unpack_from("!HH", data, start + 4)
        return ident, seq, data[start + 8 : start + 24], destination


def _word_sum(data: bytes) -> int:
    """Sum of the big-endian 16-bit words of ``data`` (padded to even length), unfolded."""
    if len(data) & 1:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def error_text(family: int, icmp_type: int, code: int, source: str) -> str:
    """The path's error text for an ICMP error, as ping words it, naming who sent it."""
    table, types = (_V4_TEXT, _V4_TYPE_TEXT) if family == 4 else (_V6_TEXT, _V6_TYPE_TEXT)
    text = table.get((icmp_type, code))
    if text is None:
        text = f"{types.get(icmp_type, f'ICMP type {icmp_type}')} (code {code})"
    return f"{text} from {source}"
