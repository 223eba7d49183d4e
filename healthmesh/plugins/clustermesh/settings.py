"""``[clustermesh]`` settings: the remote clusters, each read from its etcd or listed statically."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from healthmesh import ComponentSettings, ConfigError, Duration, Name, Node, Settings, parse_nodes
from healthmesh.plugins.clustermesh.connection import TlsSettings, check_connection, check_prefix


class ClusterSettings(Settings, kw_only=True):
    """One remote cluster: ``{name, endpoints | nodes, format, prefix, tls, username, ...}``."""

    name: Name
    #: etcd endpoints of the remote cluster (read-only: healthmesh never writes there).
    endpoints: list[str] = msgspec.field(default_factory=list)
    #: Or a static node list, for a cluster without a reachable etcd.
    nodes: list[dict[str, Any]] = msgspec.field(default_factory=list)
    #: "healthmesh": healthmesh's layout; "cilium": Cilium's cilium/state/nodes/v1 keys.
    format: Literal["healthmesh", "cilium"] = "healthmesh"
    #: Key prefix of healthmesh's layout in that etcd (format "healthmesh" only).
    prefix: str = "healthmesh"
    timeout: Duration = Duration(2.0)
    tls: TlsSettings = msgspec.field(default_factory=TlsSettings)
    username: str | None = None
    password: str | None = None
    password_file: str | None = None


class ClustermeshSettings(ComponentSettings):
    """``[clustermesh]``: remote clusters whose nodes this agent probes too."""

    #: How often remote nodes are probed (default: ``[probing] interval``).
    interval: Duration | None = None
    clusters: list[ClusterSettings] = msgspec.field(default_factory=list)
    retry_max: Duration = Duration(10.0)
    max_value_bytes: int = 65536
    max_keys: int = 50000


def static_nodes(cluster: ClusterSettings, where: str) -> list[Node]:
    """The static nodes of a cluster, their cluster set to its name; ConfigError names the key."""
    tables = []
    for i, table in enumerate(cluster.nodes):
        if isinstance(table, dict) and table.get("cluster", cluster.name) != cluster.name:
            raise ConfigError(
                f"{where}[{i}].cluster: {table['cluster']!r} is not this cluster ({cluster.name!r})"
            )
        tables.append({**table, "cluster": str(cluster.name)} if isinstance(table, dict) else table)
    return parse_nodes(tables, where)


def check_clustermesh(settings: ClustermeshSettings, config: Any) -> None:
    """Everything ``config check`` can know about ``[clustermesh]`` without contacting etcd."""
    if not settings.clusters:
        raise ValueError("clusters: list at least one remote cluster")
    if settings.interval is not None and settings.interval < config.probing.interval:
        raise ValueError("interval: must not be shorter than probing.interval")
    if settings.retry_max < 0.5:
        raise ValueError("retry_max: must be at least 500ms")
    if not 256 <= settings.max_value_bytes <= 1_572_864:
        raise ValueError("max_value_bytes: must be between 256 and 1572864")
    if settings.max_keys < 1:
        raise ValueError("max_keys: must be at least 1")
    seen: dict[str, int] = {}
    for i, cluster in enumerate(settings.clusters):
        where = f"clusters[{i}]"
        if cluster.name == config.node.cluster:
            raise ValueError(f"{where}.name: {cluster.name!r} is this node's own cluster")
        if cluster.name in seen:
            raise ValueError(
                f"{where}.name: duplicate cluster {cluster.name!r} "
                f"(also clusters[{seen[cluster.name]}])"
            )
        seen[cluster.name] = i
        if bool(cluster.endpoints) == bool(cluster.nodes):
            raise ValueError(f"{where}: give either endpoints (etcd) or nodes (a static list)")
        if cluster.nodes:
            if cluster.format != "healthmesh":
                raise ValueError(f"{where}.format: only for clusters read from etcd")
            static_nodes(cluster, f"{where}.nodes")
            continue
        check_connection(cluster, config.path, f"{where}.")
        check_prefix(cluster.prefix, f"{where}.prefix")
