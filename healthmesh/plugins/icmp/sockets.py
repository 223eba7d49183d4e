"""One ICMP socket, opened through icmplib and tuned: kernel timestamps, filters, buffers.

icmplib opens the socket (raw, or the unprivileged datagram "ping" socket) and classifies a
refusal as a permission problem. What icmplib does not offer is set with setsockopt on the
socket it hands back: SO_TIMESTAMPNS (kernel receive timestamps, read with recvmsg), a
larger receive buffer, an ICMP type filter on raw sockets, and IP_RECVERR on datagram
sockets, whose ICMP errors arrive only on the error queue.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import struct
import sys
from pathlib import Path as FsPath

from icmplib import ICMPv4Socket, ICMPv6Socket
from icmplib.exceptions import ICMPSocketError, SocketPermissionError

from healthmesh import SO_TIMESTAMPNS

# Linux constants the socket module does not export.
SO_RCVBUFFORCE = 33
SOL_RAW = 255
ICMP_FILTER = 1
ICMP6_FILTER = 1
IP_RECVERR = 11
IPV6_RECVERR = 25
MSG_ERRQUEUE = 0x2000
SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3

#: Types a raw socket lets through: echo reply and the errors that quote a request.
_V4_PASS = (0, 3, 11, 12)
_V6_PASS = (129, 1, 2, 3, 4)


class SocketRefused(Exception):
    """The kernel refused this kind of ICMP socket; ``permission`` says whether for privilege."""

    def __init__(self, message: str, *, permission: bool) -> None:
        super().__init__(message)
        self.permission = permission


class Channel:
    """An open ICMP socket of one family: raw or datagram, non-blocking, timestamping."""

    def __init__(self, family: int, raw: bool, receive_buffer: int) -> None:
        self.family = family
        self.raw = raw
        factory = ICMPv4Socket if family == 4 else ICMPv6Socket
        try:
            self._icmp = factory(privileged=raw)  # keeps the socket open while referenced
        except SocketPermissionError:
            raise SocketRefused("permission denied", permission=True) from None
        except ICMPSocketError as exc:
            raise SocketRefused(str(exc), permission=False) from None
        sock = self._icmp.sock
        assert sock is not None
        self.sock: socket.socket = sock
        try:
            self._tune(receive_buffer)
        except OSError:
            self.close()
            raise
        #: Datagram sockets: the kernel writes the socket's port into every echo identifier.
        self.ident: int | None = None if raw else int(sock.getsockname()[1])

    def _tune(self, receive_buffer: int) -> None:
        sock = self.sock
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        try:  # beyond net.core.rmem_max when we have CAP_NET_ADMIN
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if self.raw and self.family == 4:
            blocked = 0xFFFFFFFF
            for t in _V4_PASS:
                blocked &= ~(1 << t)
            sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", blocked))
        elif self.raw:
            words = [0xFFFFFFFF] * 8  # Linux: a set bit blocks that type
            for t in _V6_PASS:
                words[t >> 5] &= ~(1 << (t & 31))
            sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *words))
        else:
            if self.family == 4:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
                sock.bind(("0.0.0.0", 0))
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
                sock.bind(("::", 0))

    @property
    def mode(self) -> str:
        """"raw" or "datagram"."""
        return "raw" if self.raw else "datagram"

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._icmp.close()


def extended_error(
    family: int, ancillary: list[tuple[int, int, bytes]]
) -> tuple[int, int, int, int, str] | None:
    """(errno, origin, type, code, offender) of an error-queue message, or None."""
    level, kind = (
        (socket.IPPROTO_IP, IP_RECVERR) if family == 4 else (socket.IPPROTO_IPV6, IPV6_RECVERR)
    )
    for lvl, knd, data in ancillary:
        if lvl != level or knd != kind or len(data) < 16:
            continue
        ee_errno, origin, icmp_type, code = struct.unpack_from("=IBBB", data)
        offender = ""
        addr = data[16:]
        if family == 4 and len(addr) >= 8:
            offender = socket.inet_ntop(socket.AF_INET, addr[4:8])
        elif family == 6 and len(addr) >= 24:
            offender = socket.inet_ntop(socket.AF_INET6, addr[8:24])
        return ee_errno, origin, icmp_type, code, offender
    return None


def ping_group_range() -> tuple[int, int] | None:
    """The kernel's net.ipv4.ping_group_range for this network namespace."""
    try:
        low, high = FsPath("/proc/sys/net/ipv4/ping_group_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def unavailable_reason(raw_error: str | None, datagram_error: str | None) -> str:
    """Why no ICMP socket could be opened, and the fix, in one line."""
    gid = os.getegid()
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    current = ping_group_range()
    now = f'"{current[0]} {current[1]}"' if current else "unknown"
    python = os.path.realpath(sys.executable)
    return (
        f"no ICMP socket can be opened: a raw socket needs root or CAP_NET_RAW "
        f"({raw_error or 'not tried'}; fix: run as root or `setcap cap_net_raw+ep {python}`), "
        f"and an unprivileged datagram ICMP socket needs group {group} (gid {gid}) inside "
        f"net.ipv4.ping_group_range, now {now} ({datagram_error or 'not tried'}; fix: "
        f'`sysctl -w net.ipv4.ping_group_range="{gid} {gid}"`)'
    )


def is_transient_send_error(exc: OSError) -> bool:
    """True for errors that may be an earlier ICMP error reported late by the socket."""
    return exc.errno in (
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ECONNREFUSED,
        errno.EHOSTDOWN,
        errno.EPROTO,
        errno.ENOPROTOOPT,
        errno.EACCES,
    )

