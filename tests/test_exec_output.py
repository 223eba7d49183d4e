"""The exec output runs a real command per event: JSON on stdin, killed after its timeout.

A real agent runs in-process (real responder and probes on loopback, a dead peer); the
command is a Python one-liner that records the event and its pid, and hangs on failures.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import pytest

from healthmesh.core.agent import Agent
from healthmesh.core.config import parse_raw
from healthmesh.core.plugins import PluginRegistry
from healthmesh.core.resolve import resolve
from tests.conftest import run_cli
from tests.events_support import event_validator
from tests.test_events_core import agent_text

pytestmark = pytest.mark.anyio

SCRIPT = (
    "import json, os, sys, time\n"
    "e = json.loads(sys.stdin.read())\n"
    "e['pid'] = os.getpid(); e['env_to'] = os.environ['HEALTHMESH_EVENT_TO']\n"
    "open(sys.argv[1], 'a').write(json.dumps(e) + '\\n')\n"
    "time.sleep(60 if e['to'] == 'unreachable' else 0)\n"
)


async def test_one_run_per_event_and_hung_runs_are_killed(tmp_path: Path) -> None:
    out = tmp_path / "events.ndjson"
    script = tmp_path / "hook.py"
    script.write_text(SCRIPT)
    extra = (f'[outputs.exec]\ncommand = {json.dumps([sys.executable, str(script), str(out)])}\n'
             'timeout = "1s"\nconcurrency = 2\ntypes = ["node"]\n')
    text, _ = agent_text(tmp_path, extra)
    registry = PluginRegistry().load()
    agent = Agent(resolve(parse_raw(text, "exec.toml"), registry), registry)
    ex = next(o for o in agent.outputs if o.name == "exec")

    def lines() -> list[dict]:
        return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []

    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        with anyio.fail_after(30):
            # 3 nodes added, 2 reachable, 1 unreachable: 6 node events.
            while len(lines()) < 6 or ex.stats()["timed_out"] < 1 or ex.stats()["queued"]:
                await anyio.sleep(0.05)
            rounds = agent.scheduler.completed_rounds
            while agent.scheduler.completed_rounds < rounds + 2:  # probing went on meanwhile
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    got = lines()
    node_events = [e for e in agent.events.replay(0) if e.type == "node"]
    validator = event_validator()
    for e in got:
        pid, env_to = e.pop("pid"), e.pop("env_to")
        validator.validate(e)
        assert env_to == e["to"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # every run has ended, the hung one killed
    assert sorted(e["seq"] for e in got) == [e.seq for e in node_events]
    st = ex.stats()
    assert st["timed_out"] == sum(1 for e in node_events if e.to == "unreachable") == 1
    assert st["ran"] == len(node_events) - 1 and st["dropped"] == 0


def test_bad_command_is_a_config_error(tmp_path: Path) -> None:
    text, _ = agent_text(tmp_path, '[outputs.exec]\ncommand = ["/nonexistent/hook"]\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    proc = run_cli("config", "check", "-c", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"healthmesh: error: {cfg}: outputs.exec.command: '/nonexistent/hook' is not an "
        "executable file or on PATH"]
