"""The alert rules (``promtool test rules``) and the Grafana dashboard use only real series."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from tests.agentproc import AgentProc
from tests.conftest import ROOT, require_binary
from tests.metrics_support import get, metrics_config, wait_metrics

RULES = ROOT / "deploy" / "prometheus" / "healthmesh-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "healthmesh-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "healthmesh.json"
#: Series Prometheus itself makes for every target.
SYNTHETIC = {"up"}
METRIC_TOKEN = re.compile(r"\b((?:healthmesh|cilium|process|python)_[a-zA-Z0-9_:]*|up)\b")


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = require_binary("promtool", "prometheus")
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        proc = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, cwd=RULES.parent
        )
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        assert "SUCCESS" in proc.stdout + proc.stderr


def rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {
        rule.get("alert") or rule["record"]: rule["expr"]
        for group in doc["groups"]
        for rule in group["rules"]
    }


def dashboard_exprs() -> dict[str, str]:
    doc = json.loads(DASHBOARD.read_text())
    out: dict[str, str] = {}
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            out[f"{panel['title']} {target['refId']}"] = target["expr"]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            out[f"${var['name']}"] = var["definition"]
    return out


def unknown_metrics(expr: str, exported: set[str]) -> set[str]:
    """Metric names ``expr`` uses that are not exported; {"<none>"} when it uses none."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values are not names
    names = set(METRIC_TOKEN.findall(bare))
    if not names:
        return {"<none>"}
    return names - exported - SYNTHETIC


def exported_names(text: str) -> set[str]:
    """Every sample name an exposition can carry, from its TYPE lines (empty families too)."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "info": ("_info",),
    }
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            names.update(name + s for s in suffixes.get(kind, ()))
    return names


def test_checker_catches_a_misspelt_metric() -> None:
    exported = {"healthmesh_nodes"}
    assert unknown_metrics('sum(healthmesh_nodes{state="up_x"})', exported) == set()
    assert unknown_metrics("sum(healthmesh_nodez)", exported) == {"healthmesh_nodez"}
    assert unknown_metrics("vector(1)", exported) == {"<none>"}


def test_rules_and_dashboard_reference_only_exported_metrics(tmp_path: Path) -> None:
    cfg, port = metrics_config(
        tmp_path, peers=2, metrics="per_peer = true\ncilium_compat = true"
    )
    with AgentProc(cfg) as agent:
        wait_metrics(agent, port, lambda t: "healthmesh_peer_reachable{" in t)
        text = get(port)[2].decode()
    exported = exported_names(text)
    assert "healthmesh_probe_duration_seconds_bucket" in exported
    assert "healthmesh_component_restarts_total" in exported  # empty until components exist
    exprs = {**rule_exprs(), **dashboard_exprs()}
    assert len(exprs) >= 20
    bad = {where: unknown_metrics(e, exported) for where, e in exprs.items()}
    bad = {where: unknown for where, unknown in bad.items() if unknown}
    assert not bad, bad
    # Every dashboard panel answers with a query, and the JSON is what Grafana imports.
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "healthmesh" and all(p.get("targets") for p in doc["panels"])


def test_daemonset_exposes_the_metrics_port_and_configures_it() -> None:
    text = (ROOT / "deploy" / "daemonset.yaml").read_text()
    ds = yaml.safe_load(text)
    pod = ds["spec"]["template"]
    ports = {p["name"]: p for p in pod["spec"]["containers"][0]["ports"]}
    assert ports["metrics"]["containerPort"] == ports["metrics"]["hostPort"] == 9967
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9967"
    # The ConfigMap the DaemonSet mounts serves them on every node address.
    cm = yaml.safe_load((ROOT / "deploy" / "configmap.yaml").read_text())
    config = tomllib.loads(cm["data"]["healthmesh.toml"])
    assert config["outputs"]["metrics"]["listen"] == "0.0.0.0:9967"
