"""The kubernetes plugin: peer source ``kubernetes`` (Node objects from the API server).

Nodes are listed and watched over HTTP with httpx (docs/kubernetes.md says why no client
library); CiliumNode objects add the nodes' health-endpoint addresses where Cilium runs.
"""

from __future__ import annotations

from collections.abc import Callable

from healthmesh import PeerSource, hookimpl
from healthmesh.plugins.sources.kubernetes.source import KubernetesSettings, KubernetesSource

__all__ = ["KubernetesSettings", "KubernetesSource"]


@hookimpl
def register_peer_sources(register: Callable[[type[PeerSource]], None]) -> None:
    register(KubernetesSource)
