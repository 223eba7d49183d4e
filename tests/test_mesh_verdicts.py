"""The verdict rules of healthmesh.core.mesh on hand-built matrices (pure: no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from healthmesh.core.mesh import (
    assemble,
    cell_state,
    concerning,
    kind_state,
    row_from_snapshot,
    verdicts,
)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "mesh.schema.json").read_text())

R, U, P = "reachable", "unreachable", "partial"
OK = {"icmp": R, "http": R}
DOWN = {"icmp": U, "http": U}
PORT = {"icmp": R, "http": U}
NOICMP = {"icmp": U, "http": R}


def names(n: int) -> list[str]:
    return [f"c/n{i}" for i in range(1, n + 1)]


def matrix(
    n: int,
    faults: dict[tuple[int, int], dict[str, str]] | None = None,
    *,
    heartbeats: dict[int, str] | None = None,
    missing_rows: tuple[int, ...] = (),
    loss: dict[tuple[int, int], float] | None = None,
    base_loss: float = 0.0,
    rtt: dict[tuple[int, int], float] | None = None,
    rng: random.Random | None = None,
    validate: bool = True,
) -> dict[str, Any]:
    """An n-node matrix, every cell reachable except ``faults[(obs, tgt)]`` (1-based)."""
    ids = names(n)
    rows: dict[str, dict[str, Any]] = {}
    for i, obs in enumerate(ids, 1):
        if i in missing_rows:
            continue
        cells = {}
        for j, tgt in enumerate(ids, 1):
            kinds = dict((faults or {}).get((i, j), OK)) if i != j else dict(OK)
            lp = (loss or {}).get((i, j), base_loss)
            if rng is not None:
                lp = max(0.0, lp + rng.uniform(-4, 4))
            cells[tgt] = {
                "state": cell_state(kinds),
                "kinds": kinds,
                "rtt_ms": (rtt or {}).get((i, j), 0.3),
                "loss_pct": lp,
                "since": 1_800_000_000.0 + i + j,
            }
        rows[obs] = {"observer": obs, "timestamp": 1_800_000_100.0, "cells": cells}
    hb = {ids[k - 1]: v for k, v in (heartbeats or {}).items()}
    hb = {t: hb.get(t, "alive") for t in ids}
    local = rows.get(ids[0]) or {"observer": ids[0], "timestamp": 0.0, "cells": {
        t: {"state": "unknown", "kinds": {}, "rtt_ms": None, "loss_pct": None, "since": None}
        for t in ids}}
    others = {k: v for k, v in rows.items() if k != ids[0]}
    m = assemble(local, others, hb, local_only=False, now=1_800_000_200.0)
    if validate:
        jsonschema.validate(m, SCHEMA)
    return m


def kinds_of(m: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(d["kind"], d["subject"]) for d in m["verdicts"]]


def test_a_healthy_mesh_has_no_verdict() -> None:
    for n in (1, 2, 3, 4, 10):
        assert matrix(n)["verdicts"] == []


def test_a_healthy_mesh_with_small_random_loss_has_no_verdict() -> None:
    rng = random.Random(7)
    for n in (2, 3, 4, 8, 20, 80):
        for _ in range(30 if n < 80 else 3):
            m = matrix(n, base_loss=8.0, rng=rng, validate=False)
            assert m["verdicts"] == [], (n, m["verdicts"])


@pytest.mark.parametrize("n", [3, 4, 6])
def test_node_down_when_every_observer_fails_and_its_heartbeat_expired(n: int) -> None:
    faults = {(i, n): DOWN for i in range(1, n)}
    m = matrix(n, faults, heartbeats={n: "expired"}, missing_rows=(n,))
    assert kinds_of(m) == [("node-down", f"c/n{n}")]
    d = m["verdicts"][0]
    assert d["confidence"] == 1.0 and "heartbeat expired" in d["evidence"]
    assert d["since"] is not None


def test_node_down_before_the_heartbeat_expires_is_less_certain() -> None:
    m = matrix(4, {(i, 4): DOWN for i in (1, 2, 3)}, missing_rows=(4,))
    assert kinds_of(m) == [("node-down", "c/n4")]
    assert m["verdicts"][0]["confidence"] < 1.0
    assert "heartbeat alive" in m["verdicts"][0]["evidence"]


def test_agent_down_when_the_heartbeat_expired_but_icmp_still_answers() -> None:
    m = matrix(3, {(1, 3): PORT, (2, 3): PORT}, heartbeats={3: "expired"}, missing_rows=(3,))
    assert kinds_of(m) == [("agent-down", "c/n3")]
    assert "icmp" in m["verdicts"][0]["evidence"]
    assert m["verdicts"][0]["confidence"] == 1.0


@pytest.mark.parametrize("n", [3, 4, 5])
def test_observer_isolated_when_one_observer_fails_to_everyone_the_others_reach(n: int) -> None:
    m = matrix(n, {(2, j): DOWN for j in range(1, n + 1) if j != 2})
    assert kinds_of(m) == [("observer-isolated", "c/n2")]


def test_isolated_both_ways_but_heartbeat_alive_is_isolation_not_node_down() -> None:
    faults = {(2, j): DOWN for j in (1, 3, 4)} | {(j, 2): DOWN for j in (1, 3, 4)}
    m = matrix(4, faults)
    assert kinds_of(m) == [("observer-isolated", "c/n2")]
    assert "none of the others reaches it" in m["verdicts"][0]["evidence"]


def test_one_link_cut_both_ways_is_a_link_verdict_naming_the_pair() -> None:
    m = matrix(4, {(1, 3): DOWN, (3, 1): DOWN})
    assert kinds_of(m) == [("link", ["c/n1", "c/n3"])]
    assert m["verdicts"][0]["confidence"] == 1.0


def test_a_link_in_a_two_node_mesh() -> None:
    m = matrix(2, {(1, 2): DOWN, (2, 1): DOWN})
    assert kinds_of(m) == [("link", ["c/n1", "c/n2"])]


def test_one_direction_cut_is_asymmetric_naming_the_failing_direction() -> None:
    m = matrix(4, {(2, 4): DOWN})
    assert kinds_of(m) == [("asymmetric", ["c/n2", "c/n4"])]
    assert "c/n2 → c/n4 fails" in m["verdicts"][0]["evidence"]
    assert kinds_of(matrix(2, {(2, 1): DOWN})) == [("asymmetric", ["c/n2", "c/n1"])]


def test_port_and_icmp_filtering_on_one_host() -> None:
    m = matrix(4, {(i, 3): PORT for i in (1, 2, 4)})
    assert kinds_of(m) == [("port-filtered", "c/n3")]
    m = matrix(4, {(i, 2): NOICMP for i in (1, 3, 4)})
    assert kinds_of(m) == [("icmp-filtered", "c/n2")]
    # Only one observer sees the filter: a per-pair verdict.
    m = matrix(4, {(1, 3): PORT})
    assert kinds_of(m) == [("port-filtered", ["c/n1", "c/n3"])]


def test_degraded_by_loss_on_one_host_in_both_directions() -> None:
    loss = {(i, 3): 22.0 for i in (1, 2, 4)} | {(3, j): 20.0 for j in (1, 2, 4)}
    m = matrix(4, loss=loss)
    assert kinds_of(m) == [("degraded", "c/n3")]
    assert "loss" in m["verdicts"][0]["evidence"]


def test_uniform_loss_is_the_mesh_usual_and_no_verdict() -> None:
    assert matrix(4, base_loss=20.0)["verdicts"] == []


def test_one_lossy_observer_does_not_make_its_targets_degraded() -> None:
    # n2 sees loss to everyone, nobody else sees loss: only n2 is suspect.
    loss = {(2, j): 30.0 for j in (1, 3, 4)} | {(j, 2): 30.0 for j in (1, 3, 4)}
    assert kinds_of(matrix(4, loss=loss)) == [("degraded", "c/n2")]
    assert matrix(4, loss={(2, j): 30.0 for j in (1, 3, 4)})["verdicts"] == []


def test_degraded_by_rtt_well_above_the_mesh_usual() -> None:
    m = matrix(4, rtt={(i, 4): 40.0 for i in (1, 2, 3)})
    assert kinds_of(m) == [("degraded", "c/n4")]
    assert "RTT" in m["verdicts"][0]["evidence"]


def test_ties_in_a_three_node_mesh_are_pair_faults_not_isolation() -> None:
    # n1 fails to one of its two targets: not "most"; the pair is the fault.
    m = matrix(3, {(1, 2): DOWN, (2, 1): DOWN})
    assert kinds_of(m) == [("link", ["c/n1", "c/n2"])]


def test_half_the_observers_failing_is_not_node_down() -> None:
    m = matrix(4, {(1, 4): DOWN, (2, 4): DOWN})
    got = kinds_of(m)
    assert ("node-down", "c/n4") not in got
    assert sorted(k for k, _ in got) == ["asymmetric", "asymmetric"]


def test_a_local_only_matrix_says_so_and_still_names_an_unreachable_node() -> None:
    local = {"observer": "c/n1", "timestamp": 1.0, "cells": {
        "c/n1": {"state": R, "kinds": OK, "rtt_ms": 0.1, "loss_pct": 0.0, "since": None},
        "c/n2": {"state": U, "kinds": DOWN, "rtt_ms": None, "loss_pct": 100.0, "since": 5.0},
    }}
    m = assemble(local, {}, {}, local_only=True, now=10.0)
    jsonschema.validate(m, SCHEMA)
    assert m["local_only"] is True and m["observers"] == ["c/n1"]
    assert kinds_of(m) == [("node-down", "c/n2")]
    assert m["verdicts"][0]["confidence"] < 0.8
    assert concerning(m, "c/n2") == m["verdicts"] and concerning(m, "c/n1") == []


def test_a_foreign_row_cannot_add_targets() -> None:
    local = {"observer": "c/n1", "timestamp": 1.0, "cells": {
        "c/n1": {"state": R, "kinds": OK, "rtt_ms": 0.1, "loss_pct": 0.0, "since": None}}}
    other = {"observer": "c/n2", "timestamp": 1.0, "cells": {
        "c/zz": {"state": U, "kinds": DOWN, "rtt_ms": None, "loss_pct": None, "since": None}}}
    m = assemble(local, {"c/n2": other}, {}, local_only=False)
    assert m["targets"] == ["c/n1", "c/n2"] and m["cells"]["c/n2"] == {}


def test_kind_and_cell_states() -> None:
    assert kind_state([R, R, "unknown"]) == R
    assert kind_state([R, U]) == P
    assert kind_state(["unknown"]) == "unknown"
    assert cell_state({"icmp": R, "http": U}) == "degraded"
    assert cell_state({"icmp": U, "http": U}) == U
    assert cell_state({}) == "unknown"


def test_row_from_a_snapshot_uses_host_paths_and_the_primary_rtt() -> None:
    snap = {
        "timestamp": "2026-12-01T10:00:00.000Z",
        "local": {"name": "a", "cluster": "default"},
        "nodes": [{
            "name": "b", "cluster": "default",
            "paths": [
                {"role": "host", "primary": True, "probes": {
                    "icmp": {"state": R, "p50_ms": 0.5, "loss_pct": 10.0,
                             "last_change": "2026-12-01T09:59:00.000Z"},
                    "http": {"state": U, "p50_ms": None, "loss_pct": 100.0,
                             "last_change": "2026-12-01T09:59:30.000Z"}}},
                {"role": "host", "primary": False, "probes": {
                    "icmp": {"state": R, "p50_ms": 0.7, "loss_pct": 20.0, "last_change": None},
                    "http": {"state": R, "p50_ms": 1.0, "loss_pct": 0.0, "last_change": None}}},
                {"role": "endpoint", "primary": True, "probes": {
                    "icmp": {"state": U, "p50_ms": None, "loss_pct": 100.0}}},
            ],
        }],
    }
    row = row_from_snapshot(snap)
    assert row["observer"] == "default/a"
    cell = row["cells"]["default/b"]
    assert cell["kinds"] == {"http": P, "icmp": R}
    assert cell["state"] == "degraded"
    assert cell["rtt_ms"] == 0.5 and cell["loss_pct"] == 15.0
    assert cell["since"] == pytest.approx(1796119170.0)


def test_verdicts_of_a_schema_valid_matrix_are_stable_json() -> None:
    m = matrix(4, {(1, 3): DOWN, (3, 1): DOWN})
    again = verdicts(json.loads(json.dumps(m)))
    assert again == m["verdicts"]


def test_degraded_in_a_large_mesh_uses_the_median_of_all_cells() -> None:
    n = 80  # above EXCLUDE_UP_TO: the usual is the median of every cell
    loss = {(i, 7): 25.0 for i in range(1, n + 1)} | {(7, j): 25.0 for j in range(1, n + 1)}
    m = matrix(n, loss=loss, base_loss=2.0, validate=False)
    assert kinds_of(m) == [("degraded", "c/n7")]
    assert "the mesh's usual is 2.0%" in m["verdicts"][0]["evidence"]


def test_one_host_a_little_above_a_lossy_mesh_is_no_verdict() -> None:
    # Seen in netlab at 5% loss everywhere (windows of 20 samples): a host's own drops lift
    # all its cells at once. Usual 5%, the host 15% both ways: within the noise.
    loss = {(i, 2): 15.0 for i in (1, 3, 4)} | {(2, j): 15.0 for j in (1, 3, 4)}
    assert matrix(4, loss=loss, base_loss=5.0)["verdicts"] == []
    # Clearly above it: degraded.
    loss = {(i, 2): 25.0 for i in (1, 3, 4)} | {(2, j): 25.0 for j in (1, 3, 4)}
    assert kinds_of(matrix(4, loss=loss, base_loss=5.0)) == [("degraded", "c/n2")]


def test_one_broken_cell_is_not_a_degraded_target() -> None:
    m = matrix(4, loss={(1, 3): 90.0, (3, 1): 0.0})
    assert m["verdicts"] == []


def test_no_degraded_without_a_usual_to_compare_with() -> None:
    # Two nodes: every cell involves both; a slow or lossy pair names no culprit.
    m = matrix(2, rtt={(1, 2): 50.0, (2, 1): 30.0}, loss={(1, 2): 40.0, (2, 1): 40.0})
    assert m["verdicts"] == []
