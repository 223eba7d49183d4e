"""The detection rule itself, with simulated probes: fast, no root, no network.

The netlab tests (test_detection*.py) show the same behaviour with real agents and packets.
"""

from __future__ import annotations

import random
import time
from typing import Any

import anyio
import pytest

from healthmesh import Duration, Node, Path, PathState, Probe, ProbeResult
from healthmesh.core.config import ProbingSettings, parse_raw
from healthmesh.core.scheduler import Scheduler
from healthmesh.core.state import KindState, StateStore

pytestmark = pytest.mark.anyio


class Lossy(Probe):
    """Each probe fails with probability ``loss``; ``dead`` paths time out."""

    name = "sim"

    def __init__(self, loss: float = 0.0, seed: int = 1) -> None:
        self.loss = loss
        self.dead: set[str] = set()
        self.rng = random.Random(seed)
        self.sent = 0

    async def probe(self, path: Path, timeout: float) -> ProbeResult:
        self.sent += 1
        if path.address in self.dead:
            await anyio.sleep(timeout)
            return ProbeResult.failure("timeout")
        await anyio.sleep(0.001)
        if self.rng.random() < self.loss:
            return ProbeResult.failure("lost")
        return ProbeResult.success(0.001)


def paths(n: int) -> list[Path]:
    return [p for i in range(n) for p in Node(f"n{i}", addresses=(f"10.9.0.{i + 1}",)).paths()]


def default_probing(**kw: Any) -> ProbingSettings:
    """The shipped defaults (threshold derived as the config loader does), with overrides."""
    p = parse_raw('[node]\naddresses = ["10.9.9.9"]\n').core.probing
    for key, value in kw.items():
        setattr(p, key, value)
    return p


def test_defaults_are_eight_confirmations_25ms_apart_and_a_threshold_of_nine() -> None:
    p = default_probing()
    assert (p.confirm_probes, p.confirm_spacing, p.failure_threshold) == (8, 0.025, 9)


def test_a_late_failure_of_an_earlier_probe_does_not_count_toward_the_threshold() -> None:
    st = KindState(failure_threshold=2, window=10)
    st.record(ProbeResult(ok=False, error="lost", started_at=10.0, finished_at=10.5))
    st.record(ProbeResult(ok=True, rtt=0.001, started_at=10.55, finished_at=10.551))
    # The first re-probe (sent at 10.525) times out after the second one answered.
    st.record(ProbeResult(ok=False, error="lost", started_at=10.525, finished_at=11.025))
    assert st.consecutive_failures == 0
    assert st.state is PathState.REACHABLE
    assert st.failures == 2  # still counted as loss
    assert st.as_dict()["error"] is None
    st.record(ProbeResult(ok=False, error="down", started_at=12.0, finished_at=12.5))
    assert (st.consecutive_failures, st.state) == (1, PathState.REACHABLE)


async def run_sim(
    probe: Lossy, probing: ProbingSettings, ps: list[Path], seconds: float
) -> tuple[StateStore, list[float]]:
    store = StateStore(probing.failure_threshold or 1, probing.window)
    changes: list[float] = []
    sched = Scheduler(
        probing, {"sim": probe}, store, seed="me", on_change=lambda: changes.append(time.time())
    )
    with anyio.fail_after(seconds + 10):
        async with anyio.create_task_group() as tg:
            sched.set_paths(ps)
            await tg.start(sched.run)
            await anyio.sleep(seconds)
            tg.cancel_scope.cancel()
    return store, changes


def unreachable(store: StateStore, ps: list[Path]) -> list[str]:
    return [
        p.address
        for p in ps
        if (st := store.get(p.key, "sim")) is not None and st.state is not PathState.REACHABLE
    ]


async def test_twenty_percent_iid_loss_never_makes_a_path_unreachable() -> None:
    # 40 paths probed 10 times a second for 6 s: ~2,400 probes, ~500 of them lost; each
    # loss is a false report with probability 0.2^8 = 2.6e-6.
    probing = default_probing(interval=Duration(0.1), timeout=Duration(0.05))
    probe = Lossy(loss=0.2, seed=7)
    ps = paths(40)
    store, changes = await run_sim(probe, probing, ps, 6.0)
    assert unreachable(store, ps) == []
    lost = sum(st.failures for p in ps if (st := store.get(p.key, "sim")) is not None)
    assert lost > 300
    # Only the 40 unknown -> reachable changes of the first round.
    assert len(changes) == 40


async def test_a_plain_threshold_of_three_flaps_under_the_same_loss() -> None:
    # Cilium's rule: three failures in a row, no confirmation: 0.2^3 = 0.8% per probe.
    probing = default_probing(
        interval=Duration(0.1), timeout=Duration(0.05), confirm_probes=0, failure_threshold=3
    )
    probe = Lossy(loss=0.2, seed=7)
    ps = paths(40)
    _, changes = await run_sim(probe, probing, ps, 6.0)
    assert len(changes) > 40 + 6  # about 15 false reports, each with its recovery


async def test_a_dead_path_is_settled_one_timeout_after_its_first_failure() -> None:
    probing = default_probing(interval=Duration(1.0), timeout=Duration(0.2))
    probe = Lossy()
    ps = paths(4)
    store = StateStore(probing.failure_threshold or 1, probing.window)
    sched = Scheduler(probing, {"sim": probe}, store, seed="me")
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            sched.set_paths(ps)
            await tg.start(sched.run)
            await anyio.sleep(1.5)
            probe.dead.add(ps[0].address)
            t0 = time.monotonic()
            st = store.get(ps[0].key, "sim")
            assert st is not None
            while st.state is not PathState.UNREACHABLE:
                await anyio.sleep(0.005)
            settled = time.monotonic() - t0
            tg.cancel_scope.cancel()
    # At worst: the next probe one interval later, its timeout, the last re-probe 200 ms
    # after that, and that re-probe's timeout: 1.0 + 0.2 + 0.2 + 0.2.
    assert settled <= 1.0 + 0.2 + 0.2 + 0.2 + 0.15
    assert st.consecutive_failures >= 9


async def test_every_change_of_state_is_reported_at_once_not_at_the_end_of_the_round() -> None:
    probing = default_probing(interval=Duration(2.0), timeout=Duration(0.1))
    probe = Lossy()
    ps = paths(2)
    store = StateStore(probing.failure_threshold or 1, probing.window)
    seen: list[float] = []
    sched = Scheduler(
        probing, {"sim": probe}, store, seed="me", on_change=lambda: seen.append(time.monotonic())
    )
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            sched.set_paths(ps)
            await tg.start(sched.run)
            await anyio.sleep(0.5)
            assert len(seen) == 2  # unknown -> reachable, both paths
            probe.dead.add(ps[1].address)
            with anyio.fail_after(5):
                while len(seen) < 3:
                    await anyio.sleep(0.005)
            st = store.get(ps[1].key, "sim")
            assert st is not None and st.state is PathState.UNREACHABLE
            # Reported while the round (2 s) is still running.
            assert sched.completed_rounds <= 2
            tg.cancel_scope.cancel()


class Counting(Lossy):
    """``Lossy`` that records the scheduler's re-probes in flight at every probe it starts."""

    def __init__(self) -> None:
        super().__init__()
        self.sched: Scheduler | None = None
        self.max_reprobes = 0

    async def probe(self, path: Path, timeout: float) -> ProbeResult:
        assert self.sched is not None
        self.max_reprobes = max(self.max_reprobes, self.sched.reprobes_inflight)
        return await super().probe(path, timeout)


async def run_dead_mesh(
    n: int, seconds: float, **kw: Any
) -> tuple[Counting, Scheduler, StateStore, list[Path]]:
    """``n`` paths, all dead, probed ``seconds`` at 0.5 s with a 0.2 s timeout."""
    probing = default_probing(interval=Duration(0.5), timeout=Duration(0.2), **kw)
    probe = Counting()
    ps = paths(n)
    probe.dead.update(p.address for p in ps)
    store = StateStore(probing.failure_threshold or 1, probing.window)
    sched = probe.sched = Scheduler(probing, {"sim": probe}, store, seed="me")
    with anyio.fail_after(seconds + 10):
        async with anyio.create_task_group() as tg:
            sched.set_paths(ps)
            await tg.start(sched.run)
            await anyio.sleep(seconds)
            tg.cancel_scope.cancel()
    return probe, sched, store, ps


async def test_many_dead_paths_cannot_put_more_reprobes_in_flight_than_the_bound() -> None:
    # 100 dead paths failing at once would start 800 re-probes, each 200 ms in flight.
    probe, sched, _, _ = await run_dead_mesh(100, 1.2, confirm_max_inflight=12)
    assert 0 < probe.max_reprobes <= 12
    assert sched.confirm_skipped > 0
    assert sched.lateness()["confirm_skipped"] == sched.confirm_skipped
    # The same mesh without a tight bound goes well past it: the bound is what held it.
    unbounded, _, _, _ = await run_dead_mesh(100, 1.2)
    assert unbounded.max_reprobes > 50


async def test_reprobes_per_round_are_bounded() -> None:
    probe, sched, _, _ = await run_dead_mesh(100, 1.3, confirm_max_per_round=30)
    # Three rounds started in 1.3 s (0, 0.5, 1.0): 100 scheduled probes each, at most 30
    # re-probes each; without the bound it would be 800 re-probes per round.
    assert probe.sent <= 3 * (100 + 30)
    # Round 0's failures alone would have started 800 re-probes: at most 30 of them went out.
    assert sched.confirm_skipped >= 100 * 8 - 30


async def test_a_real_fault_is_still_confirmed_under_the_bound() -> None:
    # One dead path among live ones: its confirmation fits the bound and settles it fast.
    probing = default_probing(interval=Duration(1.0), timeout=Duration(0.2),
                              confirm_max_inflight=4, confirm_max_per_round=16)
    probe = Lossy()
    ps = paths(20)
    probe.dead.add(ps[3].address)
    store = StateStore(probing.failure_threshold or 1, probing.window)
    sched = Scheduler(probing, {"sim": probe}, store, seed="me")
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            sched.set_paths(ps)
            await tg.start(sched.run)
            st = store.get(ps[3].key, "sim")
            assert st is not None
            while st.state is not PathState.UNREACHABLE:
                await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
    # Four re-probes at a time: the 8 re-probes go out in two waves of the 200 ms timeout.
    assert st.consecutive_failures >= 9
    assert [p.address for p in ps if store.get(p.key, "sim").state  # type: ignore[union-attr]
            is PathState.UNREACHABLE] == [ps[3].address]


async def test_paths_refused_a_confirmation_are_settled_by_their_scheduled_probes() -> None:
    # A bound of 1 re-probe in flight: most of the 30 dead paths get no confirmation and
    # reach the threshold of 9 from their own rounds (0.5 s apart): all within ~5 s.
    probe, sched, store, ps = await run_dead_mesh(30, 6.0, confirm_max_inflight=1)
    assert probe.max_reprobes <= 1
    assert sched.confirm_skipped > 0
    states = {store.get(p.key, "sim").state for p in ps}  # type: ignore[union-attr]
    assert states == {PathState.UNREACHABLE}
