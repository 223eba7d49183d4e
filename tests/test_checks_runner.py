"""The check runner: hostile kinds become failed results, failures are confirmed, no flapping."""

from __future__ import annotations

import types
from typing import Any

import anyio
import pytest

from healthmesh import Check, CheckSettings, CheckUnavailable, ProbeResult, hookimpl
from healthmesh.core import checks as checks_mod
from healthmesh.core.agent import Agent
from healthmesh.core.checks import CheckRunner, build_entries
from healthmesh.core.config import parse_raw
from healthmesh.core.plugins import PluginRegistry, load_plugins
from healthmesh.core.resolve import resolve
from tests.test_api_support import agent_config, free_port

pytestmark = pytest.mark.anyio


class ListSettings(CheckSettings, kw_only=True):
    targets: list[str]


class Base(Check):
    Settings = ListSettings
    calls: dict[str, int]

    def targets(self) -> list[str]:
        return list(self.settings.targets)


class Raises(Base):
    name = "raises"

    async def check(self, target: str, timeout: float) -> ProbeResult:
        raise RuntimeError(f"boom {target}")


class Hangs(Base):
    name = "hangs"

    async def check(self, target: str, timeout: float) -> ProbeResult:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


class Junk(Base):
    name = "junk"

    async def check(self, target: str, timeout: float) -> Any:
        return {"ok": True}


class Good(Base):
    name = "good"

    async def check(self, target: str, timeout: float) -> ProbeResult:
        return ProbeResult.success(0.001, answer="yes")


class Flaky(Base):
    """Fails the first call of each target only."""

    name = "flaky"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.seen: set[str] = set()

    async def check(self, target: str, timeout: float) -> ProbeResult:
        if target not in self.seen:
            self.seen.add(target)
            return ProbeResult.failure("first call fails")
        return ProbeResult.success(0.001)


class Unavailable(Base):
    name = "unavailable"

    async def __aenter__(self) -> Unavailable:
        raise CheckUnavailable("no CA file here")


class SlowStart(Base):
    name = "slowstart"

    async def __aenter__(self) -> SlowStart:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


class BadInit(Base):
    name = "badinit"

    def __init__(self, *args: Any) -> None:
        raise ValueError("cannot build")


class BadTargets(Base):
    name = "badtargets"

    def targets(self) -> list[str]:
        raise KeyError("targets")


KINDS = [Raises, Hangs, Junk, Good, Flaky, Unavailable, SlowStart, BadInit, BadTargets]


def hostile_plugin() -> types.ModuleType:
    module = types.ModuleType("hostile_checks")

    @hookimpl
    def register_check_kinds(register: Any) -> None:
        for cls in KINDS:
            register(cls)

    module.register_check_kinds = register_check_kinds  # type: ignore[attr-defined]
    return module


def registry() -> PluginRegistry:
    return load_plugins(extra={"hostile": hostile_plugin()})


def sections(names: list[str], **common: str) -> str:
    keys = "".join(f'{k} = "{v}"\n' if not v.isdigit() else f"{k} = {v}\n"
                   for k, v in common.items())
    return "".join(
        f'[checks.{n}]\nkind = "{n}"\ntargets = ["t1", "t2"]\n{keys}' for n in names
    )


def runner_for(text: str, reg: PluginRegistry) -> tuple[CheckRunner, list[int]]:
    base = '[node]\naddresses = ["127.0.0.1"]\n'
    config = resolve(parse_raw(base + text, "t.toml"), reg, need_peers=False)
    changes: list[int] = []
    entries = build_entries(config.checks, reg.check_kinds, None, 100)
    return CheckRunner(entries, on_change=lambda: changes.append(1)), changes


def by_name(runner: CheckRunner) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in runner.views()}


async def test_hostile_kinds_become_failed_results_and_the_rest_go_on(monkeypatch: Any) -> None:
    monkeypatch.setattr(checks_mod, "ENTER_BOUND", 0.3)
    reg = registry()
    names = [cls.name for cls in KINDS]
    runner, changes = runner_for(
        sections(names, interval="10s", timeout="200ms", confirm_spacing="20ms"), reg
    )
    with anyio.fail_after(10):
        await runner.run(once=True, task_status=anyio.TASK_STATUS_IGNORED)
    views = by_name(runner)
    assert views["good"]["state"] == "ok"
    assert views["good"]["targets"][0]["answer"] == "yes"
    assert views["raises"]["state"] == "failing"
    assert views["raises"]["targets"][0]["error"] == "RuntimeError: boom t1"
    hangs = views["hangs"]["targets"][1]
    assert hangs["state"] == "failing" and hangs["error"] == "timeout after 200ms"
    assert views["junk"]["targets"][0]["error"] == (
        "check kind 'junk' returned dict, not a ProbeResult"
    )
    # Confirmed by re-checks: 1 + confirm_checks (2) consecutive failures.
    assert views["raises"]["targets"][0]["consecutive_failures"] == 3
    # One failure then a success: confirmed ok, never failing.
    assert views["flaky"]["state"] == "ok"
    assert views["flaky"]["targets"][0]["consecutive_failures"] == 0
    assert views["unavailable"] == {**views["unavailable"], "state": "failing",
                                    "error": "no CA file here"}
    assert views["slowstart"]["error"] == "did not start within 300ms"
    assert views["badinit"]["error"] == "ValueError: cannot build"
    assert views["badtargets"]["error"] == "KeyError: 'targets'"
    assert views["badinit"]["targets"] == [] and views["badinit"]["state"] == "failing"
    assert changes  # state changes were reported


async def test_a_failure_is_settled_by_quick_rechecks_not_by_intervals() -> None:
    reg = registry()
    runner, _ = runner_for(
        sections(["raises", "flaky", "good"], interval="30s", timeout="200ms",
                 confirm_spacing="50ms", confirm_checks="4"),
        reg,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        with anyio.fail_after(5):
            while by_name(runner)["raises"]["state"] != "failing":
                await anyio.sleep(0.02)
        views = by_name(runner)
        # Interval 30 s: without quick re-checks the 5th failure would be 2 minutes away.
        assert views["raises"]["targets"][0]["consecutive_failures"] == 5
        await anyio.sleep(0.4)
        views = by_name(runner)
        assert views["flaky"]["state"] == "ok"
        assert views["flaky"]["targets"][0]["samples"] == 2
        assert views["good"]["targets"][0]["samples"] == 1  # next run in 30 s
        tg.cancel_scope.cancel()


async def test_checks_run_on_their_own_interval() -> None:
    reg = registry()
    runner, _ = runner_for(sections(["good"], interval="200ms", timeout="100ms"), reg)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await anyio.sleep(1.1)
        tg.cancel_scope.cancel()
    samples = by_name(runner)["good"]["targets"][0]["samples"]
    assert 3 <= samples <= 7, samples  # 6 on an idle machine; never just the first


async def test_hostile_checks_leave_the_agent_and_its_nodes_alone(monkeypatch: Any) -> None:
    monkeypatch.setattr(checks_mod, "ENTER_BOUND", 0.3)
    port = free_port()
    text = agent_config(None, port, peers='{name = "peer", addresses = ["127.0.0.2"]}')
    text = text.replace("[outputs.api]\n", "")
    text += sections([cls.name for cls in KINDS], interval="5s", timeout="200ms")
    raw = parse_raw(text, "agent.toml")
    registry_ = PluginRegistry().load(set(raw.core.plugins.disable),
                                      extra={"hostile": hostile_plugin()})
    config = resolve(raw, registry_)
    agent = Agent(config, registry_, once=True)
    with anyio.fail_after(20):
        code = await agent.run()
    snap = agent._round_snapshot
    assert snap is not None
    assert code == 0  # the nodes' verdict alone
    assert snap.summary["reachable"] == snap.summary["nodes"] == 2
    states = {c["name"]: c["state"] for c in snap.data["checks"]}
    assert states["good"] == "ok" and states["raises"] == "failing"
    assert states["hangs"] == "failing" and states["slowstart"] == "failing"
