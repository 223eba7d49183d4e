"""Render a snapshot as cilium-health does: a header line and a Name/IP/Node/Endpoints table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from healthmesh.core.lazy import lazy_import
from healthmesh.core.units import format_duration

if TYPE_CHECKING:
    from rich.console import Group
    from rich.text import Text

#: rich, loaded when a table is first drawn (an agent with ``-o json`` never draws one).
_rich = lazy_import("rich", "console", "table", "text")

_STYLE = {"reachable": "green", "unreachable": "bold red", "unknown": "yellow"}


def header_line(snap: dict[str, Any]) -> str:
    """``Cluster health: R/N reachable (timestamp) (Probe interval: 30s)``.

    With nodes of more than one cluster, one more line per cluster follows the total.
    """
    s = snap["summary"]
    line = (
        f"Cluster health: {s['reachable']}/{s['nodes']} reachable "
        f"({snap['timestamp']}) (Probe interval: {format_duration(snap['interval_s'])})"
    )
    clusters = s.get("clusters") or {}
    if len(clusters) > 1:
        for name, c in sorted(clusters.items()):
            line += f"\n  Cluster {name}: {c['reachable']}/{c['nodes']} reachable"
    return line


def display_name(node: dict[str, Any]) -> str:
    """``cluster/node`` unless the cluster is ``default``."""
    return node["name"] if node["cluster"] == "default" else f"{node['cluster']}/{node['name']}"


def path_state(path: dict[str, Any]) -> str:
    """One path's state over all its probe kinds."""
    states = [p["state"] for p in path["probes"].values()]
    if any(s == "unreachable" for s in states):
        return "unreachable"
    if states and all(s == "reachable" for s in states):
        return "reachable"
    return "unknown"


def role_count(node: dict[str, Any], role: str) -> str:
    """``x/y`` reachable paths of one role, or ``-`` when the node has none."""
    paths = [p for p in node["paths"] if p["role"] == role]
    if not paths:
        return "-"
    ok = sum(1 for p in paths if path_state(p) == "reachable")
    return f"{ok}/{len(paths)}"


def primary_address(node: dict[str, Any]) -> str:
    for p in node["paths"]:
        if p["role"] == "host" and p["primary"]:
            return p["address"]
    return node["paths"][0]["address"] if node["paths"] else "-"


def kind_cell(node: dict[str, Any], kind: str) -> Text:
    """The primary host path's result for one kind: RTT when reachable, else the state."""
    for p in node["paths"]:
        if p["role"] == "host" and p["primary"]:
            r = p["probes"].get(kind)
            if r is None:
                return _rich.text.Text("-")
            if r["state"] == "reachable" and r.get("rtt_ms") is not None:
                return _rich.text.Text(f"{r['rtt_ms']:.3f}ms", style="green")
            return _rich.text.Text(r["state"], style=_STYLE[r["state"]])
    return _rich.text.Text("-")


def heartbeat_cell(node: dict[str, Any]) -> Text:
    """The agent heartbeat a membership source reported: alive, expired or unknown."""
    beat = (node.get("info") or {}).get("heartbeat")
    if beat is None:
        return _rich.text.Text("-")
    style = {"alive": "green", "expired": "bold red"}.get(beat, "yellow")
    return _rich.text.Text(str(beat), style=style)


def kinds_of(snap: dict[str, Any]) -> list[str]:
    kinds = snap.get("probe_kinds")
    if kinds:
        return list(kinds)
    seen: dict[str, None] = {}
    for node in snap["nodes"]:
        for p in node["paths"]:
            for k in p["probes"]:
                seen.setdefault(k, None)
    return list(seen)


def summary_table(snap: dict[str, Any]) -> Group:
    """The header line and the cilium-health-style table, with per-kind RTT columns."""
    table = _rich.table.Table(box=None, pad_edge=False)
    for col in ("Name", "IP", "Node", "Endpoints"):
        table.add_column(col)
    kinds = kinds_of(snap)
    for kind in kinds:
        table.add_column(kind, justify="right")
    heartbeats = any("heartbeat" in (n.get("info") or {}) for n in snap["nodes"])
    if heartbeats:
        table.add_column("Agent")
    table.add_column("State")
    for node in snap["nodes"]:
        name = display_name(node) + (" (localhost)" if node.get("local") else "")
        table.add_row(
            name,
            primary_address(node),
            role_count(node, "host"),
            role_count(node, "endpoint"),
            *(kind_cell(node, k) for k in kinds),
            *([heartbeat_cell(node)] if heartbeats else []),
            _rich.text.Text(node["state"], style=_STYLE[node["state"]]),
        )
    return _rich.console.Group(_rich.text.Text(header_line(snap)), table)
