"""Peer source ``etcd``: register this node, keep its heartbeat, and watch the other nodes."""

from __future__ import annotations

from typing import Any

from anyio.abc import TaskStatus

from healthmesh import PeerSource, SourceFeed
from healthmesh.plugins.etcd.follower import Follower, Registration
from healthmesh.plugins.etcd.settings import EtcdSettings, check_etcd_settings, connection_from
from healthmesh.plugins.etcd.tables import HealthmeshTable


class EtcdSource(PeerSource):
    """The nodes registered in etcd under ``<prefix>/nodes/v1/``, with their heartbeats.

    A registration is durable (a crashed node stays, shown unreachable, its heartbeat
    ``expired``); only ``healthmesh leave`` removes it. While etcd cannot be reached the last
    node set is kept, probing goes on and the source is shown stale.
    """

    name = "etcd"
    Settings = EtcdSettings

    @classmethod
    def validate_settings(cls, settings: EtcdSettings, config: Any) -> None:
        check_etcd_settings(settings, config)

    def __init__(self, settings: EtcdSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.conn = connection_from(settings, context.config.path)
        local = context.local_node
        clusters = {local.cluster, *(str(c) for c in settings.clusters)}
        self.table = HealthmeshTable(
            "sources.etcd",
            settings.prefix,
            clusters,
            max_bytes=settings.max_value_bytes,
            exclude=local.id,
        )
        self.registration = (
            Registration(local, settings.prefix, float(settings.lease_ttl))
            if settings.register
            else None
        )
        self.follower: Follower | None = None

    async def run(self, feed: SourceFeed, *, task_status: TaskStatus[None]) -> None:
        self.follower = Follower(
            "sources.etcd",
            self.conn,
            self.table,
            publish=feed.replace,
            stale=lambda reason: feed.mark_stale(f"etcd: {reason}"),
            fresh=feed.mark_fresh,
            retry_max=float(self.settings.retry_max),
            max_keys=self.settings.max_keys,
            registration=self.registration,
        )
        await self.follower.run(ready=task_status.started)
