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


# --- layer 1 (the agent's components) and layer 3 (service checks) ------------------------

_COMPONENT_STATES = {"ok": "Ok", "degraded": "Degraded", "failed": "Failed"}


def component_lines(snap: dict[str, Any]) -> list[str]:
    """``Responder:   Ok   0.0.0.0:4240``, one line per component, as ``cilium status``.

    Empty when the snapshot carries no ``components`` list (an older agent).
    """
    components = snap.get("components")
    if not isinstance(components, list) or not components:
        return []
    rows = []
    for c in components:
        if not isinstance(c, dict):
            continue
        name = str(c.get("name") or "?")
        label = (name[:1].upper() + name[1:]) + ":"
        state = str(c.get("state") or "unknown")
        text = _COMPONENT_STATES.get(state, state.capitalize())
        message = c.get("message")
        if message:
            text += f"   {message}"
        if state != "ok" and c.get("since"):
            text += f" (since {c['since']})"
        restarts = c.get("restarts")
        if isinstance(restarts, int) and restarts > 0:
            text += f" ({restarts} restart{'s' if restarts != 1 else ''})"
        rows.append((label, text))
    width = max((len(label) for label, _ in rows), default=0)
    return [f"{label:<{width}}   {text}" for label, text in rows]


def check_lines(snap: dict[str, Any], verbose: bool = False) -> list[str]:
    """The service checks: a count, then per check its state and per target its result.

    Empty when the snapshot has no checks (none configured, or an older agent).
    """
    checks = snap.get("checks")
    if not isinstance(checks, list) or not checks:
        return []
    ok = sum(1 for c in checks if c.get("state") == "ok")
    lines = [f"Checks: {ok}/{len(checks)} ok"]
    for c in checks:
        facts = [str(c.get("kind", "?"))]
        server = (c.get("details") or {}).get("server")
        if server:
            facts.append(f"server {server}")
        lines.append(f"  {c.get('name')} ({', '.join(facts)}): {c.get('state')}")
        if c.get("error"):
            lines.append(f"    {c['error']}")
        targets = c.get("targets") or []
        width = max((len(str(t.get("target", ""))) for t in targets), default=0)
        for t in targets:
            state = t.get("state", "unknown")
            if t.get("last_probed") is None:
                text = "not checked yet"
            elif state == "ok":
                text = rtt_text(t.get("rtt_ms"))
                extra = _target_facts(t)
                if extra:
                    text += f" ({extra})"
            else:
                text = t.get("error") or state
            lines.append(f"    {t.get('target', '?'):<{width}}  {state:<8} {text}")
            if verbose:
                stats = stats_line(t)
                if stats:
                    lines.append(f"    {'':<{width}}  {stats}")
    return lines


def _target_facts(t: dict[str, Any]) -> str:
    """A few kind-specific facts of a passing target: transport, status, certificate days."""
    parts = []
    if t.get("transport"):
        parts.append(str(t["transport"]))
    if t.get("status") is not None:
        parts.append(f"status {t['status']}")
    if t.get("tls_ms") is not None:
        parts.append(f"TLS {rtt_text(t['tls_ms'])}")
    if t.get("cert_expiry_days") is not None:
        parts.append(f"certificate expires in {t['cert_expiry_days']:.0f} days")
    return ", ".join(parts)


# --- the mesh matrix (``healthmesh mesh``) -------------------------------------------------

#: Above this many targets the matrix shows only the rows and columns with a failing cell.
COLLAPSE_ABOVE = 20
_CELL_MARK = {"reachable": "✔", "unreachable": "✘", "unknown": "?"}
_KIND_MARK = {"reachable": "✔", "unreachable": "✘", "partial": "~", "unknown": "?"}


def short_name(node_id: str) -> str:
    """``node`` for the default cluster, else ``cluster/node`` (as the status table)."""
    cluster, _, name = node_id.partition("/")
    return name if cluster == "default" else node_id


def _subject_text(subject: Any) -> str:
    if isinstance(subject, list):
        return " and ".join(short_name(str(s)) for s in subject)
    return short_name(str(subject))


def verdict_line(v: dict[str, Any]) -> str:
    """One verdict in plain words: what, who, why, how sure, since when."""
    kind, subject = v.get("kind"), v.get("subject")
    who = _subject_text(subject)
    pair = isinstance(subject, list) and len(subject) == 2
    a, b = (short_name(str(s)) for s in subject) if pair else (who, who)
    what = {
        "node-down": f"node {who} is down",
        "agent-down": f"the agent on {who} is down (the host still answers)",
        "observer-isolated": f"{who} is cut off: it reaches almost none of its peers",
        "link": f"the link between {who} is cut",
        "asymmetric": f"{a} cannot reach {b}, though {b} reaches {a}",
        "port-filtered": (f"port 4240 is filtered between {a} and {b}" if pair
                          else f"port 4240 (HTTP) is filtered on {who}"),
        "icmp-filtered": (f"ICMP is filtered between {a} and {b}" if pair
                          else f"ICMP is filtered on {who}"),
        "degraded": f"{who} is degraded",
    }.get(str(kind), f"{kind} {who}")
    conf = v.get("confidence")
    facts = [f"confidence {conf:.2f}" if isinstance(conf, (int, float)) else None]
    if v.get("since"):
        facts.append(f"since {v['since']}")
    tail = ", ".join(f for f in facts if f)
    return f"✘ {what} — {v.get('evidence', '')}" + (f" ({tail})" if tail else "")


def verdict_lines(matrix: dict[str, Any], only: str | None = None) -> list[str]:
    """``Verdicts:`` and one line each (those naming ``only`` when given); [] when none."""
    verdicts = matrix.get("verdicts") or []
    if only is not None:
        verdicts = [
            v for v in verdicts
            if only in (v["subject"] if isinstance(v.get("subject"), list) else [v.get("subject")])
        ]
    if not verdicts:
        return []
    title = "Mesh verdicts about this node:" if only is not None else "Verdicts:"
    return [title, *("  " + verdict_line(v) for v in verdicts)]


def cell_text(cell: dict[str, Any] | None) -> str:
    """✔ / ✘ / ? per cell, ``partial`` with the failing kinds when the kinds disagree."""
    if cell is None:
        return "?"
    state = cell.get("state", "unknown")
    if state in _CELL_MARK:
        return _CELL_MARK[state]
    kinds = cell.get("kinds") or {}
    bad = [f"{k}{_KIND_MARK.get(s, '?')}" for k, s in sorted(kinds.items()) if s != "reachable"]
    return "partial " + ",".join(bad) if bad else "partial"


def mesh_faulty(matrix: dict[str, Any]) -> bool:
    """Any verdict, or any cell neither reachable nor unknown."""
    if matrix.get("verdicts"):
        return True
    return any(
        c.get("state") in ("unreachable", "degraded")
        for o, row in (matrix.get("cells") or {}).items()
        for t, c in row.items()
        if o != t
    )


def mesh_lines(matrix: dict[str, Any], collapse_above: int = COLLAPSE_ABOVE) -> list[str]:
    """The verdicts, then the observers × targets matrix (collapsed when large)."""
    observers: list[str] = list(matrix.get("observers") or [])
    targets: list[str] = list(matrix.get("targets") or [])
    cells: dict[str, dict[str, Any]] = matrix.get("cells") or {}
    lines = verdict_lines(matrix) or ["Verdicts: none, the mesh is healthy"]
    lines.append("")
    scope = ("local only: no rows shared through etcd, this agent's own row alone"
             if matrix.get("local_only") else "rows shared through etcd")
    lines.append(f"Mesh: {len(observers)} observers × {len(targets)} targets "
                 f"({matrix.get('timestamp')}; {scope})")

    def bad(o: str, t: str) -> bool:
        c = cells.get(o, {}).get(t)
        return o != t and c is not None and c.get("state") in ("unreachable", "degraded")

    rows, cols = observers, targets
    hidden = ""
    if len(targets) > collapse_above:
        rows = [o for o in observers if any(bad(o, t) for t in targets)]
        cols = [t for t in targets if any(bad(o, t) for o in observers)]
        hidden = (f"(collapsed: showing the {len(rows)} observers and {len(cols)} targets with "
                  f"a failing cell; every other cell is reachable or unknown)")
        if not rows:
            lines.append(f"  every one of the {len(observers)}×{len(targets)} cells is "
                         "reachable or not yet known")
            return lines
    texts = {(o, t): ("·" if o == t else cell_text(cells.get(o, {}).get(t)))
             for o in rows for t in cols}
    widths = [max(len(short_name(t)), *(len(texts[o, t]) for o in rows)) for t in cols]
    first = max([len("observer ↓ target →"), *(len(short_name(o)) for o in rows)])
    head = "observer ↓ target →".ljust(first)
    lines.append("  " + "  ".join([head, *(short_name(t).ljust(w) for t, w in zip(cols, widths))])
                 .rstrip())
    for o in rows:
        row = [short_name(o).ljust(first),
               *(texts[o, t].ljust(w) for t, w in zip(cols, widths))]
        lines.append(("  " + "  ".join(row)).rstrip())
    if hidden:
        lines.append("  " + hidden)
    lines.append("  ✔ reachable  ✘ unreachable  partial: some kinds fail (✘) or work on some "
                 "paths only (~)  ? unknown  · itself")
    return lines
