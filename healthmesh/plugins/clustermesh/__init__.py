"""The clustermesh plugin: probe the nodes of remote clusters (healthmesh's or Cilium's layout)."""

from __future__ import annotations

from collections.abc import Callable

from healthmesh import PeerSource, hookimpl
from healthmesh.plugins.clustermesh.source import ClustermeshSource

__all__ = ["ClustermeshSource"]


@hookimpl
def register_peer_sources(register: Callable[[type[PeerSource]], None]) -> None:
    register(ClustermeshSource)
