"""The built-in ``icmp`` probe kind: registers :class:`IcmpProbe` with healthmesh.

See docs/icmp.md for the design: one socket per address family, replies matched by
identifier, sequence and a per-request tag, kernel receive timestamps, and the fallback
from raw to unprivileged datagram ICMP sockets.
"""

from __future__ import annotations

from collections.abc import Callable

from healthmesh import Probe, hookimpl
from healthmesh.plugins.icmp.probe import IcmpProbe
from healthmesh.plugins.icmp.settings import IcmpSettings

__all__ = ["IcmpProbe", "IcmpSettings", "register_probe_kinds"]


@hookimpl
def register_probe_kinds(register: Callable[[type[Probe]], None]) -> None:
    """Register the ``icmp`` probe kind."""
    register(IcmpProbe)
