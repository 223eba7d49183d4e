"""Merge the node sets of all peer sources into one, and tell the scheduler what changed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from loguru import logger

from healthmesh.core.model import Node, Path


@dataclass
class SourceStatus:
    """Freshness of one peer source, shown in status."""

    name: str
    nodes: int = 0
    stale: bool = False
    reason: str | None = None
    updated_at: float | None = None


@dataclass
class Feed:
    """A peer source's handle into the membership (implements ``SourceFeed``)."""

    membership: Membership
    name: str

    def replace(self, nodes: Iterable[Node]) -> None:
        self.membership.replace(self.name, nodes)

    def mark_stale(self, reason: str) -> None:
        self.membership.mark_stale(self.name, reason)

    def mark_fresh(self) -> None:
        self.membership.mark_fresh(self.name)


@dataclass
class Membership:
    """The merged node set: the local node first, then every source's nodes."""

    local: Node
    on_change: Callable[[], None] = lambda: None
    _by_source: dict[str, dict[str, Node]] = field(default_factory=dict)
    status: dict[str, SourceStatus] = field(default_factory=dict)
    _merged: dict[str, Node] = field(default_factory=dict)
    _origin: dict[str, str] = field(default_factory=dict)
    _paths: dict[tuple[Node, bool, bool], list[Path]] = field(default_factory=dict)
    _conflicts: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._merged = {self.local.id: self.local}
        self._origin = {self.local.id: "local"}

    def feed(self, source: str) -> Feed:
        """A feed for one source, in priority order of creation (earlier wins conflicts)."""
        self._by_source.setdefault(source, {})
        self.status.setdefault(source, SourceStatus(source))
        return Feed(self, source)

    def replace(self, source: str, nodes: Iterable[Node]) -> None:
        """Replace one source's node set and recompute the merge."""
        table: dict[str, Node] = {}
        for node in nodes:
            if node.id in table:
                logger.warning(
                    "source {}: node {} listed twice; the first is used", source, node.id
                )
                continue
            table[node.id] = node
        self._by_source[source] = table
        st = self.status.setdefault(source, SourceStatus(source))
        st.nodes, st.updated_at = len(table), time.time()
        self._merge()

    def mark_stale(self, source: str, reason: str) -> None:
        st = self.status.setdefault(source, SourceStatus(source))
        if not st.stale or st.reason != reason:
            logger.warning("source {} is stale, keeping its {} nodes: {}", source, st.nodes, reason)
        st.stale, st.reason = True, reason

    def mark_fresh(self, source: str) -> None:
        st = self.status.setdefault(source, SourceStatus(source))
        if st.stale:
            logger.info("source {} is fresh again", source)
        st.stale, st.reason = False, None

    def _merge(self) -> None:
        """Merge every source's nodes, warning (once) about peers that look wrong.

        A node with this node's name is dropped (it cannot be shown beside this node); a
        peer listing an address of this node or of a node merged earlier is kept (it is
        probed as listed) but named in a warning. Sources are read at run time, so this
        never raises: static configs get these checks as errors instead (config.py).
        """
        local = self.local
        merged: dict[str, Node] = {local.id: local}
        origin: dict[str, str] = {local.id: "local"}
        taken = {a: local.id for a in (*local.addresses, *local.health_addresses)}
        conflicts: list[str] = []
        for source, table in self._by_source.items():
            for node_id, node in table.items():
                if node_id == local.id:
                    # A source that lists every node (etcd) lists this one too: fine as long
                    # as it is really this node.
                    if set(node.addresses) != set(local.addresses):
                        conflicts.append(
                            f"source {source}: node {node_id} has this node's name but "
                            f"addresses {', '.join(node.addresses)}; ignored"
                        )
                    continue
                if node_id in merged:
                    if origin[node_id] != source and self._origin.get(node_id) != origin[node_id]:
                        logger.debug(
                            "node {} from {} shadowed by {}", node_id, source, origin[node_id]
                        )
                    continue
                for address in (*node.addresses, *node.health_addresses):
                    owner = taken.setdefault(address, node_id)
                    if owner != node_id:
                        whose = "this node" if owner == local.id else f"node {owner}"
                        conflicts.append(
                            f"source {source}: node {node_id} lists {address}, also an address "
                            f"of {whose}"
                        )
                merged[node_id] = node
                origin[node_id] = source
        for message in conflicts:
            if message not in self._conflicts:  # once per conflict, not once per merge
                logger.warning("{}", message)
        self._conflicts = set(conflicts)
        changed = merged != self._merged or any(
            merged[k].labels != self._merged[k].labels for k in merged if k in self._merged
        )
        self._merged, self._origin = merged, origin
        if changed:
            self.on_change()

    def paths_of(self, node: Node, *, host: bool, endpoint: bool) -> list[Path]:
        """``node.paths(...)``, cached per node value (snapshots ask for all of them often)."""
        key = (node, host, endpoint)
        cached = self._paths.get(key)
        if cached is None:
            if len(self._paths) > 4 * len(self._merged) + 64:
                self._paths.clear()  # drop entries of nodes that changed or left
            cached = self._paths[key] = node.paths(host=host, endpoint=endpoint)
        return cached

    def is_primary(self, key: tuple[str, str, str]) -> bool:
        """Whether the path ``(node id, address, role)`` is its node's first of its role."""
        node = self._merged.get(key[0])
        if node is None:
            return True
        addresses = node.addresses if key[2] == "host" else node.health_addresses
        return bool(addresses) and addresses[0] == key[1]

    def nodes(self) -> list[Node]:
        """Every node, the local one first, the rest ordered by cluster and name."""
        rest = sorted(
            (n for k, n in self._merged.items() if k != self.local.id), key=lambda n: n.id
        )
        return [self.local, *rest]

    def origin(self, node_id: str) -> str | None:
        """Which source a node came from ("local" for this node)."""
        return self._origin.get(node_id)
