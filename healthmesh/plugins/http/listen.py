"""Listen addresses ("0.0.0.0:4240", "[::]:4240"): parsed, checked and bound one socket each.

The IPv6 socket is made IPv6-only, so 0.0.0.0 and [::] can share a port (binding [::]
dual-stack first is what makes a second bind of 0.0.0.0 fail with "address already in
use"), and each address can be configured, and bound, on its own.
"""

from __future__ import annotations

import errno
import socket

from healthmesh import format_listen, parse_listen


def check_listen(addresses: list[str]) -> list[tuple[str, int]]:
    """Parse every address; ValueError ``listen[i]: ...`` naming the first bad or repeated one."""
    out: list[tuple[str, int]] = []
    if not addresses:
        raise ValueError("listen: at least one address is required")
    for i, text in enumerate(addresses):
        try:
            pair = parse_listen(text)
        except ValueError as exc:
            raise ValueError(f"listen[{i}]: {exc}") from None
        if pair in out:
            raise ValueError(f"listen[{i}]: {text!r} is listed twice")
        out.append(pair)
    return out


def bind(address: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on ``address:port``; OSError naming the address when it fails."""
    where = format_listen(address, port)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise _bind_error(where, exc) from None
    try:
        # Rebinding right after a restart must not fail on connections in TIME_WAIT; this is
        # not SO_REUSEPORT, so a second live responder on the port is still refused.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sockaddr = socket.getaddrinfo(
                address, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
            )[0][4]
        else:
            sockaddr = (address, port)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _bind_error(where, exc) from None
    return sock


def ipv6_unavailable(exc: OSError) -> bool:
    """True when binding failed because this host has no IPv6 at all."""
    return exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def _bind_error(where: str, exc: OSError) -> OSError:
    """An OSError whose text is one line naming the address (no "[Errno N]" prefix)."""
    err = OSError(f"cannot listen on {where}: {_reason(exc)}")
    err.errno = exc.errno
    return err


def _reason(exc: OSError) -> str:
    reason = (exc.strerror or str(exc)).lower()
    if exc.errno == errno.EADDRINUSE:
        reason += " (another process listens there; is a healthmesh agent already running?)"
    elif exc.errno == errno.EACCES:
        reason += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return reason
