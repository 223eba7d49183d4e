"""``healthmesh mesh``'s text: verdicts in plain words, the matrix, collapsed when large."""

from __future__ import annotations

from typing import Any

from healthmesh.core.mesh import assemble, cell_state
from healthmesh.plugins.api.report import cell_text, mesh_faulty, mesh_lines, verdict_line

OK = {"icmp": "reachable", "http": "reachable"}
DOWN = {"icmp": "unreachable", "http": "unreachable"}


def build(n: int, faults: dict[tuple[int, int], dict[str, str]]) -> dict[str, Any]:
    ids = [f"default/n{i:02d}" for i in range(1, n + 1)]
    rows = {}
    for i, obs in enumerate(ids, 1):
        cells = {}
        for j, tgt in enumerate(ids, 1):
            kinds = faults.get((i, j), OK)
            cells[tgt] = {"state": cell_state(kinds), "kinds": dict(kinds), "rtt_ms": 0.2,
                          "loss_pct": 0.0, "since": 1_800_000_000.0}
        rows[obs] = {"observer": obs, "timestamp": 1_800_000_000.0, "cells": cells}
    local = rows.pop(ids[0])
    return assemble(local, rows, dict.fromkeys(ids, "alive"), local_only=False)


def table_rows(lines: list[str]) -> dict[str, list[str]]:
    return {ln.split()[0]: ln.split()[1:] for ln in lines if ln.startswith("  n")}


def test_a_small_mesh_shows_every_cell_and_the_verdict_on_top() -> None:
    m = build(4, {(1, 3): DOWN, (3, 1): DOWN, (2, 4): {"icmp": "reachable",
                                                       "http": "unreachable"}})
    lines = mesh_lines(m)
    assert lines[0] == "Verdicts:"
    assert "the link between n01 and n03 is cut" in lines[1]
    assert "port 4240 is filtered between n02 and n04" in lines[2]
    rows = table_rows(lines)
    assert rows["n01"] == ["·", "✔", "✘", "✔"]
    assert rows["n02"] == ["✔", "·", "✔", "partial", "http✘"]
    assert mesh_faulty(m)


def test_a_large_mesh_collapses_to_the_failing_rows_and_columns() -> None:
    m = build(30, {(5, 17): DOWN, (17, 5): DOWN})
    lines = mesh_lines(m)
    rows = table_rows(lines)
    assert set(rows) == {"n05", "n17"}
    header = next(ln for ln in lines if "observer ↓ target →" in ln)
    assert header.split()[-2:] == ["n05", "n17"]
    assert rows["n05"] == ["·", "✘"] and rows["n17"] == ["✘", "·"]
    assert any("collapsed: showing the 2 observers and 2 targets" in ln for ln in lines)
    healthy = build(30, {})
    text = "\n".join(mesh_lines(healthy))
    assert "Verdicts: none" in text and "every one of the 30×30 cells" in text
    assert not mesh_faulty(healthy)


def test_cells_and_verdicts_in_plain_words() -> None:
    assert cell_text({"state": "reachable"}) == "✔"
    assert cell_text({"state": "unknown"}) == "?"
    assert cell_text(None) == "?"
    partial = {"state": "degraded", "kinds": {"icmp": "partial", "http": "reachable"}}
    assert cell_text(partial) == "partial icmp~"
    line = verdict_line({"kind": "asymmetric", "subject": ["c1/a", "default/b"],
                         "confidence": 0.5, "evidence": "e", "since": None})
    assert line == "✘ c1/a cannot reach b, though b reaches c1/a — e (confidence 0.50)"
    line = verdict_line({"kind": "agent-down", "subject": "default/b", "confidence": 1,
                         "evidence": "hb", "since": "2026-12-01T00:00:00Z"})
    assert line.startswith("✘ the agent on b is down (the host still answers) — hb")
    assert line.endswith("(confidence 1.00, since 2026-12-01T00:00:00Z)")
