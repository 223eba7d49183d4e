"""The mesh matrix and its verdicts on the real thing: four agents in netlab sharing rows
through a real etcd, faults injected with iptables, each verdict named within a stated bound.

One lab serves every scenario (module-scoped); each test injects its fault, waits until the
verdicts are exactly the expected one, and heals the lab. Bounds (docs/mesh.md):

- network faults (isolated observer, link, one direction, port 4240, ICMP): the probe
  interval + ``rows_min_gap`` + 3 s after the fault;
- node down: the same for the first verdict, lease_ttl more for the certain one (heartbeat
  expired); agent down: lease_ttl + interval + 3 s (it rests on the expired heartbeat);
- 20% loss: two rolling windows (WINDOW samples at one per interval) + 3 s: one window of
  lossy samples gives the right loss only on average (docs/mesh.md).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from tests.conftest import ROOT
from tests.netlab import Host, LabError, api_get
from tests.test_etcd_mesh import ETCD_BASE, INTERVAL, LEASE_TTL, EtcdLab, etcd_section

Json = dict[str, Any]
ROWS_GAP = 0.5
#: Samples in each path's rolling window: the loss a row carries is over the last WINDOW.
WINDOW = 20
NET_BOUND = INTERVAL + ROWS_GAP + 3.0
HEARTBEAT_BOUND = LEASE_TTL + INTERVAL + 3.0
LOSS_BOUND = 2 * WINDOW * INTERVAL + 3.0
#: The healthy mesh under 5% loss is watched this long (docs/mesh.md: at a 1 s interval this
#: is 6 times the rounds of the issue's 5 minutes at the default 30 s).
SOAK = 60.0
SCHEMA = json.loads((ROOT / "docs" / "mesh.schema.json").read_text())


def sections(host: Host, lab: EtcdLab) -> str:
    secret = lab.data_dir / "indirect.secret"
    secret.write_text("a shared secret of the lab's agents\n")
    return etcd_section(host, lab) + "\n".join([
        "",
        f'rows_min_gap = "{ROWS_GAP:g}s"',
        "indirect_k = 2",  # every unreachable target is also asked about to two others
        f'indirect_secret_file = "{secret}"',
    ]) + "\n"  # fmt: skip


@pytest.fixture(scope="module")
def mlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdLab]:
    lab = EtcdLab(4, sections=sections, data_dir=tmp_path_factory.mktemp("mesh"))
    lab.probing["window"] = WINDOW
    with lab:
        wait_mesh(lab, lab.hosts[0], lambda m: healthy(m, 4), 20)
        yield lab


@pytest.fixture
def lab(mlab: EtcdLab) -> Iterator[EtcdLab]:
    yield mlab
    mlab.heal(timeout=30)
    for h in mlab.hosts:
        wait_mesh(mlab, h, lambda m: healthy(m, 4), 25)


def nid(h: Host) -> str:
    return f"default/{h.name}"


def mesh(h: Host) -> Json:
    return api_get(h.socket, "/v1/mesh")


def healthy(m: Json, n: int) -> bool:
    return len(m["observers"]) == n and not m["verdicts"] and all(
        c["state"] == "reachable" for row in m["cells"].values() for c in row.values()
    )


def found(m: Json) -> set[tuple[str, str]]:
    return {(v["kind"], json.dumps(v["subject"])) for v in m["verdicts"]}


def wait_mesh(lab: EtcdLab, h: Host, pred: Any, timeout: float) -> tuple[Json, float]:
    """Poll ``h``'s /v1/mesh until ``pred`` holds; (the matrix, seconds it took)."""
    t0 = time.monotonic()
    last: Json | None = None
    while time.monotonic() - t0 < timeout:
        try:
            last = mesh(h)
        except LabError:
            last = None
        if last is not None and pred(last):
            return last, time.monotonic() - t0
        time.sleep(0.1)
    summary = None if last is None else {
        "observers": last["observers"], "verdicts": last["verdicts"],
        "cells": {o: {t: c["state"] for t, c in row.items()} for o, row in last["cells"].items()},
    }
    raise AssertionError(f"{h.name}: not within {timeout:g}s; last: {summary}")


def expect(
    lab: EtcdLab, observer: Host, kind: str, subject: Any, bound: float, t0: float
) -> Json:
    """Wait until ``observer``'s verdicts are exactly ``[(kind, subject)]``, at most ``bound``
    seconds after ``t0`` (when the fault was injected)."""
    want = {(kind, json.dumps(subject))}
    m, _ = wait_mesh(lab, observer, lambda m: found(m) == want, bound + 15)
    took = time.monotonic() - t0
    jsonschema.validate(m, SCHEMA)
    print(f"{kind} {subject}: {took:.1f}s (bound {bound:g}s)")
    assert took <= bound, f"{kind} named after {took:.1f}s, bound {bound:g}s"
    return m


def rule(lab: EtcdLab, h: Host, chain: str, spec: str, fams: tuple[int, ...] = (4, 6)) -> None:
    lab._rule(h, chain, spec, fams)


def lossy(lab: EtcdLab, h: Host, p: float) -> None:
    """Drop packets arriving at ``h`` with probability ``p``; etcd's traffic is spared (the
    store is another network in production; here its sessions would time out)."""
    stat = f"-m statistic --mode random --probability {p:.6f} -j DROP"
    rule(lab, h, "INPUT", f"-i eth0 ! -s {ETCD_BASE} {stat}", (4,))
    rule(lab, h, "INPUT", f"-i eth0 {stat}", (6,))


def test_a_steady_mesh_writes_no_row_until_the_refresh(lab: EtcdLab) -> None:
    etcd = lab.etcd["etcd"]
    before = [row_version(etcd, h) for h in lab.hosts]
    assert all(before)
    time.sleep(5)
    assert [row_version(etcd, h) for h in lab.hosts] == before


def test_node_down_all_its_traffic_dropped(lab: EtcdLab) -> None:
    h1, _, h3, _ = lab.hosts
    t0 = time.monotonic()
    for chain, spec in (("INPUT", "-i eth0 -j DROP"), ("OUTPUT", "-o eth0 -j DROP"),
                        ("FORWARD", "-j DROP")):
        rule(lab, h3, chain, spec)
    expect(lab, h1, "node-down", nid(h3), NET_BOUND, t0)
    # Once its heartbeat expires, the verdict is certain.
    m, _ = wait_mesh(
        lab, h1, lambda m: [v["confidence"] for v in m["verdicts"]] == [1.0], HEARTBEAT_BOUND
    )
    took = time.monotonic() - t0
    print(f"node-down certain (heartbeat expired) after {took:.1f}s (bound {HEARTBEAT_BOUND:g}s)")
    assert took <= HEARTBEAT_BOUND
    assert found(m) == {("node-down", json.dumps(nid(h3)))}
    assert "heartbeat expired" in m["verdicts"][0]["evidence"]
    # h1 asked two others to probe h3 (SWIM's ping-req): neither reaches it.
    m, _ = wait_mesh(lab, h1, lambda m: "indirect probes: 0/2 helpers reach default/h3"
                     in " ".join(v["evidence"] for v in m["verdicts"]), INTERVAL * 2 + 5)
    assert m["indirect"][nid(h3)]["failed"] == sorted([nid(lab.hosts[1]), nid(lab.hosts[3])])


def test_agent_down_host_up(lab: EtcdLab) -> None:
    h1, h2, _, _ = lab.hosts
    t0 = time.monotonic()
    lab.kill_agent(h2, signal.SIGKILL)
    m = expect(lab, h1, "agent-down", nid(h2), HEARTBEAT_BOUND, t0)
    assert nid(h2) not in m["observers"]  # its row went with its lease
    if "icmp" in lab.kinds:
        assert "icmp" in m["verdicts"][0]["evidence"]


def test_one_observer_isolated(lab: EtcdLab) -> None:
    h1, _, _, h4 = lab.hosts
    t0 = time.monotonic()
    # h4 cannot start a probe (echo requests and connections to 4240 leave no more), while
    # it still answers the others' and still reaches etcd.
    rule(lab, h4, "OUTPUT", "-o eth0 -p {icmp} -j DROP")
    rule(lab, h4, "OUTPUT", "-o eth0 -p tcp --dport 4240 --syn -j DROP")
    expect(lab, h1, "observer-isolated", nid(h4), NET_BOUND, t0)


def test_one_link_cut_both_directions_and_the_mesh_command(lab: EtcdLab) -> None:
    h1, h2, h3, _ = lab.hosts
    t0 = time.monotonic()
    lab.drop(h1, h3, both=True)
    expect(lab, h2, "link", [nid(h1), nid(h3)], NET_BOUND, t0)
    wait_mesh(lab, h1, lambda m: found(m) == {("link", json.dumps([nid(h1), nid(h3)]))}, 10)
    # h1 asked the two others about h3: both reach it, so the fault is the link.
    m, _ = wait_mesh(lab, h1, lambda m: "indirect probes: 2/2 helpers reach default/h3"
                     in " ".join(v["evidence"] for v in m["verdicts"]), INTERVAL * 2 + 5)
    assert m["indirect"][nid(h3)]["reached"] == [nid(h2), nid(lab.hosts[3])]
    out = subprocess.run(
        [sys.executable, "-m", "healthmesh", "mesh", "-H", f"unix://{h1.socket}"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    print(out.stdout)
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "Verdicts:"
    assert "the link between h1 and h3 is cut" in lines[1]
    row = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  h")}
    assert row["h1"] == ["·", "✔", "✘", "✔"] and row["h3"] == ["✘", "✔", "·", "✔"]
    assert row["h2"] == ["✔", "·", "✔", "✔"]
    js = subprocess.run(
        [sys.executable, "-m", "healthmesh", "mesh", "-H", f"unix://{h1.socket}", "-o", "json"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert js.returncode == 1
    jsonschema.validate(json.loads(js.stdout), SCHEMA)
    # `status` on h1 shows the verdict about h1 on top.
    st = subprocess.run(
        [sys.executable, "-m", "healthmesh", "status", "-H", f"unix://{h1.socket}"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert "Mesh verdicts about this node:" in st.stdout
    assert st.stdout.index("Mesh verdicts") < st.stdout.index("Cluster health")


def test_one_direction_cut(lab: EtcdLab) -> None:
    _, h2, _, h4 = lab.hosts
    t0 = time.monotonic()
    # h2 cannot open anything towards h4; h4's probes of h2 (and their answers) go through.
    for addr, fam in ((h4.addr4, 4), (h4.addr6, 6)):
        rule(lab, h2, "OUTPUT", f"-o eth0 -d {addr} -m conntrack --ctstate NEW -j DROP", (fam,))
    expect(lab, lab.hosts[0], "asymmetric", [nid(h2), nid(h4)], NET_BOUND, t0)


def test_port_4240_filtered_on_one_host(lab: EtcdLab) -> None:
    h1, h2, _, _ = lab.hosts
    t0 = time.monotonic()
    lab.block_tcp(h2)
    expect(lab, h1, "port-filtered", nid(h2), NET_BOUND, t0)


def test_icmp_filtered_on_one_host(lab: EtcdLab) -> None:
    if "icmp" not in lab.kinds:
        pytest.fail("the icmp probe kind is not loaded")
    _, _, h3, h4 = lab.hosts
    t0 = time.monotonic()
    lab.drop_icmp(h3)
    expect(lab, h4, "icmp-filtered", nid(h3), NET_BOUND, t0)


def test_twenty_percent_loss_on_one_host_is_degraded(lab: EtcdLab) -> None:
    h1, _, h3, _ = lab.hosts
    t0 = time.monotonic()
    lossy(lab, h3, 0.20)
    m = expect(lab, h1, "degraded", nid(h3), LOSS_BOUND, t0)
    assert "loss" in m["verdicts"][0]["evidence"]


def test_no_verdict_on_a_healthy_mesh_at_five_percent_loss(lab: EtcdLab) -> None:
    etcd = lab.etcd["etcd"]

    def writes() -> int:
        return sum(row_version(etcd, h) for h in lab.hosts)

    before, t0 = writes(), time.monotonic()
    for h in lab.hosts:
        lossy(lab, h, 0.05)
    t_end = time.monotonic() + SOAK
    polls = 0
    worst = 0.0
    while time.monotonic() < t_end:
        for h in lab.hosts:
            m = mesh(h)
            polls += 1
            assert m["verdicts"] == [], f"{h.name}: {m['verdicts']}"
            assert len(m["observers"]) == 4, f"{h.name}: rows of {m['observers']}"
            for row in m["cells"].values():
                for c in row.values():
                    assert c["state"] == "reachable", f"{h.name}: {c}"
                    worst = max(worst, c["loss_pct"] or 0.0)
        time.sleep(0.5)
    rate = (writes() - before) / (time.monotonic() - t0)
    print(f"{polls} polls over {SOAK:g}s, no verdict; worst cell loss {worst:.1f}%; "
          f"row writes {rate:.2f}/s for the 4 agents")
    assert worst > 0  # the loss was really there
    # Each agent writes at most once per rows_min_gap, whatever its loss bands do.
    assert rate <= 4 / ROWS_GAP


def row_version(etcd: Any, h: Host) -> int:
    """How many times the host's row key was written since it was created."""
    import base64

    key = base64.b64encode(f"healthmesh/rows/v1/default/{h.name}".encode()).decode()
    kvs = etcd.call("/v3/kv/range", {"key": key}).get("kvs", [])
    return int(kvs[0]["version"]) if kvs else 0
