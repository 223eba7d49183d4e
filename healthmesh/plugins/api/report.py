"""Text views of a snapshot for ``healthmesh status``: verbose (per path) and succinct."""

from __future__ import annotations

from typing import Any

from healthmesh import format_duration, header_line

#: How cilium-health labels its two probe kinds; other kinds are shown by name.
KIND_LABELS = {"icmp": "ICMP to stack", "http": "HTTP to agent"}
ROLE_LABELS = {"host": "Host", "endpoint": "Endpoint"}


def display_name(node: dict[str, Any]) -> str:
    """``cluster/node`` unless the cluster is ``default``; ``(localhost)`` for this node."""
    name = node["name"] if node["cluster"] == "default" else f"{node['cluster']}/{node['name']}"
    return name + (" (localhost)" if node.get("local") else "")


def rtt_text(ms: float | None) -> str:
    """Milliseconds as Go prints a duration: ``412µs``, ``1.2ms``."""
    return "-" if ms is None else format_duration(round(ms / 1000.0, 9))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}".rstrip("0").rstrip(".")


def result_line(kind: str, entry: dict[str, Any]) -> str:
    """``ICMP to stack:   OK, RTT=412µs (Last probed: ...)``."""
    label = f"{KIND_LABELS.get(kind, kind.upper())}:"
    state = entry["state"]
    if entry.get("last_probed") is None:
        text = "not probed yet"
    elif state == "reachable":
        rtt = entry.get("rtt_ms")
        text = f"OK, RTT={rtt_text(rtt if rtt is not None else entry.get('p50_ms'))}"
        if entry.get("error"):
            text += f" (last probe failed: {entry['error']})"
    else:
        text = f"{state}: {entry.get('error') or 'no answer'}"
    probed = entry.get("last_probed")
    return f"{label:<17}{text}" + (f" (Last probed: {probed})" if probed else "")


def stats_line(entry: dict[str, Any]) -> str | None:
    """The rolling statistics of one path and kind, or None before any sample."""
    samples = entry.get("samples") or 0
    if not samples:
        return None
    parts = []
    if entry.get("min_ms") is not None:
        parts.append(
            "min/avg/p50/p95/max "
            + "/".join(_num(entry.get(k)) for k in ("min_ms", "avg_ms", "p50_ms", "p95_ms",
                                                  "max_ms"))
            + " ms"
        )
    parts.append(f"loss {_num(entry.get('loss_pct'))}% of {samples}")
    failures = entry.get("consecutive_failures") or 0
    if failures:
        parts.append(f"{failures} consecutive failure{'s' if failures != 1 else ''}")
    if entry.get("last_change"):
        parts.append(f"{entry['state']} since {entry['last_change']}")
    return ", ".join(parts)


def verbose_lines(snap: dict[str, Any]) -> list[str]:
    """Per node and path, every kind's result and statistics (``status --verbose``)."""
    lines = [header_line(snap), "Nodes:"]
    for node in snap["nodes"]:
        lines.append(f"  {display_name(node)}: {node['state']}")
        if not node["paths"]:
            lines.append("    (no paths to probe)")
        for path in node["paths"]:
            secondary = "" if path["primary"] else " (secondary)"
            lines.append(
                f"    {ROLE_LABELS.get(path['role'], path['role'])} connectivity to "
                f"{path['address']}{secondary}:"
            )
            if not path["probes"]:
                lines.append("      (no probe kind applies)")
            for kind, entry in path["probes"].items():
                lines.append("      " + result_line(kind, entry))
                stats = stats_line(entry)
                if stats:
                    lines.append("      " + " " * 17 + stats)
    return lines


def _first_error(node: dict[str, Any]) -> str | None:
    for path in node["paths"]:
        for kind, entry in path["probes"].items():
            if entry["state"] != "reachable" and entry.get("error"):
                return f"{kind} {path['address']}: {entry['error']}"
    return None


def _count(node: dict[str, Any], role: str) -> str:
    paths = [p for p in node["paths"] if p["role"] == role]
    if not paths:
        return "-"
    ok = sum(
        1
        for p in paths
        if p["probes"] and all(e["state"] == "reachable" for e in p["probes"].values())
    )
    return f"{ok}/{len(paths)}"


def succinct_lines(snap: dict[str, Any]) -> list[str]:
    """One line per node: name, primary IP, state, reachable paths, first error."""
    rows = []
    for node in snap["nodes"]:
        primary = next(
            (p["address"] for p in node["paths"] if p["role"] == "host" and p["primary"]),
            node["paths"][0]["address"] if node["paths"] else "-",
        )
        error = _first_error(node) if node["state"] != "reachable" else None
        rows.append(
            [display_name(node), primary, node["state"], f"node {_count(node, 'host')}",
             f"endpoints {_count(node, 'endpoint')}", error or ""]
        )
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(5)]
    lines = [header_line(snap)]
    for r in rows:
        cells = [r[i].ljust(widths[i]) for i in range(5)]
        lines.append(("  " + "  ".join(cells) + ("  " + r[5] if r[5] else "")).rstrip())
    return lines
