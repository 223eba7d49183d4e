"""The ``clustermesh`` peer source: nodes of remote clusters, read-only, named ``cluster/node``."""

from __future__ import annotations

from typing import Any

import anyio
from anyio.abc import TaskStatus

from healthmesh import Node, PeerSource, SourceFeed
from healthmesh.plugins.clustermesh.connection import connection_from
from healthmesh.plugins.clustermesh.follower import Follower
from healthmesh.plugins.clustermesh.settings import (
    ClustermeshSettings,
    ClusterSettings,
    check_clustermesh,
    static_nodes,
)
from healthmesh.plugins.clustermesh.tables import CiliumTable, HealthmeshTable, NodeTable


class ClustermeshSource(PeerSource):
    """Remote clusters' nodes, each cluster from its own etcd (or a static list).

    Every cluster is followed independently: one cluster's etcd being down marks the source
    stale (naming the cluster) and keeps that cluster's last nodes, while the others go on.
    """

    name = "clustermesh"
    section = "clustermesh"
    Settings = ClustermeshSettings

    @classmethod
    def validate_settings(cls, settings: ClustermeshSettings, config: Any) -> None:
        check_clustermesh(settings, config)

    def __init__(self, settings: ClustermeshSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.interval = None if settings.interval is None else float(settings.interval)
        self._nodes: dict[str, list[Node]] = {}
        self._stale: dict[str, str] = {}
        self._feed: SourceFeed | None = None

    def _table(self, cluster: ClusterSettings) -> NodeTable:
        label = f"clustermesh {cluster.name}"
        kw: dict[str, Any] = {
            "max_bytes": self.settings.max_value_bytes,
            "interval": self.interval,
        }
        if cluster.format == "cilium":
            return CiliumTable(label, {str(cluster.name)}, **kw)
        return HealthmeshTable(label, cluster.prefix, {str(cluster.name)}, **kw)

    async def run(self, feed: SourceFeed, *, task_status: TaskStatus[None]) -> None:
        self._feed = feed
        followers: list[tuple[str, Follower]] = []
        for i, cluster in enumerate(self.settings.clusters):
            name = str(cluster.name)
            if cluster.nodes:
                nodes = static_nodes(cluster, f"clustermesh.clusters[{i}].nodes")
                self._nodes[name] = [_with_interval(n, self.interval) for n in nodes]
                continue
            self._nodes[name] = []
            followers.append(
                (
                    name,
                    Follower(
                        f"clustermesh {name}",
                        connection_from(cluster, self.context.config.path),
                        self._table(cluster),
                        publish=lambda nodes, c=name: self._publish(c, nodes),
                        stale=lambda reason, c=name: self._mark(c, reason),
                        fresh=lambda c=name: self._mark(c, None),
                        retry_max=float(self.settings.retry_max),
                        max_keys=self.settings.max_keys,
                    ),
                )
            )
        self._replace()
        async with anyio.create_task_group() as tg:
            for _name, follower in followers:
                await tg.start(self._follow, follower)
            task_status.started()

    async def _follow(self, follower: Follower, *, task_status: TaskStatus[None]) -> None:
        await follower.run(ready=task_status.started)

    def _publish(self, cluster: str, nodes: list[Node]) -> None:
        self._nodes[cluster] = nodes
        self._replace()

    def _replace(self) -> None:
        if self._feed is not None:
            self._feed.replace([n for nodes in self._nodes.values() for n in nodes])

    def _mark(self, cluster: str, reason: str | None) -> None:
        if reason is None:
            self._stale.pop(cluster, None)
        else:
            self._stale[cluster] = reason
        if self._feed is None:
            return
        if self._stale:
            self._feed.mark_stale(
                "; ".join(f"cluster {c}: {r}" for c, r in sorted(self._stale.items()))
            )
        else:
            self._feed.mark_fresh()


def _with_interval(node: Node, interval: float | None) -> Node:
    from dataclasses import replace

    return replace(node, interval=interval, info={"heartbeat": "unknown"})
