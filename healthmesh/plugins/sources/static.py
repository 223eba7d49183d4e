"""Peer source ``static``: the nodes listed in the config file."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from healthmesh import (
    ComponentSettings,
    Node,
    PeerSource,
    SourceFeed,
    check_against_local,
    hookimpl,
    parse_nodes,
)


class StaticSettings(ComponentSettings):
    """``[sources.static]``: ``nodes = [{name, cluster, addresses, health_addresses, labels}]``."""

    nodes: list[dict[str, Any]] = msgspec.field(default_factory=list)


class StaticSource(PeerSource):
    """Publishes the configured node list once."""

    name = "static"
    Settings = StaticSettings

    @classmethod
    def validate_settings(cls, settings: StaticSettings, config: Any) -> None:
        if not settings.nodes:
            raise ValueError("nodes: empty peer set; list at least one node")
        check_against_local(parse_nodes(settings.nodes, "nodes"), config.core.node, "nodes")

    def __init__(self, settings: StaticSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.nodes: list[Node] = parse_nodes(settings.nodes, "sources.static.nodes")

    async def run(self, feed: SourceFeed, *, task_status: TaskStatus[None]) -> None:
        feed.replace(self.nodes)
        task_status.started()
        await anyio.sleep_forever()


@hookimpl
def register_peer_sources(register: Any) -> None:
    register(StaticSource)
