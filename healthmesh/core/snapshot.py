"""Build the JSON snapshot (docs/snapshot.schema.json) from the membership and path states."""

from __future__ import annotations

import time
from typing import Any

from healthmesh.core.config import ProbingSettings
from healthmesh.core.membership import Membership
from healthmesh.core.model import PathState, Snapshot
from healthmesh.core.state import StateStore, combine, rfc3339


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
    """The agent's current view: every node, path and kind, with summary counts.

    ``components`` is the agent's component states (``ComponentHealth.listing()``).
    ``probed`` (a sampled mesh) limits the nodes to those ids: the nodes this agent probes.
    """
    nodes_out: list[dict[str, Any]] = []
    counts = {"reachable": 0, "unreachable": 0, "unknown": 0}
    clusters: dict[str, dict[str, int]] = {}
    local_id = membership.local.id
    for node in membership.nodes():
        if probed is not None and node.id not in probed:
            continue
        paths_out: list[dict[str, Any]] = []
        states: list[PathState] = []
        for path in membership.paths_of(node, host=probing.host, endpoint=probing.endpoint):
            probes: dict[str, Any] = {}
            for kind in kinds:
                view = store.view(path.key, kind)
                if view is None:
                    continue
                probes[kind] = view
                states.append(PathState(view["state"]))
            paths_out.append(
                {
                    "address": path.address,
                    "role": path.role,
                    "primary": path.primary,
                    "probes": probes,
                }
            )
        state = combine(states)
        counts[state.value] += 1
        per = clusters.setdefault(
            node.cluster, {"nodes": 0, "reachable": 0, "unreachable": 0, "unknown": 0}
        )
        per["nodes"] += 1
        per[state.value] += 1
        nodes_out.append(
            {
                "name": node.name,
                "cluster": node.cluster,
                "state": state.value,
                "local": node.id == local_id,
                "source": membership.origin(node.id),
                "labels": dict(node.labels),
                "info": dict(node.info),
                "paths": paths_out,
            }
        )
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
