"""The snapshot → Cilium model mapping and the status text views, on hand-made snapshots."""

from __future__ import annotations

from typing import Any

from healthmesh.plugins.api.cilium import node_ok, status_response
from healthmesh.plugins.api.report import succinct_lines, verbose_lines
from tests.test_api_support import cilium_validator

T = "2026-01-01T00:00:00.000Z"


def entry(state: str, rtt: float | None = None, error: str | None = None,
          probed: str | None = T, p50: float | None = None) -> dict[str, Any]:
    return {"state": state, "rtt_ms": rtt, "error": error, "last_probed": probed,
            "p50_ms": p50, "samples": 1 if probed else 0, "consecutive_failures": 0,
            "min_ms": rtt, "avg_ms": rtt, "max_ms": rtt, "p95_ms": rtt, "loss_pct": 0.0,
            "last_change": probed}


def snapshot(probes: dict[str, Any], cluster: str = "default") -> dict[str, Any]:
    node = {"name": "n2", "cluster": cluster, "state": "reachable", "local": False,
            "paths": [{"address": "10.0.0.2", "role": "host", "primary": True,
                       "probes": probes}]}
    return {"timestamp": T, "interval_s": 60.0, "local": {"name": "n1", "cluster": cluster},
            "summary": {"nodes": 1, "reachable": 1, "unreachable": 0, "unknown": 0},
            "nodes": [node]}


def test_latency_is_integer_nanoseconds_and_status_empty_on_success() -> None:
    doc = status_response(snapshot({"icmp": entry("reachable", rtt=0.412)}))
    cilium_validator("HealthStatusResponse").validate(doc)
    assert doc["probeInterval"] == "1m0s"  # as Go prints time.Duration
    icmp = doc["nodes"][0]["host"]["primary-address"]["icmp"]
    assert icmp == {"latency": 412000, "status": "", "lastProbed": T}


def test_a_failure_below_the_threshold_does_not_flap_the_status() -> None:
    # Still reachable (threshold not reached) though the last probe failed: the median
    # stands in for the missing RTT, and the status stays empty.
    e = entry("reachable", rtt=None, error="timeout after 1s", p50=1.5)
    http = status_response(snapshot({"http": e}))["nodes"][0]["host"]["primary-address"]["http"]
    assert http == {"latency": 1500000, "status": "", "lastProbed": T}


def test_unreachable_carries_the_error_text_and_unprobed_kinds_are_absent() -> None:
    probes = {
        "http": entry("unreachable", error="connect to 10.0.0.2:4240: connection refused"),
        "icmp": entry("unknown", probed=None),
        "tcp": entry("reachable", rtt=1.0),  # not in Cilium's model
    }
    doc = status_response(snapshot(probes, cluster="east"))
    cilium_validator("HealthStatusResponse").validate(doc)
    node = doc["nodes"][0]
    assert node["name"] == "east/n2" and doc["local"]["name"] == "east/n1"
    path = node["host"]["primary-address"]
    assert set(path) == {"ip", "http"}
    assert path["http"]["status"] == "connect to 10.0.0.2:4240: connection refused"
    assert path["http"]["latency"] == 0
    assert not node_ok(node)


def test_text_views_name_kinds_as_cilium_health_does() -> None:
    snap = snapshot({"icmp": entry("reachable", rtt=0.412),
                     "http": entry("unreachable", error="timeout after 1s")})
    text = "\n".join(verbose_lines(snap))
    assert "ICMP to stack:   OK, RTT=412µs (Last probed: " in text
    assert "HTTP to agent:   unreachable: timeout after 1s" in text
    (row,) = succinct_lines(snap)[1:]
    assert row.split()[:3] == ["n2", "10.0.0.2", "reachable"]
