"""clustermesh: two clusters with their own etcd probe each other, and Cilium's node keys too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import run_cli
from tests.netlab import Host, find_node
from tests.test_etcd_mesh import EtcdLab, etcd_section

Json = dict[str, Any]
CLUSTER = {1: "c1", 2: "c1", 3: "c2", 4: "c2"}
ETCD_OF = {"c1": "etcd-c1", "c2": "etcd-c2"}


def sections(host: Host, lab: EtcdLab) -> str:
    own = CLUSTER[host.index]
    other = "c2" if own == "c1" else "c1"
    lines = [
        etcd_section(host, lab, ETCD_OF[own]),
        "[clustermesh]",
        'interval = "2s"',
        'retry_max = "2s"',
        "[[clustermesh.clusters]]",
        f'name = "{other}"',
        f'endpoints = ["{lab.etcd_url(ETCD_OF[other])}"]',
        'timeout = "500ms"',
    ]
    if own == "c1":  # c1 also reads Cilium's node keys of cluster c3 from the second etcd
        lines += [
            "[[clustermesh.clusters]]",
            'name = "c3"',
            f'endpoints = ["{lab.etcd_url("etcd-c2")}"]',
            'format = "cilium"',
        ]
    return "\n".join(lines)


def cilium_node(name: str, cluster: str, internal: str, health: str) -> Json:
    """A node the way Cilium's agent writes it to cilium/state/nodes/v1 (abridged)."""
    return {
        "Name": name,
        "Cluster": cluster,
        "IPAddresses": [
            {"Type": "CiliumInternalIP", "IP": "10.99.0.1"},
            {"Type": "InternalIP", "IP": internal},
        ],
        "IPv4AllocCIDR": {"IP": "10.99.0.0", "Mask": "//8AAA=="},
        "IPv4HealthIP": health,
        "IPv6HealthIP": "",
        "ClusterID": 3,
        "Source": "custom-resource",
        "EncryptionKey": 0,
        "Labels": {"kubernetes.io/os": "linux"},
        "NodeIdentity": 6,
    }


def test_two_clusters_probe_each_other_and_a_cilium_node(tmp_path: Path) -> None:
    with EtcdLab(
        4,
        etcds=("etcd-c1", "etcd-c2"),
        sections=sections,
        cluster=lambda h: CLUSTER[h.index],
        data_dir=tmp_path,
    ) as lab:
        h1, h2, h3, h4 = lab.hosts
        for h in lab.hosts:
            view = lab.view(h)
            assert view is not None
            seen = {f"{n['cluster']}/{n['name']}" for n in view["nodes"]}
            assert seen == {"c1/h1", "c1/h2", "c2/h3", "c2/h4"}
            assert view["sources"]["clustermesh"]["stale"] is False
        # Each cluster's etcd holds only its own registrations: clustermesh is read-only.
        assert set(lab.etcd["etcd-c2"].keys("healthmesh/nodes/v1/")) == {
            "healthmesh/nodes/v1/c2/h3",
            "healthmesh/nodes/v1/c2/h4",
        }
        # Remote nodes are probed on the clustermesh interval (2 rounds of 1 s).
        remote = find_node(lab.view(h1) or {}, "h3")
        assert remote is not None and remote["info"]["heartbeat"] == "alive"

        # A node written by the test in Cilium's own format into the second etcd.
        node = cilium_node("cnode", "c3", internal=h4.ep4, health=h3.ep4)
        lab.etcd["etcd-c2"].put("cilium/state/nodes/v1/c3/cnode", node)

        def probed(view: Json) -> bool:
            n = find_node(view, "cnode")
            return n is not None and n["cluster"] == "c3" and n["state"] == "reachable"

        lab.wait_until(probed, [h1, h2], timeout=15)
        view = lab.view(h1)
        assert view is not None
        n = find_node(view, "cnode")
        assert n is not None
        assert [(p["address"], p["role"]) for p in n["paths"]] == [
            (h4.ep4, "host"),
            (h3.ep4, "endpoint"),
        ]
        assert n["labels"] == {"kubernetes.io/os": "linux"}
        # c2's agents were not told about c3.
        assert find_node(lab.view(h3) or {}, "cnode") is None

        # The second etcd goes away: c1 keeps c2's nodes, shows clustermesh stale naming c2.
        lab.etcd["etcd-c2"].pause()
        try:

            def stale(view: Json) -> bool:
                src = view["sources"]["clustermesh"]
                return bool(src["stale"]) and "cluster c2" in (src["reason"] or "")

            lab.wait_until(stale, [h1], timeout=15)
            view = lab.view(h1)
            assert view is not None
            assert {n["name"] for n in view["nodes"]} == {"h1", "h2", "h3", "h4", "cnode"}
        finally:
            lab.etcd["etcd-c2"].resume()
        lab.wait_until(lambda v: not v["sources"]["clustermesh"]["stale"], [h1], timeout=20)


def test_clustermesh_config_errors_name_the_key(tmp_path: Path) -> None:
    base = (
        '[node]\nname = "n1"\ncluster = "c1"\naddresses = ["127.0.0.1"]\n'
        '[probing]\ninterval = "2s"\ntimeout = "500ms"\n'
        '[sources.static]\nnodes = [{name = "n2", addresses = ["127.0.0.2"]}]\n'
    )
    cases = [
        ("[clustermesh]\nclusters = []\n", "clustermesh.clusters: list at least one"),
        ('[clustermesh]\nclusters = [{name = "c1", endpoints = ["http://127.0.0.1:2379"]}]\n',
         "clustermesh.clusters[0].name: 'c1' is this node's own cluster"),
        ('[clustermesh]\nclusters = [{name = "c2"}]\n',
         "clustermesh.clusters[0]: give either endpoints"),
        ('[clustermesh]\nclusters = [{name = "c2", endpoints = ["127.0.0.1:2379"]}]\n',
         "clustermesh.clusters[0].endpoints[0]"),
        ('[clustermesh]\nclusters = [{name = "c2", endpoints = ["http://h:1"], format = "x"}]\n',
         "clustermesh.clusters[0].format"),
        ('[clustermesh]\ninterval = "1s"\nclusters = [{name = "c2", nodes = [{name = "a", '
         'addresses = ["10.0.0.1"]}]}]\n', "clustermesh.interval: must not be shorter"),
        ('[clustermesh]\nclusters = [{name = "c2", nodes = [{name = "a", '
         'addresses = ["10.0.0.300"]}]}]\n', "clustermesh.clusters[0].nodes[0].addresses[0]"),
        ('[clustermesh]\nclusters = [{name = "c2", endpoints = ["https://h:1"], '
         'tls = {ca = "missing.pem"}}]\n', "clustermesh.clusters[0].tls.ca"),
        ('[sources.etcd]\nendpoints = ["http://127.0.0.1:2379"]\nlease_ttl = "1s"\n',
         "sources.etcd.lease_ttl"),
        ('[sources.etcd]\nendpoints = ["http://127.0.0.1:2379"]\nusername = "u"\n',
         "sources.etcd.password: required with a username"),
        ('[sources.etcd]\nendpoints = ["http://127.0.0.1:2379"]\ntls = {cert = "c.pem"}\n',
         "sources.etcd.tls.key"),
    ]  # fmt: skip
    for i, (extra, expected) in enumerate(cases):
        path = tmp_path / f"c{i}.toml"
        path.write_text(base + extra)
        out = run_cli("config", "check", "-c", str(path))
        assert out.returncode == 2, (extra, out.stdout, out.stderr)
        assert expected in out.stderr, (expected, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 2
