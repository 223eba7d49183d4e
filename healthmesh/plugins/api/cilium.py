"""The snapshot in Cilium's health model (/v1beta): Go durations, nanoseconds, ``cluster/node``.

Field names, types and meanings follow Cilium's api/v1/health/openapi.yaml, so that tooling
written for ``cilium-health`` reads healthmesh's answers unchanged.
"""

from __future__ import annotations

import os
import time
from typing import Any

from healthmesh import format_duration

#: Our probe kinds that Cilium's PathStatus has a field for; other kinds appear only in /v1.
CILIUM_KINDS = ("icmp", "http")


def node_name(node: dict[str, Any]) -> str:
    """``cluster/node`` unless the cluster is ``default``, as Cilium names nodes."""
    return node["name"] if node["cluster"] == "default" else f"{node['cluster']}/{node['name']}"


def connectivity(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """One kind's result as a ConnectivityStatus; None when the path was never probed.

    ``status`` follows the path's state (failure threshold applied), not the last probe
    alone: empty when reachable, else the last error. ``latency`` is integer nanoseconds.
    """
    if entry is None or entry.get("last_probed") is None:
        return None
    state = entry["state"]
    out: dict[str, Any] = {}
    if state == "reachable":
        # The last probe may have failed below the threshold; then the median stands in.
        rtt = entry.get("rtt_ms")
        if rtt is None:
            rtt = entry.get("p50_ms")
        out["latency"] = round(rtt * 1_000_000) if rtt is not None else 0
        out["status"] = ""
    else:
        out["latency"] = 0
        out["status"] = entry.get("error") or state
    out["lastProbed"] = entry["last_probed"]
    return out


def path_status(path: dict[str, Any]) -> dict[str, Any]:
    """A snapshot path as a PathStatus: ``{ip, icmp, http}``."""
    out: dict[str, Any] = {"ip": path["address"]}
    probes = path["probes"]
    for kind in CILIUM_KINDS:
        status = connectivity(probes.get(kind))
        if status is not None:
            out[kind] = status
    return out


def role_status(paths: list[dict[str, Any]]) -> dict[str, Any]:
    """The paths of one role as a HostStatus / EndpointStatus."""
    primary = next((p for p in paths if p["primary"]), paths[0])
    return {
        "primary-address": path_status(primary),
        "secondary-addresses": [path_status(p) for p in paths if p is not primary],
    }


def node_status(node: dict[str, Any]) -> dict[str, Any]:
    """A snapshot node as a NodeStatus."""
    out: dict[str, Any] = {"name": node_name(node)}
    host = [p for p in node["paths"] if p["role"] == "host"]
    endpoint = [p for p in node["paths"] if p["role"] == "endpoint"]
    if host:
        out["host"] = role_status(host)
    if endpoint:
        out["health-endpoint"] = role_status(endpoint)
        # Deprecated in Cilium but still read by older tooling: the primary endpoint path.
        out["endpoint"] = out["health-endpoint"]["primary-address"]
    return out


def status_response(snap: dict[str, Any]) -> dict[str, Any]:
    """The snapshot as a HealthStatusResponse (``GET /v1beta/status``)."""
    local = snap["local"]
    return {
        "timestamp": snap["timestamp"],
        "probeInterval": format_duration(snap["interval_s"]),
        "local": {"name": node_name(local)},
        "nodes": [node_status(n) for n in snap["nodes"]],
    }


def health_response(started_at: float, now: float | None = None) -> dict[str, Any]:
    """A HealthResponse (``GET /v1beta/healthz``): uptime and the system load."""
    uptime = max(0, int((time.time() if now is None else now) - started_at))
    return {"uptime": format_duration(uptime), "system-load": system_load()}


def system_load() -> dict[str, str]:
    """The load averages as /proc/loadavg prints them (a LoadResponse)."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            fields = f.read().split()[:3]
    except OSError:
        fields = [f"{v:.2f}" for v in os.getloadavg()]
    return dict(zip(("last1min", "last5min", "last15min"), fields))


def node_ok(status: dict[str, Any]) -> bool:
    """Whether a NodeStatus shows every probed path answering (for ``status`` exit codes)."""
    seen = False
    for role in ("host", "health-endpoint"):
        rs = status.get(role)
        if not rs:
            continue
        for path in [rs.get("primary-address"), *rs.get("secondary-addresses", [])]:
            for kind in CILIUM_KINDS:
                c = (path or {}).get(kind)
                if c is None:
                    continue
                seen = True
                if c.get("status"):
                    return False
    return seen
