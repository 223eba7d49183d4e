"""Custom Prometheus collectors: read the agent's telemetry and last snapshot at scrape time.

Nothing here runs per probe: the core keeps plain counters (``AgentContext.telemetry``) and
hands over snapshots; a scrape turns them into metric families. Series per peer exist only
with ``per_peer = true``, for at most ``max_peers`` peers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from loguru import logger
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from healthmesh import AgentContext, PathState, Snapshot, Telemetry, __version__

STATES = ("reachable", "unreachable", "unknown")
#: Cilium's ``type`` label per path role, and its ``protocol`` label per probe kind.
CILIUM_TYPE = {"host": "node", "endpoint": "endpoint"}
CILIUM_PROTOCOLS = ("icmp", "http")
#: A cut of per-peer series is logged again at most this often.
CAP_WARNING_EVERY = 600.0


def _combine(states: list[str]) -> str:
    if "unreachable" in states:
        return "unreachable"
    if states and all(s == "reachable" for s in states):
        return "reachable"
    return "unknown"


class SnapshotCounts:
    """Counts derived from one snapshot (computed once per snapshot, not per scrape)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.clusters: dict[str, dict[str, int]] = {}
        summary = data.get("summary", {})
        clusters = summary.get("clusters")
        if isinstance(clusters, dict):
            for name, per in clusters.items():
                self.clusters[name] = {s: int(per.get(s, 0)) for s in STATES}
        else:
            for node in data.get("nodes", []):
                per = self.clusters.setdefault(node["cluster"], dict.fromkeys(STATES, 0))
                per[node["state"]] += 1
        self._cilium: dict[str, dict[str, int]] | None = None
        self.data = data

    def cilium(self) -> dict[str, dict[str, int]]:
        """Cilium's status gauge: per type (node/endpoint), how many nodes are in each state."""
        if self._cilium is None:
            out = {t: dict.fromkeys(STATES, 0) for t in ("node", "endpoint")}
            for node in self.data.get("nodes", []):
                by_role: dict[str, list[str]] = {}
                for path in node.get("paths", []):
                    states = by_role.setdefault(path["role"], [])
                    states.extend(p["state"] for p in path["probes"].values())
                for role, states in by_role.items():
                    ctype = CILIUM_TYPE.get(role)
                    if ctype is not None:
                        out[ctype][_combine(states)] += 1
            self._cilium = out
        return self._cilium


class HealthmeshCollector(Collector):
    """Every ``healthmesh_*`` (and, when asked, ``cilium_*``) series of one agent."""

    def __init__(
        self,
        context: AgentContext,
        snapshot: Callable[[], Snapshot],
        *,
        per_peer: bool,
        max_peers: int,
        cilium: bool,
    ) -> None:
        self.context = context
        self.snapshot = snapshot
        self.per_peer = per_peer
        self.max_peers = max_peers
        self.cilium = cilium
        self._counts: tuple[int, SnapshotCounts] | None = None
        self._warned: tuple[float, int] = (0.0, 0)
        #: How long the previous scrape took to render (set by the output).
        self.render_seconds = 0.0
        #: CPU time spent rendering scrapes so far (set by the output).
        self.render_cpu_seconds = 0.0

    def _snapshot_counts(self) -> SnapshotCounts:
        snap = self.snapshot()
        if self._counts is None or self._counts[0] != id(snap.data):
            self._counts = (id(snap.data), SnapshotCounts(snap.data))
        return self._counts[1]

    def collect(self) -> Iterator[Any]:
        t: Telemetry = self.context.telemetry
        counts = self._snapshot_counts()
        data = counts.data
        local = self.context.local_node
        yield InfoMetricFamily(
            "healthmesh_agent",
            "The agent's version, node and cluster (always 1).",
            value={"version": __version__, "node": local.name, "cluster": local.cluster},
        )
        nodes = GaugeMetricFamily(
            "healthmesh_nodes",
            "Nodes (the local one included) per cluster and reachability state.",
            labels=["cluster", "state"],
        )
        for cluster, per in sorted(counts.clusters.items()):
            for state in STATES:
                nodes.add_metric([cluster, state], per.get(state, 0))
        yield nodes
        yield from self._kind_series(t)
        yield from self._agent_series(t, data)
        if self.per_peer:
            yield from self._peer_series(data)
        if self.cilium:
            yield from self._cilium_series(t, counts)

    def _kind_series(self, t: Telemetry) -> Iterator[Any]:
        paths = GaugeMetricFamily(
            "healthmesh_paths",
            "Tracked paths per probe kind, role and reachability state.",
            labels=["kind", "role", "state"],
        )
        rtt = HistogramMetricFamily(
            "healthmesh_probe_duration_seconds",
            "Round-trip times of successful probes per kind and path role.",
            labels=["kind", "role"],
        )
        probes = CounterMetricFamily(
            "healthmesh_probes", "Probe results per kind and result.", labels=["kind", "result"]
        )
        changes = CounterMetricFamily(
            "healthmesh_state_changes",
            "Changes of a path's reachability state per probe kind.",
            labels=["kind"],
        )
        per_kind: dict[str, list[int]] = {}
        for (kind, role), cell in sorted(t.cells.items()):
            for state in PathState:
                paths.add_metric([kind, role, state.value], cell.paths[state])
            rtt.add_metric([kind, role], cell.rtt.cumulative(), cell.rtt.sum)
            acc = per_kind.setdefault(kind, [0, 0, 0])
            acc[0] += cell.successes
            acc[1] += cell.failures
            acc[2] += cell.changes
        for kind, (ok, failed, changed) in per_kind.items():
            probes.add_metric([kind, "success"], ok)
            probes.add_metric([kind, "failure"], failed)
            changes.add_metric([kind], changed)
        yield from (paths, rtt, probes, changes)

    def _agent_series(self, t: Telemetry, data: dict[str, Any]) -> Iterator[Any]:
        rounds = HistogramMetricFamily(
            "healthmesh_round_duration_seconds",
            "Time from a round's start until every probe it started has a result.",
        )
        rounds.add_metric([], t.rounds.cumulative(), t.rounds.sum)
        yield rounds
        last = GaugeMetricFamily(
            "healthmesh_last_round_timestamp_seconds",
            "When the last round completed (seconds since the epoch; 0 before the first).",
        )
        last.add_metric([], t.last_round_at)
        yield last
        interval = GaugeMetricFamily(
            "healthmesh_probe_interval_seconds", "Each path is probed once per this interval."
        )
        interval.add_metric([], float(data.get("interval_s") or 0.0))
        yield interval
        lag = HistogramMetricFamily(
            "healthmesh_scheduler_lag_seconds",
            "How late the scheduler started due probes (per wake-up).",
        )
        lag.add_metric([], t.lag.cumulative(), t.lag.sum)
        yield lag
        peers = GaugeMetricFamily(
            "healthmesh_peers", "Nodes each peer source provides.", labels=["source"]
        )
        stale = GaugeMetricFamily(
            "healthmesh_source_stale",
            "1 when a peer source cannot refresh and its last nodes are kept.",
            labels=["source"],
        )
        for name, src in sorted((data.get("sources") or {}).items()):
            peers.add_metric([name], int(src.get("nodes", 0)))
            stale.add_metric([name], 1 if src.get("stale") else 0)
        yield peers
        yield stale
        responses = CounterMetricFamily(
            "healthmesh_responder_requests",
            "Requests the 4240 responder answered, per status code.",
            labels=["code"],
        )
        for code, count in sorted(t.responses.items()):
            responses.add_metric([str(code)], count)
        yield responses
        yield from self._component_series()
        render = GaugeMetricFamily(
            "healthmesh_scrape_render_seconds",
            "How long rendering the previous scrape of this endpoint took in the agent.",
        )
        render.add_metric([], self.render_seconds)
        yield render
        render_cpu = CounterMetricFamily(
            "healthmesh_scrape_render_cpu_seconds",
            "CPU time the agent spent rendering scrapes of this endpoint (previous ones).",
        )
        render_cpu.add_metric([], self.render_cpu_seconds)
        yield render_cpu

    def _component_series(self) -> Iterator[Any]:
        # Component states come from AgentContext.components() where the agent has it;
        # read defensively, an agent without it exports empty families.
        state = GaugeMetricFamily(
            "healthmesh_component_state",
            "1 for each component's current state (source, output, service, probe).",
            labels=["component", "state"],
        )
        restarts = CounterMetricFamily(
            "healthmesh_component_restarts",
            "Restarts of each component after a failure.",
            labels=["component"],
        )
        components = getattr(self.context, "components", None)
        listing: Any = []
        if callable(components):
            try:
                listing = components()
            except Exception as exc:  # a scrape must not fail on the agent's bookkeeping
                logger.debug("metrics: components() failed: {}", exc)
        for item in listing if isinstance(listing, list) else []:
            if not isinstance(item, dict) or "name" not in item:
                continue
            name = str(item["name"])
            state.add_metric([name, str(item.get("state", "unknown"))], 1)
            try:
                restarts.add_metric([name], int(item.get("restarts") or 0))
            except (TypeError, ValueError):
                continue
        yield state
        yield restarts

    def _peer_series(self, data: dict[str, Any]) -> Iterator[Any]:
        rtt = GaugeMetricFamily(
            "healthmesh_peer_rtt_seconds",
            "Last round-trip time to a peer's primary path of a role, per probe kind.",
            labels=["peer", "cluster", "kind", "role"],
        )
        reach = GaugeMetricFamily(
            "healthmesh_peer_reachable",
            "1 when a peer's paths of a role are reachable by a probe kind, 0 when not.",
            labels=["peer", "cluster", "kind", "role"],
        )
        nodes = data.get("nodes", [])
        if len(nodes) > self.max_peers:
            self._warn_cap(len(nodes))
        for node in nodes[: self.max_peers]:
            peer, cluster = node["name"], node["cluster"]
            states: dict[tuple[str, str], list[str]] = {}
            for path in node.get("paths", []):
                role = path["role"]
                for kind, view in path["probes"].items():
                    states.setdefault((kind, role), []).append(view["state"])
                    if path.get("primary") and view.get("rtt_ms") is not None:
                        rtt.add_metric([peer, cluster, kind, role], view["rtt_ms"] / 1000.0)
            for (kind, role), seen in states.items():
                combined = _combine(seen)
                if combined != "unknown":
                    reach.add_metric([peer, cluster, kind, role], combined == "reachable")
        yield rtt
        yield reach

    def _warn_cap(self, total: int) -> None:
        when, count = self._warned
        now = time.monotonic()
        if total > count or now - when > CAP_WARNING_EVERY:
            logger.warning(
                "metrics: per-peer series for the first {} of {} nodes only (max_peers = {})",
                self.max_peers,
                total,
                self.max_peers,
            )
            self._warned = (now, total)

    def _cilium_series(self, t: Telemetry, counts: SnapshotCounts) -> Iterator[Any]:
        local = self.context.local_node
        source = [local.cluster, local.name]
        status = GaugeMetricFamily(
            "cilium_node_health_connectivity_status",
            "Number of nodes whose last observed node (or health-endpoint) connectivity "
            "is in this state (Cilium-compatible).",
            labels=["source_cluster", "source_node_name", "type", "status"],
        )
        for ctype, per in counts.cilium().items():
            for state in STATES:
                status.add_metric([*source, ctype, state], per[state])
        yield status
        latency = HistogramMetricFamily(
            "cilium_node_health_connectivity_latency_seconds",
            "Latency of node and health-endpoint probes; a failed probe counts as the "
            "probe timeout (Cilium-compatible).",
            labels=["source_cluster", "source_node_name", "type", "address_type", "protocol"],
        )
        for (role, kind, primary), hist in sorted(t.cilium.items()):
            ctype = CILIUM_TYPE.get(role)
            if ctype is None or kind not in CILIUM_PROTOCOLS:
                continue
            address_type = "primary" if primary else "secondary"
            latency.add_metric(
                [*source, ctype, address_type, kind], hist.cumulative(), hist.sum
            )
        yield latency
