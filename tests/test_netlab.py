"""The test bed itself: a real mesh in namespaces, contained, and cleaned up whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT
from tests.netlab import (
    NET4,
    NET6,
    PREFIX,
    STATE_ROOT,
    Lab,
    cleanup_leftovers,
    find_node,
    lab_namespaces,
    sh,
)
from tests.netlab.fixtures import *  # noqa: F403


def test_every_agent_sees_every_host_and_endpoint_by_every_kind_over_ipv4_and_ipv6(
    netlab: Lab,
) -> None:
    for h in netlab.hosts:
        view = netlab.view(h)
        assert view is not None
        summary = {k: view["summary"][k] for k in ("nodes", "reachable", "unreachable", "unknown")}
        assert summary == {"nodes": 4, "reachable": 4, "unreachable": 0, "unknown": 0}
        for peer in netlab.hosts:
            node = find_node(view, peer.name)
            assert node is not None
            got = {(p["address"], p["role"]) for p in node["paths"]}
            assert got == {
                (peer.addr4, "host"), (peer.addr6, "host"),
                (peer.ep4, "endpoint"), (peer.ep6, "endpoint"),
            }
            for p in node["paths"]:
                assert set(p["probes"]) == set(netlab.kinds)
        # Each agent has its own config, log and socket.
        assert h.config.is_file() and h.log.is_file()
        assert not netlab.api or h.socket.exists()


def test_lab_addresses_exist_only_inside_the_lab_namespaces(netlab: Lab) -> None:
    outside = sh("ip", "-o", "addr").stdout
    assert f"{NET4}." not in outside and NET6 not in outside
    assert not [line for line in sh("ip", "-o", "link").stdout.splitlines()
                if "lxc_health" in line]
    # The switch has no address beyond loopback and the kernel's link-local ones: it forwards.
    bridge = sh("ip", "-n", netlab.bridge_ns, "-o", "addr").stdout.splitlines()
    assert [a for a in bridge if " lo " not in a and "scope link" not in a] == []
    assert set(lab_namespaces()[netlab.id]) == {
        netlab.bridge_ns, *(h.ns for h in netlab.hosts), *(h.ep_ns for h in netlab.hosts)
    }


SCRIPT = """
import sys, time
from tests.netlab import Lab
lab = Lab(2, endpoints=False, kinds=["http"])
lab.start()
print(lab.id, lab.hosts[0].agent.proc.pid, lab.hosts[1].agent.proc.pid, flush=True)
time.sleep(120)
"""


def test_a_killed_run_leaves_no_agent_and_the_next_one_removes_its_namespaces() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        lab_id, *pids = line.split()
        assert lab_id in lab_namespaces()
    finally:
        proc.kill()
        proc.wait(10)
    # The agents die with the run that started them ...
    deadline = time.monotonic() + 5
    while any(_alive(int(p)) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(int(p)) for p in pids)
    # ... and the namespaces it left are removed by the next lab (or test session).
    cleanup_leftovers()
    assert lab_id not in lab_namespaces()
    assert not (STATE_ROOT / lab_id).exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


SIGTERM_SCRIPT = """
import time
from tests.netlab import lab
with lab(2, endpoints=False, kinds=["http"]) as the_lab:
    # The line is printed inside the with block: the test sends SIGTERM as soon as it reads
    # it, and a signal handled between the print and a later try/finally (the window the
    # script once had) skipped the teardown under load.
    print(the_lab.id, flush=True)
    time.sleep(120)
"""


def test_sigterm_while_a_lab_is_open_tears_it_down() -> None:
    script = SIGTERM_SCRIPT
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lab_id = proc.stdout.readline().split()[0]
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    finally:
        proc.kill()
        proc.wait(10)
    assert lab_id not in lab_namespaces()
    assert not (STATE_ROOT / lab_id).exists()


def test_the_command_for_humans_brings_a_lab_up_shows_it_and_takes_it_down() -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tests.netlab", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=90,
        )

    up = cli("up", "2", "--no-endpoints")
    assert up.returncode == 0, up.stderr
    lab_id = up.stdout.split()[1].rstrip(":")
    try:
        assert f"{PREFIX}{lab_id}-h1" in up.stdout
        status = cli("status")
        assert status.returncode == 0, status.stderr
        block = status.stdout.split(f"lab {lab_id}", 1)[1]
        assert "h1: 2/2 reachable" in block and "h2: 2/2 reachable" in block, status.stdout
    finally:
        down = cli("down", lab_id)
    assert down.returncode == 0, down.stderr
    assert f"lab {lab_id} removed" in down.stdout
    assert lab_id not in lab_namespaces()
