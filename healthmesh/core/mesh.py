"""The mesh matrix (observers × targets) and the verdict rules that name a fault's culprit.

Pure functions, no I/O: a *row* is one observer's view of every target (built here from the
local snapshot, or handed in by a plugin that reads other agents' rows from a shared store);
``assemble`` puts rows into the JSON contract of docs/mesh.schema.json and ``verdicts``
classifies what fails. docs/mesh.md explains the rules and their blind spots.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Mapping
from typing import Any

from healthmesh.core.state import rfc3339

Json = dict[str, Any]

REACHABLE, UNREACHABLE, DEGRADED, UNKNOWN = "reachable", "unreachable", "degraded", "unknown"
#: A kind's state over a target's host paths when they disagree (IPv4 fine, IPv6 not).
PARTIAL = "partial"
KIND_STATES = (REACHABLE, UNREACHABLE, PARTIAL, UNKNOWN)
VERDICT_KINDS = (
    "node-down", "agent-down", "observer-isolated", "link", "port-filtered",
    "icmp-filtered", "asymmetric", "degraded",
)  # fmt: skip

#: Loss (percent) a target must show before it can be called degraded, whatever the mesh's
#: usual; and how many times the usual it must be (docs/mesh.md, "degraded").
LOSS_MIN_PCT = 12.0
LOSS_FACTOR = 3.0
#: ... and this many points above it: a host's own random drops show in all of its cells at
#: once (they are correlated), so a small usual loss needs a clear margin (docs/mesh.md).
LOSS_MARGIN = 12.0
#: The same for RTT: at least this many ms, and this many times the mesh's median.
RTT_MIN_MS = 20.0
RTT_FACTOR = 5.0
RTT_MARGIN = 10.0
#: "Most targets": an observer failing to more than this share of them is isolated.
ISOLATED_SHARE = 0.5
#: Up to this many targets, the mesh's usual loss/RTT is taken without the suspect's cells.
EXCLUDE_UP_TO = 64

HTTP, ICMP = "http", "icmp"


# -- rows ------------------------------------------------------------------------------------


def kind_state(states: Iterable[str]) -> str:
    """One kind's state over several paths: unknown ones ignored, a mix is ``partial``."""
    known = {s for s in states if s != UNKNOWN}
    if not known:
        return UNKNOWN
    if known == {REACHABLE}:
        return REACHABLE
    if known == {UNREACHABLE}:
        return UNREACHABLE
    return PARTIAL


def cell_state(kinds: Mapping[str, str]) -> str:
    """A cell's state from its kinds: all fail → unreachable, all work → reachable, else
    degraded (the kinds disagree, or a kind works on some paths only)."""
    known = [s for s in kinds.values() if s != UNKNOWN]
    if not known:
        return UNKNOWN
    if all(s == REACHABLE for s in known):
        return REACHABLE
    if all(s == UNREACHABLE for s in known):
        return UNREACHABLE
    return DEGRADED


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def row_from_snapshot(data: Mapping[str, Any]) -> Json:
    """The local agent's row from its snapshot: one cell per node, over its host paths.

    A row is ``{"observer": "c/n", "timestamp": epoch, "cells": {"c/t": cell}}``; a cell is
    ``{"state", "kinds": {kind: state}, "rtt_ms", "loss_pct", "since"}`` (``since`` epoch
    seconds of the latest change of any of its kinds, or None). Host paths only: the
    matrix is about nodes; a node probed only through its health endpoint uses those.
    RTT is the p50 of the primary path (ICMP when probed, else HTTP); loss the mean over
    the paths of the same kind.
    """
    local = data.get("local") or {}
    observer = f"{local.get('cluster', 'default')}/{local.get('name', '?')}"
    cells: dict[str, Json] = {}
    for node in data.get("nodes", []):
        target = f"{node['cluster']}/{node['name']}"
        paths = [p for p in node.get("paths", []) if p.get("role") == "host"] or list(
            node.get("paths", [])
        )
        per_kind: dict[str, list[str]] = {}
        losses: dict[str, list[float]] = {}
        rtts: dict[str, float] = {}
        since: float | None = None
        for path in paths:
            for kind, view in (path.get("probes") or {}).items():
                per_kind.setdefault(kind, []).append(view.get("state", UNKNOWN))
                if view.get("loss_pct") is not None:
                    losses.setdefault(kind, []).append(float(view["loss_pct"]))
                if path.get("primary") and view.get("p50_ms") is not None:
                    rtts[kind] = float(view["p50_ms"])
                changed = _parse_time(view.get("last_change"))
                if changed is not None and (since is None or changed > since):
                    since = changed
        kinds = {k: kind_state(v) for k, v in sorted(per_kind.items())}
        measure = ICMP if ICMP in kinds else (HTTP if HTTP in kinds else next(iter(kinds), None))
        loss = losses.get(measure or "", [])
        cells[target] = {
            "state": cell_state(kinds),
            "kinds": kinds,
            "rtt_ms": rtts.get(measure or ""),
            "loss_pct": round(sum(loss) / len(loss), 2) if loss else None,
            "since": since,
        }
    ts = _parse_time(data.get("timestamp")) or time.time()
    return {"observer": observer, "timestamp": ts, "cells": cells}


# -- the matrix ------------------------------------------------------------------------------


def assemble(
    local_row: Json,
    rows: Mapping[str, Json],
    heartbeats: Mapping[str, str],
    *,
    local_only: bool,
    now: float | None = None,
    indirect: Mapping[str, Mapping[str, Any]] | None = None,
) -> Json:
    """The mesh JSON (docs/mesh.schema.json): every row, every target, and the verdicts.

    ``rows`` are other observers' rows by observer id (the local one wins over a copy of
    itself); ``heartbeats`` maps node ids to ``"alive"``, ``"expired"`` or ``"unknown"``.
    Targets are the local row's targets and the observers; cells of other rows about nodes
    this agent does not know are left out (an untrusted row cannot grow the matrix).
    """
    all_rows: dict[str, Json] = {k: v for k, v in rows.items() if k != local_row["observer"]}
    all_rows[local_row["observer"]] = local_row
    observers = sorted(all_rows)
    targets = sorted(set(local_row["cells"]) | set(observers))
    wanted = set(targets)
    cells: dict[str, dict[str, Json]] = {}
    for obs in observers:
        row_cells = all_rows[obs]["cells"]
        cells[obs] = {
            tgt: _cell_json(cell) for tgt, cell in sorted(row_cells.items()) if tgt in wanted
        }
    matrix: Json = {
        "timestamp": rfc3339(now if now is not None else time.time()),
        "local": local_row["observer"],
        "local_only": local_only,
        "observers": observers,
        "targets": targets,
        "heartbeats": {t: _heartbeat(heartbeats.get(t)) for t in targets},
        "row_times": {o: rfc3339(all_rows[o].get("timestamp")) for o in observers},
        "cells": cells,
    }
    matrix["verdicts"] = verdicts(matrix)
    if indirect:
        # What other agents answered when this one asked them to probe (SWIM's ping-req).
        matrix["indirect"] = {
            t: {k: sorted(str(x) for x in r.get(k, [])) for k in ("asked", "reached", "failed")}
            for t, r in indirect.items()
            if t in wanted
        }
        for d in matrix["verdicts"]:
            for s in _subjects(d):
                r = matrix["indirect"].get(s)
                if r and r["asked"]:
                    d["evidence"] += (f"; indirect probes: {len(r['reached'])}/{len(r['asked'])}"
                                      f" helpers reach {s}")
    return matrix


def _heartbeat(value: object) -> str:
    return value if value in ("alive", "expired") else "unknown"  # type: ignore[return-value]


def _cell_json(cell: Mapping[str, Any]) -> Json:
    return {
        "state": cell.get("state", UNKNOWN),
        "kinds": dict(cell.get("kinds") or {}),
        "rtt_ms": cell.get("rtt_ms"),
        "loss_pct": cell.get("loss_pct"),
        "since": rfc3339(cell["since"]) if isinstance(cell.get("since"), (int, float)) else None,
    }


# -- verdicts --------------------------------------------------------------------------------


class _View:
    """Lookups over a matrix for the rules."""

    def __init__(self, m: Mapping[str, Any]) -> None:
        self.observers: list[str] = list(m["observers"])
        self.targets: list[str] = list(m["targets"])
        self.cells: Mapping[str, Mapping[str, Json]] = m["cells"]
        self.heartbeats: Mapping[str, str] = m.get("heartbeats") or {}

    def cell(self, obs: str, tgt: str) -> Json | None:
        c = self.cells.get(obs, {}).get(tgt)
        return c if c is not None and c.get("state", UNKNOWN) != UNKNOWN else None

    def state(self, obs: str, tgt: str) -> str:
        c = self.cell(obs, tgt)
        return UNKNOWN if c is None else c["state"]

    def seen_by(self, tgt: str, exclude: Iterable[str] = ()) -> list[str]:
        """Observers (other than ``tgt`` and ``exclude``) with a known cell for ``tgt``."""
        skip = {tgt, *exclude}
        return [o for o in self.observers if o not in skip and self.cell(o, tgt) is not None]

    def reaches(self, obs: str, tgt: str) -> bool:
        """Some kind gets through (reachable or degraded)."""
        return self.state(obs, tgt) in (REACHABLE, DEGRADED)

    def since(self, pairs: Iterable[tuple[str, str]]) -> str | None:
        times = [
            _parse_time(c.get("since"))
            for o, t in pairs
            if (c := self.cell(o, t)) is not None
        ]
        known = [t for t in times if t is not None]
        return rfc3339(max(known)) if known else None


def _verdict(
    kind: str, subject: str | list[str], confidence: float, evidence: str, since: str | None
) -> Json:
    return {
        "kind": kind,
        "subject": subject,
        "confidence": round(max(0.0, min(1.0, confidence)), 2),
        "evidence": evidence,
        "since": since,
    }


def _names(items: Iterable[str], limit: int = 4) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def verdicts(m: Mapping[str, Any]) -> list[Json]:
    """Classify every fault of the matrix ``m`` (docs/mesh.md); a healthy mesh gives []."""
    v = _View(m)
    out: list[Json] = []
    explained: set[tuple[str, str]] = set()  # (observer, target) cells a verdict accounts for

    # 1. Observers cut off: they fail to most targets that the others reach.
    isolated: set[str] = set()
    for obs in v.observers:
        others = [t for t in v.targets if t != obs and v.cell(obs, t) is not None]
        failing = [t for t in others if v.state(obs, t) == UNREACHABLE]
        if len(failing) < 2 or len(failing) <= ISOLATED_SHARE * len(others):
            continue
        # Corroboration: of the failing targets, how many do the other observers reach?
        reached = [t for t in failing if any(v.reaches(o, t) for o in v.seen_by(t, [obs]))]
        if not reached or len(reached) * 2 < len(failing):
            continue
        isolated.add(obs)
        explained |= {(obs, t) for t in failing}
        inbound = v.seen_by(obs)
        cut_in = [o for o in inbound if v.state(o, obs) == UNREACHABLE]
        cut_both = bool(inbound) and len(cut_in) == len(inbound)
        both = " and none of the others reaches it" if cut_both else ""
        if both:
            explained |= {(o, obs) for o in cut_in}
        out.append(_verdict(
            "observer-isolated", obs, len(reached) / len(failing),
            f"{obs} fails to {len(failing)}/{len(others)} targets that "
            f"{len(reached)} of them others reach{both}",
            v.since((obs, t) for t in failing),
        ))  # fmt: skip

    # 2. Whole targets: down, agent down, or filtered for every observer.
    down: set[str] = set()
    for tgt in v.targets:
        if tgt in isolated:
            continue
        seen = v.seen_by(tgt, isolated)
        hb = v.heartbeats.get(tgt, "unknown")
        if not seen:
            if hb == "expired":
                out.append(_verdict(
                    "node-down", tgt, 0.5, f"heartbeat expired; no observer has a result for {tgt}",
                    None,
                ))  # fmt: skip
                down.add(tgt)
            continue
        failing = [o for o in seen if v.state(o, tgt) == UNREACHABLE]
        reaching = [o for o in seen if v.reaches(o, tgt)]
        if hb == "expired":
            down.add(tgt)
            explained |= {(o, tgt) for o in seen}
            if reaching:
                by = _kinds_working(v, reaching, tgt)
                out.append(_verdict(
                    "agent-down", tgt, len(reaching) / len(seen),
                    f"heartbeat expired, but {len(reaching)}/{len(seen)} observers still reach "
                    f"{tgt} by {by}: the agent is down, not the host",
                    v.since((o, tgt) for o in seen),
                ))  # fmt: skip
            else:
                out.append(_verdict(
                    "node-down", tgt, 1.0 if len(seen) > 1 else 0.75,
                    f"heartbeat expired and all {len(seen)} observers fail every kind to {tgt}",
                    v.since((o, tgt) for o in seen),
                ))  # fmt: skip
            continue
        if len(failing) == len(seen) and not (len(seen) == 1 and tgt in v.observers):
            # (One observer failing to a target whose own row is fresh is a pair fault,
            # left to the pair rules: in a two-node mesh a cut link looks like this.)
            down.add(tgt)
            explained |= {(o, tgt) for o in seen}
            note = ("heartbeat alive: it still reaches the store" if hb == "alive"
                    else "no heartbeat known")
            conf = (1.0 if len(seen) > 1 else 0.75) * (0.6 if hb == "alive" else 0.8)
            out.append(_verdict(
                "node-down", tgt, conf,
                f"all {len(seen)} observers fail every kind to {tgt} ({note})",
                v.since((o, tgt) for o in seen),
            ))  # fmt: skip
            continue
        for kind, other, name in ((HTTP, ICMP, "port-filtered"), (ICMP, HTTP, "icmp-filtered")):
            hit = [o for o in seen if _filtered(v.cell(o, tgt), kind, other)]
            if (len(hit) == len(seen) and len(seen) >= 2) or (len(seen) == 1 and hit):
                explained |= {(o, tgt) for o in hit}
                what = "port 4240 (HTTP)" if kind == HTTP else "ICMP echo"
                out.append(_verdict(
                    name, tgt, len(hit) / len(seen) * (1.0 if len(seen) > 1 else 0.6),
                    f"{len(hit)}/{len(seen)} observers reach {tgt} by {other} but not {what}",
                    v.since((o, tgt) for o in hit),
                ))  # fmt: skip

    # 3. Pairs: links, one-way failures and per-pair filtering.
    done_pairs: set[frozenset[str]] = set()
    for obs in v.observers:
        if obs in isolated:
            continue
        for tgt in v.targets:
            if tgt == obs or tgt in down or (obs, tgt) in explained:
                continue
            c = v.cell(obs, tgt)
            if c is None:
                continue
            if c["state"] == DEGRADED:
                for kind, other, name in ((HTTP, ICMP, "port-filtered"),
                                          (ICMP, HTTP, "icmp-filtered")):
                    if _filtered(c, kind, other):
                        explained.add((obs, tgt))
                        out.append(_verdict(
                            name, [obs, tgt], 0.5,
                            f"{obs} reaches {tgt} by {other} but not by {kind}, "
                            "while other observers reach it by both",
                            v.since([(obs, tgt)]),
                        ))  # fmt: skip
                continue
            if c["state"] != UNREACHABLE:
                continue
            pair = frozenset((obs, tgt))
            if pair in done_pairs:
                continue
            done_pairs.add(pair)
            back = v.state(tgt, obs)
            tgt_ok = [o for o in v.seen_by(tgt, [obs, *isolated]) if v.reaches(o, tgt)]
            obs_ok = [o for o in v.seen_by(obs, [tgt, *isolated]) if v.reaches(o, obs)]
            corroboration = (len(tgt_ok) + len(obs_ok) + 1) / (
                len(v.seen_by(tgt, [obs, *isolated])) + len(v.seen_by(obs, [tgt, *isolated])) + 1
            )
            explained |= {(obs, tgt), (tgt, obs)}
            if back in (REACHABLE, DEGRADED):
                out.append(_verdict(
                    "asymmetric", [obs, tgt], corroboration,
                    f"{obs} → {tgt} fails while {tgt} → {obs} works"
                    + (f"; {len(tgt_ok)} others reach {tgt}" if tgt_ok else ""),
                    v.since([(obs, tgt)]),
                ))  # fmt: skip
            else:
                why = "both ways" if back == UNREACHABLE else f"({tgt} has no result for {obs})"
                out.append(_verdict(
                    "link", sorted([obs, tgt]),
                    corroboration * (1.0 if back == UNREACHABLE else 0.7),
                    f"{obs} and {tgt} fail {why}, while {len(tgt_ok)} others reach {tgt} and "
                    f"{len(obs_ok)} reach {obs}",
                    v.since([(obs, tgt), (tgt, obs)]),
                ))  # fmt: skip

    # 4. Degraded: reachable, but with loss or RTT well above the mesh's usual.
    flagged = down | isolated | {s for d in out for s in _subjects(d)}
    out.extend(_degraded(v, flagged))
    return out


def _subjects(verdict: Mapping[str, Any]) -> list[str]:
    s = verdict["subject"]
    return [s] if isinstance(s, str) else list(s)


def _kinds_working(v: _View, observers: list[str], tgt: str) -> str:
    kinds = sorted({
        k for o in observers for k, s in (v.cell(o, tgt) or {}).get("kinds", {}).items()
        if s in (REACHABLE, PARTIAL)
    })  # fmt: skip
    return " and ".join(kinds) or "some kind"


def _filtered(cell: Json | None, failing: str, working: str) -> bool:
    if cell is None:
        return False
    kinds = cell.get("kinds") or {}
    return kinds.get(failing) == UNREACHABLE and kinds.get(working) == REACHABLE


def _degraded(v: _View, flagged: set[str]) -> list[Json]:
    """Targets whose cells (seen by others, and their own row) show loss or RTT well above
    the median of the cells that do not involve them."""
    out: list[Json] = []
    nodes = [t for t in v.targets if t not in flagged]

    def values(key: str, pairs: Iterable[tuple[str, str]]) -> list[float]:
        got = []
        for o, t in pairs:
            c = v.cell(o, t)
            if c is not None and c["state"] != UNREACHABLE and c.get(key) is not None:
                got.append(float(c[key]))
        return got

    offdiag = [(o, t) for o in v.observers for t in v.targets if o != t]
    # The mesh's usual excludes the suspect's own cells in a small mesh (where they weigh
    # on the median); in a large one the median of all cells is robust and O(N²) in total.
    small = len(v.targets) <= EXCLUDE_UP_TO
    for key, floor, factor, margin, what, unit in (
        ("loss_pct", LOSS_MIN_PCT, LOSS_FACTOR, LOSS_MARGIN, "loss", "%"),
        ("rtt_ms", RTT_MIN_MS, RTT_FACTOR, RTT_MARGIN, "RTT", " ms"),
    ):
        overall = values(key, offdiag) if not small else []
        overall_usual = statistics.median(overall) if overall else 0.0
        for tgt in nodes:
            if any(_subjects(d) == [tgt] for d in out):
                continue
            inbound = [(o, tgt) for o in v.observers if o != tgt]
            outbound = [(tgt, t) for t in v.targets if t != tgt] if tgt in v.observers else []
            col = values(key, inbound)
            row = values(key, outbound)
            if not col or (len(col) < 2 and not row):
                continue
            if small:
                rest = values(key, ((o, t) for o, t in offdiag if tgt not in (o, t)))
                if not rest:
                    continue  # no cell apart from the suspect's: no usual to compare with
                usual = statistics.median(rest)
            else:
                usual = overall_usual
            limit = max(floor, factor * usual, usual + margin)
            # Means of the suspect's cells (every sample counts), but more than half of the
            # observers must see at least half the limit: one broken cell is no verdict.
            col_mean = statistics.fmean(col)
            row_mean = statistics.fmean(row) if row else None
            # Inbound from most observers, and its own row too when there is one: one lossy
            # observer does not make its targets degraded.
            high_in = sum(1 for x in col if x >= limit / 2)
            if col_mean < limit or high_in * 2 <= len(col):
                continue
            if key == "loss_pct" and row_mean is not None and row_mean < limit and len(row) >= 2:
                continue
            out.append(_verdict(
                "degraded", tgt, high_in / len(col),
                f"{what} to {tgt} is {_fmt(col_mean)}{unit} (mean of {len(col)} observers)"
                + (f", from it {_fmt(row_mean)}{unit}" if row_mean is not None else "")
                + f"; the mesh's usual is {_fmt(usual)}{unit}",
                v.since(inbound),
            ))  # fmt: skip
    return out


def _fmt(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "?"
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def concerning(matrix: Mapping[str, Any], node_id: str) -> list[Json]:
    """The verdicts that name ``node_id`` (as subject or one end of a pair)."""
    return [d for d in matrix.get("verdicts", []) if node_id in _subjects(d)]
