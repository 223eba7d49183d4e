"""The mesh document the page shows: the agent's own (issue 14's contract) or the local row.

``local_mesh`` builds the contract's shape from one snapshot when the agent offers no
``mesh()``: one observer (this node), every node a target, no verdicts, ``local_only``.
``compact`` turns either into the page's compact matrix: one string of state letters and
one list of RTTs per observer, so that a 1,000 × 1,000 mesh is a few megabytes rather than
the contract's hundred.
"""

from __future__ import annotations

from typing import Any

#: State letters of the compact matrix.
LETTERS = {"reachable": "r", "unreachable": "u", "degraded": "d", "unknown": "?"}
#: Verdict keys and cell keys passed to the page (anything else a mesh adds is not shown).
VERDICT_KEYS = ("kind", "subject", "confidence", "evidence", "since")


def node_name(cluster: Any, name: Any) -> str:
    """``cluster/name``, as the mesh contract names nodes."""
    return f"{cluster or 'default'}/{name}"


def local_mesh(data: dict[str, Any]) -> dict[str, Any]:
    """The mesh contract's shape from a snapshot: the local node's row only."""
    local = data.get("local") or {}
    observer = node_name(local.get("cluster"), local.get("name", "?"))
    targets: list[str] = []
    row: dict[str, Any] = {}
    for node in data.get("nodes", ()):
        target = node_name(node.get("cluster"), node.get("name"))
        targets.append(target)
        row[target] = cell_of(node)
    return {
        "timestamp": data.get("timestamp"),
        "observers": [observer],
        "targets": targets,
        "cells": {observer: row},
        "verdicts": [],
        "local_only": True,
    }


def cell_of(node: dict[str, Any]) -> dict[str, Any]:
    """One cell from a snapshot node: per-kind states over its paths, the primary's RTT.

    A kind is unreachable when any path of it is; the cell is unreachable when no kind is
    reachable and one is not, degraded when kinds disagree (ICMP answers, HTTP does not).
    """
    per_kind: dict[str, set[str]] = {}
    rtt: float | None = None
    loss: float | None = None
    for path in node.get("paths", ()):
        for kind, view in (path.get("probes") or {}).items():
            per_kind.setdefault(kind, set()).add(str(view.get("state", "unknown")))
            if path.get("primary") and path.get("role") == "host":
                r = view.get("rtt_ms")
                if isinstance(r, (int, float)) and (rtt is None or kind == "icmp"):
                    rtt = float(r)
                lp = view.get("loss_pct")
                if isinstance(lp, (int, float)):
                    loss = max(loss or 0.0, float(lp))
    kinds = {kind: _worst(seen) for kind, seen in per_kind.items()}
    states = set(kinds.values())
    if not states or states == {"unknown"}:
        state = "unknown"
    elif states == {"reachable"}:
        state = "reachable"
    elif "reachable" in states:
        state = "degraded"
    elif "unreachable" in states:
        state = "unreachable"
    else:
        state = "unknown"
    return {"state": state, "kinds": kinds, "rtt_ms": rtt, "loss_pct": loss}


def _worst(states: set[str]) -> str:
    if "unreachable" in states:
        return "unreachable"
    return "reachable" if states == {"reachable"} else "unknown"


def compact(mesh: dict[str, Any]) -> dict[str, Any]:
    """The page's matrix: ``rows[i][j]`` is observer i's state letter for target j.

    Written for 1,000 × 1,000 (a million cells): comprehensions over each row, no call
    per cell beyond ``dict.get``. RTT and loss are passed on as the mesh gives them (numbers
    or null, by its contract); anything else becomes null.
    """
    observers = [str(o) for o in mesh.get("observers") or ()]
    targets = [str(t) for t in mesh.get("targets") or ()]
    cells = mesh.get("cells") or {}
    letters = LETTERS
    rows: list[str] = []
    rtts: list[list[Any]] = []
    losses: list[list[Any]] = []
    empty: dict[str, Any] = {}
    for obs in observers:
        row = cells.get(obs)
        get = row.get if isinstance(row, dict) else empty.get
        found = [get(t) for t in targets]
        row_cells = [c if type(c) is dict else None for c in found]
        rows.append("".join([
            "-" if c is None else letters.get(c.get("state"), "?") for c in row_cells
        ]))
        rtts.append([_number(c.get("rtt_ms")) if c is not None else None for c in row_cells])
        losses.append([_number(c.get("loss_pct")) if c is not None else None
                       for c in row_cells])
    verdicts = [
        {k: v.get(k) for k in VERDICT_KEYS}
        for v in mesh.get("verdicts") or ()
        if isinstance(v, dict)
    ]
    return {
        "timestamp": mesh.get("timestamp"),
        "observers": observers,
        "targets": targets,
        "rows": rows,
        "rtt_ms": rtts,
        "loss_pct": losses,
        "verdicts": verdicts,
        "local_only": bool(mesh.get("local_only", False)),
    }


def _number(value: Any) -> Any:
    t = type(value)
    return value if t is float or t is int else None


def cell(mesh: dict[str, Any], observer: str, target: str) -> dict[str, Any] | None:
    """One cell of the contract, or None."""
    row = (mesh.get("cells") or {}).get(observer)
    found = row.get(target) if isinstance(row, dict) else None
    return found if isinstance(found, dict) else None
