"""The scheduler, driven with real probes over real sockets (the example tcp plugin)."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute, TaskGroup
from healthmesh_tcp import TcpProbe, TcpSettings

from healthmesh import Duration, Node, Path, PathState, Probe, ProbeResult
from healthmesh.core.config import ProbingSettings
from healthmesh.core.scheduler import Scheduler
from healthmesh.core.state import StateStore

pytestmark = pytest.mark.anyio


class AcceptLog:
    """A real TCP listener on all of 127/8 that records when each address was connected to."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.port = 0

    async def serve(self, tg: TaskGroup) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(SocketAttribute.local_port)
        await listener.aclose()
        # Bind the wildcard so that every 127.x.y.z address answers on the same port.
        listener = await anyio.create_tcp_listener(local_host="0.0.0.0", local_port=self.port)

        async def handle(stream: Any) -> None:
            addr = stream.extra(SocketAttribute.local_address)[0]
            self.times[addr].append(time.monotonic())
            await stream.aclose()

        tg.start_soon(listener.serve, handle)

    def all_times(self) -> list[float]:
        return sorted(t for ts in self.times.values() for t in ts)


class Boom(Probe):
    name = "boom"

    async def probe(self, path: Path, timeout: float) -> ProbeResult:
        raise RuntimeError("kaboom")


class Hang(Probe):
    name = "hang"

    async def probe(self, path: Path, timeout: float) -> ProbeResult:
        await anyio.sleep_forever()
        raise AssertionError


def probing(**kw: Any) -> ProbingSettings:
    base: dict[str, Any] = {"interval": Duration(1.0), "timeout": Duration(0.3)}
    base.update(kw)
    return ProbingSettings(**base)


def peers(n: int, base: str = "127.0.1.") -> list[Path]:
    return [p for i in range(1, n + 1) for p in Node(f"p{i}", addresses=(f"{base}{i}",)).paths()]


@pytest.fixture
async def accept_log() -> AsyncIterator[AcceptLog]:
    log = AcceptLog()
    async with anyio.create_task_group() as tg:
        await log.serve(tg)
        yield log
        tg.cancel_scope.cancel()


async def run_for(sched: Scheduler, seconds: float, paths: list[Path]) -> None:
    with anyio.fail_after(seconds + 10):
        async with anyio.create_task_group() as tg:
            sched.set_paths(paths)
            await tg.start(sched.run)
            await anyio.sleep(seconds)
            tg.cancel_scope.cancel()


async def test_probe_starts_are_spread_evenly_over_the_interval(accept_log: AcceptLog) -> None:
    tcp = TcpProbe(TcpSettings(port=accept_log.port), None)  # type: ignore[arg-type]
    store = StateStore(3, 100)
    sched = Scheduler(probing(confirm_probes=0), {"tcp": tcp}, store, seed="me")
    t0 = time.monotonic()
    await run_for(sched, 3.2, peers(20))
    # Round 0 is fast; rounds 1 and 2 pace 20 probes over 1 s: about one every 50 ms.
    steady = [t - t0 for t in accept_log.all_times() if 1.0 <= t - t0 < 3.0]
    assert 36 <= len(steady) <= 42, len(steady)
    gaps = [b - a for a, b in itertools.pairwise(steady)]
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.05, abs=0.015)
    # Not a burst: nine gaps in ten over 20 ms (one start delayed by a loaded machine
    # shortens the gap after it, so the very smallest gap says little).
    assert sorted(gaps)[len(gaps) // 10] > 0.02, ("probes were sent in a burst", sorted(gaps))
    for addr, times in accept_log.times.items():
        assert len(times) in (3, 4), (addr, times)  # round 0, 1, 2 (and maybe the start of 3)


async def test_raising_and_hanging_probes_do_not_delay_the_others(accept_log: AcceptLog) -> None:
    tcp = TcpProbe(TcpSettings(port=accept_log.port), None)  # type: ignore[arg-type]
    store = StateStore(2, 100)  # two failed rounds settle a path (no re-probes below)
    probes = {"tcp": tcp, "boom": Boom(None, None), "hang": Hang(None, None)}  # type: ignore[arg-type]
    # No confirmation re-probes: on a loaded machine a tcp probe may time out, and its
    # re-probes would add connections that say nothing about the pacing measured here.
    sched = Scheduler(probing(confirm_probes=0, failure_threshold=1), probes, store, seed="me")
    t0 = time.monotonic()
    paths = peers(20)
    await run_for(sched, 3.2, paths)
    steady = [t - t0 for t in accept_log.all_times() if 1.0 <= t - t0 < 3.0]
    assert 36 <= len(steady) <= 42, len(steady)
    gaps = [b - a for a, b in itertools.pairwise(steady)]
    # Three kinds now share the interval: one start every 1/60 s, tcp every third on average.
    # (0.05 s on a quiet machine; a loaded one delays some starts into the next: not a burst)
    assert 0.015 <= sorted(gaps)[len(gaps) // 2] <= 0.1, sorted(gaps)
    for path in paths:
        assert store.get(path.key, "tcp").state is PathState.REACHABLE  # type: ignore[union-attr]
        boom = store.view(path.key, "boom")
        hang = store.view(path.key, "hang")
        assert boom is not None and hang is not None
        assert boom["error"] == "boom probe raised RuntimeError: kaboom"
        assert hang["error"] == "timeout after 300ms"
        assert boom["state"] == hang["state"] == "unreachable"
    assert sched.completed_rounds >= 2
    assert sched.last_round is not None
    assert sched.last_round.duration <= sched.round_duration_bound  # type: ignore[operator]


async def test_confirmation_reprobes_settle_a_failing_path_within_a_second() -> None:
    # Nothing listens on port 9 (discard): every connect is refused.
    tcp = TcpProbe(TcpSettings(port=9), None)  # type: ignore[arg-type]
    store = StateStore(9, 100)
    sched = Scheduler(probing(interval=Duration(30.0)), {"tcp": tcp}, store, seed="me")
    path = peers(1)[0]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            sched.set_paths([path])
            await tg.start(sched.run)
            t0 = time.monotonic()
            while store.get(path.key, "tcp").state is not PathState.UNREACHABLE:  # type: ignore[union-attr]
                await anyio.sleep(0.01)
            settled = time.monotonic() - t0
            tg.cancel_scope.cancel()
    # One interval is 30 s; the failures came from the first probe and its eight re-probes.
    assert settled < 1.0
    assert store.get(path.key, "tcp").probes == 9  # type: ignore[union-attr]
    assert "refused" in (store.view(path.key, "tcp") or {})["error"].lower()


async def test_added_peers_are_probed_promptly_and_removed_ones_stop(accept_log: AcceptLog) -> None:
    tcp = TcpProbe(TcpSettings(port=accept_log.port), None)  # type: ignore[arg-type]
    store = StateStore(3, 100)
    sched = Scheduler(probing(interval=Duration(10.0)), {"tcp": tcp}, store, seed="me")
    first = peers(5)
    extra = peers(1, base="127.0.2.")
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            sched.set_paths(first)
            await tg.start(sched.run)
            await anyio.sleep(0.3)
            t_add = time.monotonic()
            sched.set_paths(first + extra)
            added_at = accept_log.times["127.0.2.1"]
            with anyio.fail_after(2):
                while not added_at:
                    await anyio.sleep(0.01)
            # Within a tick or so, not at its slot in the 10 s interval (margin for a loaded
            # machine, where the loop can be held a few hundred ms).
            assert added_at[0] - t_add < 1.0
            sched.set_paths(first[1:])  # p1 and the added peer leave
            before = {a: len(t) for a, t in accept_log.times.items()}
            await anyio.sleep(0.5)
            tg.cancel_scope.cancel()
    assert accept_log.times["127.0.1.1"][-1] < t_add + 0.7
    assert {a: len(t) for a, t in accept_log.times.items()} == before
    assert store.get(first[0].key, "tcp") is None


async def test_a_readded_address_keeps_its_history(accept_log: AcceptLog) -> None:
    tcp = TcpProbe(TcpSettings(port=accept_log.port), None)  # type: ignore[arg-type]
    store = StateStore(3, 100)
    sched = Scheduler(probing(), {"tcp": tcp}, store, seed="me")
    paths = peers(2)
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            sched.set_paths(paths)
            await tg.start(sched.run)
            await anyio.sleep(1.6)
            samples = store.get(paths[0].key, "tcp").probes  # type: ignore[union-attr]
            assert samples >= 2
            sched.set_paths(paths[1:])
            await anyio.sleep(0.2)
            sched.set_paths(paths)
            await anyio.sleep(0.2)
            st = store.get(paths[0].key, "tcp")
            tg.cancel_scope.cancel()
    assert st is not None and st.probes >= samples + 1
    assert st.state is PathState.REACHABLE


async def test_probe_all_waits_for_every_result_and_its_confirmations() -> None:
    tcp = TcpProbe(TcpSettings(port=9), None)  # type: ignore[arg-type]
    store = StateStore(9, 100)
    sched = Scheduler(probing(interval=Duration(30.0)), {"tcp": tcp}, store, seed="me")
    paths = peers(10)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            sched.set_paths(paths)
            await tg.start(lambda task_status: sched.run(rounds=False, task_status=task_status))
            await sched.probe_all()
            states = {store.get(p.key, "tcp").state for p in paths}  # type: ignore[union-attr]
            tg.cancel_scope.cancel()
    assert states == {PathState.UNREACHABLE}


async def test_nodes_with_a_longer_interval_are_probed_less_often(accept_log: AcceptLog) -> None:
    tcp = TcpProbe(TcpSettings(port=accept_log.port), None)  # type: ignore[arg-type]
    store = StateStore(9, 100)
    sched = Scheduler(probing(interval=Duration(0.5)), {"tcp": tcp}, store, seed="me")
    local = peers(2)
    remote = Node("r1", cluster="c2", addresses=("127.0.3.1",), interval=1.5).paths()
    await run_for(sched, 3.2, local + remote)
    # About 7 rounds of 0.5 s: every one probes the local peers, one in three the remote one.
    assert len(accept_log.times["127.0.1.1"]) >= 6
    assert 2 <= len(accept_log.times["127.0.3.1"]) <= 3


async def test_lateness_of_round_starts_is_counted(accept_log: AcceptLog) -> None:
    tcp = TcpProbe(TcpSettings(port=accept_log.port), None)  # type: ignore[arg-type]
    sched = Scheduler(probing(), {"tcp": tcp}, StateStore(3, 100), seed="me")
    assert sched.lateness()["starts"] == 0 and sched.lateness()["lag_p99_ms"] is None
    await run_for(sched, 2.2, peers(10))
    lat = sched.lateness()
    # Rounds 0 and 1 started 10 probes each (round 0 at max_rate), round 2 a few.
    assert lat["starts"] >= 20 and lat["lag_samples"] == lat["starts"]
    assert 0 <= lat["lag_p50_ms"] <= lat["lag_p99_ms"] <= lat["lag_max_ms"]
    assert lat["lag_max_ms"] <= lat["lag_max_ms_ever"]
    assert lat["lag_p50_ms"] < 500  # paced starts are not seconds late, even on a busy machine
    assert set(lat) == {"lag_p50_ms", "lag_p99_ms", "lag_max_ms", "lag_samples", "starts",
                        "late", "lag_max_ms_ever", "skipped", "skipped_rounds",
                        "reprobes_inflight", "confirm_skipped"}
