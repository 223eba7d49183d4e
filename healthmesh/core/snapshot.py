"""Build the JSON snapshot (docs/snapshot.schema.json) from the membership and path states.

A ``SnapshotBuilder`` keeps each node's rendered entry and reuses it while the node and the
per-kind views it was built from are the same objects: the state store replaces a path's
view with a new dict on every result, so an identity check says "unchanged" exactly. A
snapshot taken between rounds (a state change, an API or metrics read) then costs a lookup
per node, not a rendering of every path.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import anyio.lowlevel

from healthmesh.core.config import ProbingSettings
from healthmesh.core.membership import Membership
from healthmesh.core.model import Node, Snapshot
from healthmesh.core.state import StateStore, rfc3339

#: Nodes rendered between two chances for other tasks to run (``build_async``).
RENDER_CHUNK = 250

_UNREACHABLE = "unreachable"
_REACHABLE = "reachable"
_UNKNOWN = "unknown"


class _NodeEntry:
    """A node's rendered entry and what it was rendered from."""

    __slots__ = ("keys", "kinds", "local", "node", "out", "paths", "source", "state", "views")

    def __init__(
        self, node: Node, source: str | None, local: bool, kinds: tuple[str, ...],
        paths: list[Any], views: list[Any], out: dict[str, Any], state: str,
        keys: list[tuple[Any, str]] | None = None,
    ) -> None:
        self.node = node
        self.paths = paths
        #: (path key, kind) of each view, in order: built once per node, not per snapshot.
        self.keys = keys if keys is not None else [
            (path.key, kind) for path in paths for kind in kinds
        ]
        self.source = source
        self.local = local
        self.kinds = kinds
        self.views = views
        self.out = out
        self.state = state


class SnapshotBuilder:
    """Builds snapshots, re-rendering only the nodes that changed since the previous one.

    The node entries it returns are shared between snapshots: readers must not modify them
    (none does; the per-kind views were already shared the same way).
    """

    def __init__(self) -> None:
        self._nodes: dict[str, _NodeEntry] = {}
        self._host: bool | None = None
        self._endpoint: bool | None = None
        #: Nodes rendered afresh by the latest build (for tests and benchmarks).
        self.rendered = 0

    def build(self, *args: Any, **kwargs: Any) -> Snapshot:
        """The agent's current view (see ``steps`` for the arguments), built in one go."""
        steps = self.steps(*args, **kwargs)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    async def build_async(self, *args: Any, **kwargs: Any) -> Snapshot:
        """``build``, letting other tasks run after every ``RENDER_CHUNK`` nodes rendered.

        At the end of a round every node has new results: rendering 5,000 of them at once
        would hold the event loop for 100 ms or more, and the probes due meanwhile would
        start late. The entries are each consistent; the snapshot spans a few milliseconds.
        """
        steps = self.steps(*args, **kwargs)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            await anyio.lowlevel.checkpoint()

    def steps(
        self,
        membership: Membership,
        store: StateStore,
        kinds: list[str],
        probing: ProbingSettings,
        *,
        timestamp: float | None = None,
        components: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
        probed: set[str] | None = None,
    ) -> Generator[None, None, Snapshot]:
        """Build the agent's current view: every node, path and kind, with summary counts.

        A generator that yields after every ``RENDER_CHUNK`` nodes rendered afresh and
        returns the snapshot.

        ``components`` is the agent's component states (``ComponentHealth.listing()``).
        ``probed`` (a sampled mesh) limits the nodes to those ids: the nodes this agent probes.
        """
        host, endpoint = probing.host, probing.endpoint
        if (host, endpoint) != (self._host, self._endpoint):
            self._nodes.clear()
            self._host, self._endpoint = host, endpoint
        kinds_t = tuple(kinds)
        cache = self._nodes
        seen: dict[str, _NodeEntry] = {}
        nodes_out: list[dict[str, Any]] = []
        counts = {_REACHABLE: 0, _UNREACHABLE: 0, _UNKNOWN: 0}
        clusters: dict[str, dict[str, int]] = {}
        local_id = membership.local.id
        view = store.view
        rendered = 0
        for node in membership.nodes():
            nid = node.id
            if probed is not None and nid not in probed:
                continue
            source = membership.origin(nid)
            entry = cache.get(nid)
            if entry is not None and entry.node is node and entry.kinds == kinds_t:
                # The same node object: same paths; unchanged if every view is the same.
                keys = entry.keys
                views = [view(key, kind) for key, kind in keys]
                # List equality tries identity first: the same view dicts compare in one
                # step each (equal new ones would render the same entry anyway).
                fresh = entry.source != source or views != entry.views
                paths = entry.paths
            else:
                keys = None
                paths = membership.paths_of(node, host=host, endpoint=endpoint)
                views = [view(path.key, kind) for path in paths for kind in kinds_t]
                fresh = (
                    entry is None
                    or entry.node != node
                    # Not part of a Node's equality.
                    or entry.out["labels"] != node.labels
                    or entry.out["info"] != node.info
                    or entry.source != source
                    or entry.kinds != kinds_t
                    or len(entry.views) != len(views)
                    or any(a is not b for a, b in zip(entry.views, views))
                )
            if fresh:
                entry = _render(node, source, nid == local_id, kinds_t, paths, views, keys)
                rendered += 1
                if rendered % RENDER_CHUNK == 0:
                    yield
            else:
                assert entry is not None
                entry.node = node  # an equal node: keep the newest object
            seen[nid] = entry
            state = entry.state
            counts[state] += 1
            per = clusters.get(node.cluster)
            if per is None:
                per = clusters[node.cluster] = {
                    "nodes": 0, _REACHABLE: 0, _UNREACHABLE: 0, _UNKNOWN: 0,
                }
            per["nodes"] += 1
            per[state] += 1
            nodes_out.append(entry.out)
        self._nodes = seen  # nodes that left are dropped
        self.rendered = rendered
        data: dict[str, Any] = {
            "timestamp": rfc3339(timestamp or time.time()),
            "interval_s": float(probing.interval),
            "local": {"name": membership.local.name, "cluster": membership.local.cluster},
            "summary": {"nodes": len(nodes_out), **counts, "clusters": clusters},
            "nodes": nodes_out,
            "sources": {
                name: {"nodes": st.nodes, "stale": st.stale, "reason": st.reason}
                for name, st in membership.status.items()
            },
            "components": list(components or []),
        }
        if extra:
            data.update(extra)
        return Snapshot(data)


def _render(
    node: Node, source: str | None, local: bool, kinds: tuple[str, ...], paths: list[Any],
    views: list[Any], keys: list[tuple[Any, str]] | None = None,
) -> _NodeEntry:
    """One node's entry, from its paths and their per-kind views (in ``paths`` × ``kinds``)."""
    paths_out: list[dict[str, Any]] = []
    # The node's state, as core.state.combine: any unreachable part makes it unreachable,
    # all parts reachable make it reachable, anything else (or no part) is unknown.
    any_part = False
    all_reachable = True
    unreachable = False
    i = 0
    for path in paths:
        probes: dict[str, Any] = {}
        for kind in kinds:
            v = views[i]
            i += 1
            if v is None:
                continue
            probes[kind] = v
            any_part = True
            s = v["state"]
            if s != _REACHABLE:
                all_reachable = False
                if s == _UNREACHABLE:
                    unreachable = True
        paths_out.append(
            {
                "address": path.address,
                "role": path.role,
                "primary": path.primary,
                "probes": probes,
            }
        )
    if unreachable:
        state = _UNREACHABLE
    elif any_part and all_reachable:
        state = _REACHABLE
    else:
        state = _UNKNOWN
    out = {
        "name": node.name,
        "cluster": node.cluster,
        "state": state,
        "local": local,
        "source": source,
        "labels": dict(node.labels),
        "info": dict(node.info),
        "paths": paths_out,
    }
    return _NodeEntry(node, source, local, kinds, paths, views, out, state, keys)


def build_snapshot(
    membership: Membership,
    store: StateStore,
    kinds: list[str],
    probing: ProbingSettings,
    *,
    timestamp: float | None = None,
    components: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    probed: set[str] | None = None,
) -> Snapshot:
    """A snapshot rendered in full (no reuse): ``SnapshotBuilder.build`` of a fresh builder."""
    return SnapshotBuilder().build(
        membership, store, kinds, probing, timestamp=timestamp, components=components,
        extra=extra, probed=probed,
    )
