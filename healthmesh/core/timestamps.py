"""Kernel receive timestamps (SO_TIMESTAMPNS) for probe kinds that time replies by the kernel."""

from __future__ import annotations

import socket
import struct

#: The socket option asking for a receive timestamp with every recvmsg (Linux value as fallback).
SO_TIMESTAMPNS: int = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")


def kernel_receive_ns(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The kernel's receive time (ns, wall clock) in recvmsg's ancillary data, else 0."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return sec * 1_000_000_000 + nsec
    return 0
