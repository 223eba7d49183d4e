"""A real Prometheus scrapes real agents on network-namespace hosts and sees a peer go down.

Three netlab hosts (each a namespace with an agent, a health endpoint and ``[outputs.metrics]``
on 0.0.0.0:9967) and Debian's ``prometheus`` on the lab's switch namespace scraping them every
second. PromQL through Prometheus' HTTP API must give every observer's node counts, then the
right changes once one host drops everything but scrapes with iptables in its namespace; the
alert rules' expressions must name the down node and the one-sided links.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import require, require_binary
from tests.netlab import Host, Lab, sh, unavailable_reason
from tests.prometheus_server import PrometheusServer, http_get
from tests.test_metrics_rules import RULES, rule_exprs

pytestmark = pytest.mark.root

PORT = 9967
PROM_ADDR = "10.231.0.240"


class MetricsLab(Lab):
    """A netlab whose agents also serve metrics, with an address for Prometheus on the switch."""

    def _build_network(self) -> None:
        super()._build_network()
        sh("ip", "netns", "exec", self.bridge_ns, "ip", "addr", "add", f"{PROM_ADDR}/24",
           "dev", "br0")  # fmt: skip

    def _write_config(self, host: Host) -> None:
        super()._write_config(host)
        with host.config.open("a") as f:
            f.write(
                f'[outputs.metrics]\nlisten = "0.0.0.0:{PORT}"\n'
                "per_peer = true\ncilium_compat = true\n"
            )


def test_prometheus_sees_node_counts_then_a_peer_made_unreachable(tmp_path: Path) -> None:
    require(unavailable_reason())
    require_binary("prometheus", "prometheus")
    promtool = require_binary("promtool", "prometheus")
    with MetricsLab(3, probing={"interval": "1s", "timeout": "500ms"}) as lab:
        h1, _h2, h3 = lab.hosts
        t1, t2, t3 = (f"{h.addr4}:{PORT}" for h in lab.hosts)
        with PrometheusServer(
            tmp_path / "prometheus", [t1, t2, t3], netns=lab.bridge_ns, rule_files=[RULES]
        ) as prom:
            prom.wait_values("up", "instance", {t1: 1, t2: 1, t3: 1})
            prom.wait_values(
                'healthmesh_nodes{state="reachable"}', "instance", {t1: 3, t2: 3, t3: 3}
            )
            prom.wait_values(
                'cilium_node_health_connectivity_status{type="endpoint",status="reachable"}',
                "instance",
                {t1: 3, t2: 3, t3: 3},
            )
            info = prom.values("healthmesh_agent_info", "node")
            assert info == {"h1": 1, "h2": 1, "h3": 1}
            # The body Prometheus scrapes passes promtool's linter.
            status, body = http_get(h1.addr4, PORT, "/metrics", netns=lab.bridge_ns)
            assert status == 200
            checked = subprocess.run(
                [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
            )
            assert checked.returncode == 0, checked.stderr.decode()

            # h3 drops everything arriving on its link but the scrapes: it cannot reach
            # anyone, nobody reaches it or its endpoint, Prometheus still hears from it.
            lab._rule(h3, "INPUT", f"-i eth0 -p tcp --dport {PORT} -j ACCEPT", [4])
            lab._rule(h3, "INPUT", "-i eth0 -j DROP")
            lab._rule(h3, "FORWARD", "-i eth0 -j DROP")
            prom.wait_values(
                'healthmesh_nodes{state="unreachable"}', "instance", {t1: 1, t2: 1, t3: 2}
            )
            prom.wait_values(
                'healthmesh_nodes{state="reachable"}', "instance", {t1: 2, t2: 2, t3: 1}
            )
            prom.wait_values(
                'cilium_node_health_connectivity_status{type="node",status="unreachable"}',
                "instance",
                {t1: 1, t2: 1, t3: 2},
            )
            down = prom.query('min by (instance, peer) (healthmesh_peer_reachable) == 0')
            assert {(r["metric"]["instance"], r["metric"]["peer"]) for r in down} == {
                (t1, "h3"), (t2, "h3"), (t3, "h1"), (t3, "h2")
            }
            assert prom.values("up", "instance") == {t1: 1, t2: 1, t3: 1}
            # The alert expressions: h3 is down for most observers; h3's own view of h1 and
            # h2 is a one-sided link problem.
            rules = rule_exprs()
            most = prom.query(rules["HealthmeshNodeUnreachable"])
            assert [(r["metric"]["peer"], round(float(r["value"][1]), 2)) for r in most] == [
                ("h3", 0.67)
            ]
            links = prom.query(rules["HealthmeshLinkDown"])
            assert {(r["metric"]["instance"], r["metric"]["peer"]) for r in links} == {
                (t3, "h1"), (t3, "h2")
            }
            changes = prom.values(
                "sum by (instance) (healthmesh_state_changes_total)", "instance"
            )
            assert all(changes[t] > 0 for t in (t1, t2, t3)), changes
            failures = prom.values(
                'sum by (instance) (healthmesh_probes_total{result="failure"})', "instance"
            )
            assert all(failures[t] > 0 for t in (t1, t2, t3)), failures
