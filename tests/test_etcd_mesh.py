"""Agents in netlab find each other through etcd alone: join, leave, crash, and an etcd outage.

etcd runs inside the lab's bridge namespace (the "switch", 10.231.0.250), so every host
reaches it over the lab network and nothing leaves the namespaces the test created.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, require
from tests.etcd_fixtures import EtcdServer
from tests.netlab import (
    AgentProcess,
    Host,
    Lab,
    cleanup_leftovers,
    find_node,
    sh,
    unavailable_reason,
)

INTERVAL = 1.0
LEASE_TTL = 3.0
ETCD_BASE = "10.231.0.250"

Json = dict[str, Any]


class EtcdLab(Lab):
    """A netlab whose agents get their peers from etcd (and clustermesh), not from a file.

    ``etcds`` names the etcd servers to run on the switch (10.231.0.250, .251, ...);
    ``sections(host, lab)`` returns the TOML each host's config gets instead of
    ``[sources.file]``; ``cluster(host)`` its cluster; only the first ``initial`` agents
    start with the lab.
    """

    def __init__(
        self,
        hosts: int,
        *,
        etcds: tuple[str, ...] = ("etcd",),
        sections: Callable[[Host, EtcdLab], str],
        cluster: Callable[[Host], str] = lambda h: "default",
        initial: int | None = None,
        data_dir: Path,
        **kw: Any,
    ) -> None:
        super().__init__(hosts, probing={"interval": f"{INTERVAL:g}s"}, **kw)
        self.etcd_names = etcds
        self.sections = sections
        self.cluster_of = cluster
        self.initial = hosts if initial is None else initial
        self.data_dir = data_dir
        self.etcd: dict[str, EtcdServer] = {}

    def etcd_url(self, name: str) -> str:
        return self.etcd[name].url

    def _build_network(self) -> None:
        super()._build_network()
        for i, name in enumerate(self.etcd_names):
            addr = f"10.231.0.{250 + i}"
            sh("ip", "netns", "exec", self.bridge_ns, "ip", "addr", "add", f"{addr}/24",
               "dev", "br0")  # fmt: skip
            server = EtcdServer(
                self.data_dir / f"{name}-data", name=name, netns=self.bridge_ns, host=addr
            )
            self.etcd[name] = server.start()

    def _write_config(self, host: Host) -> None:
        super()._write_config(host)
        text = host.config.read_text()
        text = re.sub(r"\[sources\.file\]\npath = .*\npoll = .*\n", "", text)
        name = f'name = "{host.name}"\n'
        text = text.replace(name, f'{name}cluster = "{self.cluster_of(host)}"\n')
        host.config.write_text(text + self.sections(host, self) + "\n")

    def start(self, ready_timeout: float = 30.0) -> None:
        # Lab.start, but only the first ``initial`` agents, and ready means they see each other.
        reason = unavailable_reason()
        if reason:
            require(reason)
        cleanup_leftovers()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "lab.json").write_text(json.dumps(self.describe()))
        self._built = True
        self._build_network()
        for host in self.hosts:
            self._write_config(host)
            if host.endpoint:
                self._start_responder(host)
        for host in self.hosts[: self.initial]:
            host.agent = AgentProcess(host)
        self.wait_mesh(self.hosts[: self.initial], ready_timeout)

    def wait_mesh(self, hosts: list[Host], timeout: float = 20.0) -> dict[str, float]:
        """Wait until each of ``hosts`` sees exactly ``hosts``, every one reachable."""
        names = {h.name for h in hosts}

        def full(view: Json) -> bool:
            seen = {n["name"] for n in view["nodes"]}
            return seen == names and all(n["state"] == "reachable" for n in view["nodes"])

        return self.wait_until(full, hosts, timeout=timeout)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            for server in self.etcd.values():
                server.stop()


def etcd_section(host: Host, lab: EtcdLab, name: str = "etcd") -> str:
    return "\n".join([
        "[sources.etcd]",
        f'endpoints = ["{lab.etcd_url(name)}"]',
        f'lease_ttl = "{LEASE_TTL:g}s"',
        'timeout = "500ms"',
        'retry_max = "2s"',
    ])  # fmt: skip


@pytest.fixture
def lab4(tmp_path: Path) -> Iterator[EtcdLab]:
    with EtcdLab(4, sections=etcd_section, initial=3, data_dir=tmp_path) as lab:
        yield lab


def registered_at(host: Host, timeout: float = 15.0) -> float:
    """When the host's agent logged its registration in etcd (epoch seconds)."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(r"^(\S+) .*sources\.etcd: registered ", re.M)
    while time.monotonic() < deadline:
        m = pattern.search(host.log.read_text(errors="replace"))
        if m:
            return datetime.fromisoformat(m.group(1)).timestamp()
        time.sleep(0.05)
    raise AssertionError(f"{host.name} never registered:\n{host.log.read_text()[-3000:]}")


def leave(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", host.ns, sys.executable, "-m", "healthmesh", "leave",
         "-c", str(host.config), *args],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip


def test_agents_find_each_other_in_etcd_then_one_joins_one_leaves_one_crashes(
    lab4: EtcdLab,
) -> None:
    lab = lab4
    h1, h2, h3, h4 = lab.hosts
    for h in lab.hosts:  # no static peers anywhere: etcd is the only peer source
        text = h.config.read_text()
        assert "[sources.etcd]" in text and "sources.static" not in text
        assert "sources.file" not in text
    etcd = lab.etcd["etcd"]
    assert set(etcd.keys("healthmesh/nodes/v1/default/")) == {
        f"healthmesh/nodes/v1/default/h{i}" for i in (1, 2, 3)
    }

    # A fourth agent joins: every other agent probes it within two intervals of its
    # registration.
    lab.start_agent(h4)
    t_reg = registered_at(h4)
    met = lab.wait_mesh(lab.hosts, timeout=15)
    delays = {name: t - t_reg for name, t in met.items() if name != "h4"}
    assert max(delays.values()) <= 2 * INTERVAL + 0.3, delays
    print(f"h4 reachable on every peer {max(delays.values()):.2f}s after it registered")

    # A node that leaves (agent stopped, then `healthmesh leave`) disappears everywhere.
    refused = leave(h3)
    assert refused.returncode == 2 and "live heartbeat" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    lab.kill_agent(h3, signal.SIGTERM)
    done = leave(h3)
    assert done.returncode == 0, done.stderr
    assert "left the mesh" in done.stdout
    lab.wait_mesh([h1, h2, h4], timeout=10)

    # A node whose agent is killed stays, is unreachable (its 4240 responder died with the
    # agent) and its heartbeat shows expired: "agent down" while the host answers ICMP.
    lab.kill_agent(h2, signal.SIGKILL)

    def crashed(view: Json) -> bool:
        node = find_node(view, "h2")
        return (
            node is not None
            and node["state"] == "unreachable"
            and node["info"].get("heartbeat") == "expired"
        )

    lab.wait_until(crashed, [h1, h4], timeout=LEASE_TTL + 10)
    for h in (h1, h4):
        view = lab.view(h)
        assert view is not None
        assert {n["name"] for n in view["nodes"]} == {"h1", "h2", "h4"}
        node = find_node(view, "h2")
        assert node is not None
        host_paths = [p for p in node["paths"] if p["role"] == "host"]
        if "icmp" in lab.kinds:
            assert any(p["probes"]["icmp"]["state"] == "reachable" for p in host_paths)
        assert all(p["probes"]["http"]["state"] == "unreachable" for p in host_paths)
        other = find_node(view, "h4" if h is h1 else "h1")
        assert other is not None and other["info"]["heartbeat"] == "alive"
    assert etcd.get("healthmesh/nodes/v1/default/h2") is not None  # durable registration


def test_etcd_stopped_for_30s_loses_no_peer_and_raises_no_false_alarm(tmp_path: Path) -> None:
    with EtcdLab(3, sections=etcd_section, data_dir=tmp_path) as lab:
        etcd = lab.etcd["etcd"]
        names = {h.name for h in lab.hosts}
        stale_seen: set[str] = set()
        etcd.pause()
        try:
            t_end = time.monotonic() + 30
            while time.monotonic() < t_end:
                for h in lab.hosts:
                    view = lab.view(h)
                    assert view is not None, f"{h.name}'s agent died"
                    assert {n["name"] for n in view["nodes"]} == names, view
                    bad = [n["name"] for n in view["nodes"] if n["state"] != "reachable"]
                    assert not bad, f"{h.name} shows {bad} not reachable during the outage"
                    src = view["sources"]["etcd"]
                    if src["stale"]:
                        stale_seen.add(h.name)
                        assert "etcd" in src["reason"]
                time.sleep(0.2)
        finally:
            etcd.resume()
        assert stale_seen == names, "every agent shows the etcd source stale"
        for h in lab.hosts:
            assert "source etcd is stale" in h.log.read_text()

        def recovered(view: Json) -> bool:
            return not view["sources"]["etcd"]["stale"] and all(
                n["state"] == "reachable"
                and (n.get("local") or n["info"].get("heartbeat") == "alive")
                for n in view["nodes"]
            ) and len(view["nodes"]) == 3

        lab.wait_until(recovered, timeout=20)
        assert set(etcd.keys("healthmesh/nodes/v1/default/")) == {
            f"healthmesh/nodes/v1/default/{n}" for n in names
        }
        assert set(etcd.keys("healthmesh/alive/v1/default/")) == {
            f"healthmesh/alive/v1/default/{n}" for n in names
        }
