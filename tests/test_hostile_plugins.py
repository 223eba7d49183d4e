"""Hostile and broken plugins cannot take the command line or the agent down (issue 12, 6-7).

Every plugin here is a real installed distribution (dist-info with an entry point, on
PYTHONPATH) loaded by a real ``healthmesh`` subprocess; agents are real processes with a
real responder and a real API socket.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from healthmesh.core.health import ComponentHealth
from tests.agentproc import AgentProc, free_port
from tests.conftest import run_cli
from tests.test_plugins import fake_distribution

#: Generous bounds: the machine is shared and loaded, and these are about seconds vs. hangs.
CLI_BOUND = 20.0
HELLO_BOUND = 0.5
STOP_BOUND = 5.0


def install(tmp_path: Path, code: str, name: str = "hostile") -> dict[str, str]:
    """Install a plugin distribution ``healthmesh-<name>``; the env that makes it visible."""
    site = tmp_path / "site"
    fake_distribution(site, f"healthmesh-{name}", name, f"hm_{name}", code)
    return {"PYTHONPATH": str(site), "MARK": str(tmp_path / "mark.log")}


def plugins_json(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    proc = run_cli("plugins", "--json", env=env, timeout=CLI_BOUND)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return {p["name"]: p for p in json.loads(proc.stdout)}


def agent_config(tmp_path: Path, extra: str = "") -> tuple[Path, int, Path]:
    """An agent with its responder on a free port, its API socket in tmp_path, http probes."""
    port = free_port()
    sock = tmp_path / "api.sock"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f"""
[node]
name = "me"
addresses = ["127.0.0.1"]
[probing]
interval = "1s"
timeout = "300ms"
[responder]
listen = ["127.0.0.1:{port}", "127.0.0.2:{port}"]
[outputs.api]
socket = "{sock}"
[probes.icmp]
enabled = false
[probes.http]
port = {port}
[sources.static]
nodes = [{{name = "peer", addresses = ["127.0.0.2"]}}]
{extra}
"""
    )
    return cfg, port, sock


def component(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    for c in doc.get("components", []):
        if c["name"] == name:
            return c
    return None


def hello_rtt(port: int, timeout: float = 5.0) -> float:
    """Seconds until the responder answers one ``GET /hello`` on a fresh connection."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 200"), data
    return time.monotonic() - start


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- the plugin contract: hooks go through pluggy ------------------------------------------


FEWER_ARGS = """
import os
from healthmesh import Probe, ProbeResult, hookimpl

class Quiet(Probe):
    name = "quiet"

@hookimpl
def register_services():
    # Takes fewer arguments than the spec: legal in pluggy.
    with open(os.environ["MARK"], "a") as f:
        f.write("register_services\\n")

@hookimpl
def register_probe_kinds(register):
    register(Quiet)
"""


def test_a_hookimpl_taking_fewer_arguments_than_its_spec_works(tmp_path: Path) -> None:
    env = install(tmp_path, FEWER_ARGS)
    p = plugins_json(env)["hostile"]
    assert p["status"] == "loaded", p
    assert p["provides"] == {"probe kind": ["quiet"]}
    assert sorted(p["hooks"]) == ["register_probe_kinds", "register_services"]
    assert "register_services" in Path(env["MARK"]).read_text()


WRAPPER = """
import os
from healthmesh import hookimpl

@hookimpl(wrapper=True)
def register_probe_kinds(register):
    result = yield
    with open(os.environ["MARK"], "a") as f:
        f.write("probe kinds registered\\n")
    return result
"""


def test_a_hook_wrapper_sees_the_register_calls(tmp_path: Path) -> None:
    env = install(tmp_path, WRAPPER)
    listing = plugins_json(env)
    assert listing["hostile"]["status"] == "loaded"
    # Each plugin's hook is still attributed to that plugin.
    assert listing["tcp"]["provides"] == {"probe kind": ["tcp"]}
    assert listing["http"]["provides"]["probe kind"] == ["http"]
    implementers = [n for n, p in listing.items() if "register_probe_kinds" in p["hooks"]]
    calls = Path(env["MARK"]).read_text().splitlines()
    # One call per implementing plugin (the wrapper's own plugin implements none), each
    # time the command line loads the plugins.
    per_load = len(implementers) - 1
    assert per_load >= 3 and calls and len(calls) % per_load == 0, (calls, implementers)


RAISES = """
from healthmesh import hookimpl

@hookimpl
def register_probe_kinds(register):
    raise RuntimeError("kaboom from a broken plugin")
"""

SLEEPS = """
import time
from healthmesh import hookimpl

@hookimpl
def register_peer_sources(register):
    time.sleep(120)
"""

HANGS_AT_IMPORT = """
import time
time.sleep(120)
"""


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (RAISES, "register_probe_kinds raised RuntimeError: kaboom"),
        (SLEEPS, "register_peer_sources did not return within"),
        (HANGS_AT_IMPORT, "import did not return within"),
    ],
    ids=["hook-raises", "hook-sleeps", "import-hangs"],
)
def test_a_broken_or_slow_plugin_is_skipped_and_every_command_works(
    tmp_path: Path, code: str, error: str
) -> None:
    env = install(tmp_path, code)

    start = time.monotonic()
    proc = run_cli("--help", env=env, timeout=CLI_BOUND)
    assert proc.returncode == 0, proc.stderr
    assert "Commands:" in proc.stdout and "status" in proc.stdout
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "hostile" in line]
    assert len(warnings) == 1 and error in warnings[0], proc.stderr
    assert time.monotonic() - start < CLI_BOUND

    proc = run_cli("status", "-H", f"unix://{tmp_path}/none.sock", env=env, timeout=CLI_BOUND)
    assert proc.returncode == 3, proc.stderr  # "no agent answers", not a crash
    assert "Traceback" not in proc.stderr

    p = plugins_json(env)["hostile"]
    assert p["status"] == "failed" and error in p["error"], p
    assert p["provides"] == {}


# -- probes that misbehave at run time -------------------------------------------------------


PROBES = """
import time
import anyio
from healthmesh import Probe, ProbeResult, hookimpl

class Brittle(Probe):
    name = "brittle"

    async def __aenter__(self):
        raise ValueError("no frobnicator here")

class Deaf(Probe):
    name = "deaf"

    async def probe(self, path, timeout):
        while True:  # swallows every cancellation
            try:
                await anyio.sleep(3600)
            except BaseException:
                pass

class Sleepy(Probe):
    name = "sleepy"

    async def probe(self, path, timeout):
        time.sleep(2.0)  # blocks its event loop
        return ProbeResult.success(0.001)

@hookimpl
def register_probe_kinds(register):
    for cls in (Brittle, Deaf, Sleepy):
        register(cls)
"""


def test_a_probe_whose_aenter_raises_is_switched_off_and_the_agent_runs(tmp_path: Path) -> None:
    env = install(tmp_path, PROBES)
    cfg, port, _ = agent_config(tmp_path, "[probes.brittle]\n")
    with AgentProc(cfg, env=env) as agent:
        doc = agent.next_doc(timeout=15)
        assert doc["probe_kinds"] == ["http"]
        brittle = component(doc, "probes.brittle")
        assert brittle is not None and brittle["state"] == "failed", doc["components"]
        assert "ValueError: no frobnicator here" in brittle["message"]
        assert hello_rtt(port) < HELLO_BOUND
        code, took = agent.stop()
    assert code == 0 and took < STOP_BOUND, agent.stderr()
    assert "Traceback" not in agent.stderr()


@pytest.mark.parametrize("kind", ["deaf", "sleepy"])
def test_a_probe_that_blocks_or_swallows_cancellation_cannot_stall_the_agent(
    tmp_path: Path, kind: str
) -> None:
    env = install(tmp_path, PROBES)
    cfg, port, sock = agent_config(tmp_path, f"[probes.{kind}]\n")
    with AgentProc(cfg, env=env) as agent:
        wait_listening(port)
        # The responder answers promptly all along, while the kind misbehaves.
        deadline = time.monotonic() + 4.0
        worst = 0.0
        while time.monotonic() < deadline:
            worst = max(worst, hello_rtt(port))
            time.sleep(0.05)
        assert worst < HELLO_BOUND, f"/hello took {worst:.3f}s"
        # Rounds go on, and the kind is switched off with its reason.
        doc = agent.wait_for(
            lambda d: (component(d, f"probes.{kind}") or {}).get("state") == "failed",
            timeout=15,
        )
        assert kind not in doc["probe_kinds"] and "http" in doc["probe_kinds"]
        assert doc["round"]["completed"] >= 2
        later = agent.next_doc(timeout=5)
        assert later["round"]["completed"] > doc["round"]["completed"]
        # The API answers too.
        proc = run_cli("status", "-H", f"unix://{sock}", "-o", "json", timeout=CLI_BOUND)
        # 4: every node reachable, but a component (the switched-off kind) has failed.
        assert proc.returncode == 4, proc.stderr
        assert json.loads(proc.stdout)["probe_kinds"] == ["http"]
        code, took = agent.stop(timeout=15)
    assert took < STOP_BOUND, f"SIGTERM took {took:.1f}s; stderr:\n{agent.stderr()}"
    assert code == 0, agent.stderr()
    assert not sock.exists() and not Path(f"{sock}.lock").exists()
    assert "switched off" in agent.stderr()


# -- supervision ---------------------------------------------------------------------------

FLAKY = """
import anyio
from healthmesh import Output, Service, hookimpl

class FlakyOutput(Output):
    name = "flaky"
    runs = 0

    async def run(self, *, task_status):
        type(self).runs += 1
        task_status.started()
        if type(self).runs == 1:
            await anyio.sleep(0.3)
            raise RuntimeError("output fell over")
        await anyio.sleep_forever()

class FlakyService(Service):
    name = "flakysvc"
    section = "flakysvc"
    runs = 0

    async def run(self, *, task_status):
        type(self).runs += 1
        task_status.started()
        if type(self).runs <= 2:
            await anyio.sleep(0.2)
            raise ConnectionError("service lost its socket")
        await anyio.sleep_forever()

class Reporter(Output):
    name = "reporter"

    async def run(self, *, task_status):
        task_status.started()
        self.context.report(self, "degraded", "upstream is slow")
        await anyio.sleep_forever()

class Doomed(Service):
    name = "doomed"
    section = "doomed"

    async def run(self, *, task_status):
        task_status.started()
        await anyio.sleep(0.05)
        raise RuntimeError("doomed again")

@hookimpl
def register_outputs(register):
    register(FlakyOutput)
    register(Reporter)

@hookimpl
def register_services(register):
    register(FlakyService)
    register(Doomed)
"""


def test_crashed_components_are_restarted_and_shown(tmp_path: Path) -> None:
    env = install(tmp_path, FLAKY)
    cfg, port, _ = agent_config(tmp_path, "[outputs.flaky]\n[flakysvc]\n[outputs.reporter]\n")
    with AgentProc(cfg, env=env) as agent:
        doc = agent.wait_for(
            lambda d: (component(d, "outputs.flaky") or {}).get("restarts") == 1
            and (component(d, "flakysvc") or {}).get("restarts") == 2
            and component(d, "outputs.flaky")["state"] == "ok"
            and component(d, "flakysvc")["state"] == "ok",
            timeout=20,
        )
        names = {c["name"]: c for c in doc["components"]}
        assert {"responder", "outputs.api", "sources.static", "probes.http"} <= set(names)
        assert all(set(c) == {"name", "state", "message", "since", "restarts"}
                   for c in doc["components"])
        assert names["responder"]["state"] == "ok" and names["responder"]["restarts"] == 0
        # A component reports its own state.
        assert names["outputs.reporter"]["state"] == "degraded"
        assert names["outputs.reporter"]["message"] == "upstream is slow"
        assert hello_rtt(port) < HELLO_BOUND
        code, _ = agent.stop()
    assert code == 0
    err = agent.stderr()
    assert "outputs.flaky crashed: RuntimeError: output fell over" in err
    assert "Traceback" not in err


def test_a_component_that_cannot_be_restarted_stops_the_agent_with_exit_4(
    tmp_path: Path,
) -> None:
    env = install(tmp_path, FLAKY)
    cfg, _, sock = agent_config(tmp_path, "[doomed]\n")
    with AgentProc(cfg, env=env) as agent:
        agent.next_doc(timeout=15)
        try:
            code = agent.proc.wait(timeout=30)
        except Exception:
            raise AssertionError("the agent kept running; stderr:\n" + agent.stderr()) from None
    assert code == 4, agent.stderr()
    err = agent.stderr()
    assert "doomed crashed 5 times" in err and "exit code 4" in err
    assert "Traceback" not in err
    assert not sock.exists() and not Path(f"{sock}.lock").exists()


# -- signals and outputs ---------------------------------------------------------------------


def test_sighup_shuts_the_agent_down_cleanly(tmp_path: Path) -> None:
    cfg, _, sock = agent_config(tmp_path)
    with AgentProc(cfg) as agent:
        agent.next_doc(timeout=15)
        assert sock.exists() and Path(f"{sock}.lock").exists()
        code, took = agent.stop(signal.SIGHUP)
    assert code == 0, agent.stderr()
    assert took < STOP_BOUND
    assert "received SIGHUP, shutting down" in agent.stderr()
    assert not sock.exists() and not Path(f"{sock}.lock").exists()


TICKER = """
import click
from healthmesh import Output, hookimpl

class Ticker(Output):
    name = "ticker"
    console = True

    async def close(self, snapshot):
        s = snapshot.summary
        click.echo(f"ticker: {s['reachable']}/{s['nodes']} reachable")

@hookimpl
def register_outputs(register):
    register(Ticker)
"""


def test_run_output_choices_come_from_the_output_registry(tmp_path: Path) -> None:
    env = install(tmp_path, TICKER)
    proc = run_cli("run", "--help", env=env, timeout=CLI_BOUND)
    assert "[json|table|ticker]" in proc.stdout, proc.stdout
    cfg, _, _ = agent_config(tmp_path)
    proc = run_cli("run", "-c", str(cfg), "--once", "-o", "ticker", env=env, timeout=CLI_BOUND)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ticker: 2/2 reachable"
    proc = run_cli("run", "-c", str(cfg), "--once", "-o", "nope", env=env, timeout=CLI_BOUND)
    assert proc.returncode == 2 and "ticker" in proc.stderr


def test_the_watchdog_ends_a_shutdown_that_does_not_finish(tmp_path: Path) -> None:
    """A built-in-like stall cannot be contained: the hard-exit deadline still ends it."""
    env = install(tmp_path, STUCK_OUTPUT)
    cfg, _, _ = agent_config(tmp_path, "[outputs.stuck]\n")
    with AgentProc(cfg, env=env) as agent:
        agent.next_doc(timeout=15)
        code, took = agent.stop(timeout=15)
    assert took < 4.0 + STOP_BOUND, f"took {took:.1f}s"
    assert code == 0, agent.stderr()
    err = agent.stderr()
    assert "event loop has been blocked" in err  # the watchdog's warning
    assert "shutdown did not finish within its deadline" in err
    assert "Traceback" not in err


def test_component_states_are_checked_and_keep_their_since() -> None:
    health = ComponentHealth()
    health.set("outputs.x", "ok")
    since = health.listing()[0]["since"]
    health.set("outputs.x", "ok", "still fine")
    assert health.listing() == [
        {"name": "outputs.x", "state": "ok", "message": "still fine", "since": since,
         "restarts": 0}
    ]
    with pytest.raises(ValueError, match="ok, degraded, failed"):
        health.set("outputs.x", "sad")
    health.set("outputs.x", "failed", "x" * 1000)
    assert len(health.listing()[0]["message"]) == 300


STUCK_OUTPUT = """
import time
from healthmesh import Output, hookimpl

class Stuck(Output):
    name = "stuck"

    async def close(self, snapshot):
        time.sleep(60)  # blocks the agent's own loop at shutdown

@hookimpl
def register_outputs(register):
    register(Stuck)
"""
