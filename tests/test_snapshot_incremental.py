"""Incremental snapshots: after any sequence of changes they equal a full rendering."""

from __future__ import annotations

import json
import random
import time

import pytest

from healthmesh import Node, ProbeResult
from healthmesh.core.config import ProbingSettings
from healthmesh.core.membership import Membership
from healthmesh.core.snapshot import SnapshotBuilder, build_snapshot
from healthmesh.core.state import StateStore
from healthmesh.plugins.api.views import IncrementalRenderer, Rendered

KINDS = ["http", "icmp"]


def make_node(i: int, rng: random.Random, version: int = 0) -> Node:
    extra = rng.random() < 0.3
    return Node(
        f"n{i}",
        cluster=rng.choice(["default", "east", "west"]) if version else "default",
        addresses=(f"10.1.0.{i + 1}",) + ((f"10.3.0.{i + 1}",) if extra else ()),
        health_addresses=(f"10.2.0.{i + 1}",) if rng.random() < 0.8 else (),
        labels={"zone": rng.choice(["a", "b", "ü"]), "v": str(version)},
        info={"heartbeat": rng.choice(["alive", "stale"])} if rng.random() < 0.2 else {},
    )


def track(m: Membership, store: StateStore, kinds: list[str]) -> None:
    for node in m.nodes():
        for path in m.paths_of(node, host=True, endpoint=True):
            for kind in kinds:
                store.ensure(path.key, kind)


def result(rng: random.Random, t: float) -> ProbeResult:
    if rng.random() < 0.3:
        return ProbeResult(False, None, rng.choice(["timeout after 1s", "refused"]),
                           {"connect_ms": 0.5}, t, t + 0.1)
    return ProbeResult(True, rng.uniform(1e-4, 1e-2), None,
                       {"connect_ms": rng.uniform(0.01, 1.0), "sent": 1}, t, t + 0.01)


@pytest.mark.parametrize("seed", range(6))
def test_incremental_snapshots_equal_full_renderings_after_random_changes(seed: int) -> None:
    rng = random.Random(seed)
    local = Node("me", addresses=("10.0.0.1",), health_addresses=("10.0.1.1",))
    m = Membership(local)
    m.feed("static")
    peers = {i: make_node(i, rng) for i in range(60)}
    m.replace("static", peers.values())
    store = StateStore(3, 10)
    kinds = list(KINDS)
    track(m, store, kinds)
    probing = ProbingSettings()
    builder = SnapshotBuilder()
    renderer = IncrementalRenderer()
    t = time.time()
    for step in range(40):
        op = rng.random()
        if op < 0.6:  # results for a few random paths (state changes included)
            keys = [
                (path.key, kind)
                for node in m.nodes()
                for path in m.paths_of(node, host=True, endpoint=True)
                for kind in kinds
            ]
            for key, kind in rng.sample(keys, rng.randint(0, 15)):
                t += 0.5
                store.record(key, kind, result(rng, t))
        elif op < 0.75:  # nodes join, leave, or change addresses or labels
            for i in rng.sample(range(80), 6):
                if i in peers and rng.random() < 0.4:
                    del peers[i]
                else:
                    peers[i] = make_node(i, rng, version=step)
            m.replace("static", peers.values())
            track(m, store, kinds)
        elif op < 0.85:  # a kind switched off or back on
            kinds = rng.choice([k for k in (["icmp"], ["http"], list(KINDS)) if k != kinds])
            track(m, store, kinds)
        elif op < 0.9:  # a source goes stale
            m.mark_stale("static", "watch failed")
        extra = {"round": {"completed": step, "duration_s": 1.0}, "probe_kinds": kinds}
        inc = builder.build(m, store, kinds, probing, timestamp=t, extra=extra)
        full = build_snapshot(m, store, kinds, probing, timestamp=t, extra=extra)
        assert inc.data == full.data
        # The API's answers, re-encoded only for the nodes that changed: byte for byte
        # what encoding the whole documents gives.
        got = renderer.build(inc.data)
        want = Rendered.build(full.data)
        assert got.status == want.status
        assert got.beta == want.beta
        assert json.loads(got.status) == json.loads(json.dumps(full.data))


def test_a_snapshot_between_rounds_re_renders_only_the_changed_nodes() -> None:
    local = Node("me", addresses=("10.0.0.1",))
    m = Membership(local)
    m.feed("static")
    m.replace("static", [Node(f"n{i}", addresses=(f"10.1.0.{i + 1}",)) for i in range(50)])
    store = StateStore(3, 10)
    track(m, store, KINDS)
    probing = ProbingSettings()
    builder = SnapshotBuilder()
    renderer = IncrementalRenderer()
    first = builder.build(m, store, KINDS, probing)
    renderer.build(first.data)
    assert builder.rendered == 51 and renderer.encoded == 51
    builder.build(m, store, KINDS, probing)
    assert builder.rendered == 0
    n7 = next(n for n in m.nodes() if n.name == "n7")
    store.record(m.paths_of(n7, host=True, endpoint=True)[0].key, "icmp",
                 ProbeResult(True, 0.001, None, {}, time.time(), time.time()))
    snap = builder.build(m, store, KINDS, probing)
    assert builder.rendered == 1
    renderer.build(snap.data)
    assert renderer.encoded == 1
    entry = next(n for n in snap.data["nodes"] if n["name"] == "n7")
    assert entry["paths"][0]["probes"]["icmp"]["state"] == "reachable"


@pytest.mark.anyio
async def test_a_cooperative_build_lets_other_tasks_run_and_gives_the_same_snapshot() -> None:
    import anyio
    import anyio.lowlevel

    from healthmesh.core.snapshot import RENDER_CHUNK

    local = Node("me", addresses=("10.0.0.1",))
    m = Membership(local)
    m.feed("static")
    n = 3 * RENDER_CHUNK
    m.replace("static", [Node(f"n{i}", addresses=(f"10.1.{i // 250}.{i % 250 + 1}",))
                         for i in range(n)])
    store = StateStore(3, 10)
    track(m, store, KINDS)
    probing = ProbingSettings()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        before = ticks
        snap = await SnapshotBuilder().build_async(m, store, KINDS, probing, timestamp=1.0)
        during = ticks - before
        tg.cancel_scope.cancel()
    assert snap.data == build_snapshot(m, store, KINDS, probing, timestamp=1.0).data
    assert len(snap.data["nodes"]) == n + 1
    assert during >= 3  # the other task ran between chunks of rendered nodes


@pytest.mark.parametrize("seed", range(4))
def test_lazy_views_read_or_not_between_results_give_the_full_rendering(seed: int) -> None:
    """Views are rendered on read: whether or not anyone reads between results, a path's
    view is its state's rendering now, the same dict until its next result and a new one
    after it, and incremental snapshots and API bytes equal full ones."""
    rng = random.Random(100 + seed)
    local = Node("me", addresses=("10.0.0.1",), health_addresses=("10.0.1.1",))
    m = Membership(local)
    m.feed("static")
    m.replace("static", [make_node(i, rng) for i in range(40)])
    store = StateStore(3, 10)
    track(m, store, KINDS)
    keys = [(path.key, kind) for node in m.nodes()
            for path in m.paths_of(node, host=True, endpoint=True) for kind in KINDS]
    probing = ProbingSettings()
    builder = SnapshotBuilder()
    renderer = IncrementalRenderer()
    t = time.time()
    seen: dict[tuple[object, str], dict[str, object]] = {}
    for _ in range(30):
        for key, kind in rng.sample(keys, rng.randint(0, 12)):
            for _ in range(rng.randint(1, 3)):  # several results, read in between or not
                t += 0.5
                before = store.renders
                store.record(key, kind, result(rng, t))
                assert store.renders == before  # recording renders nothing
                seen.pop((key, kind), None)
                if rng.random() < 0.5:
                    v = store.view(key, kind)
                    assert v is not None and v not in seen.values()
                    seen[(key, kind)] = v
        for key, kind in rng.sample(keys, 10):
            v = store.view(key, kind)
            st = store.get(key, kind)
            assert st is not None and v == st.as_dict()
            if (key, kind) in seen:
                assert v is seen[(key, kind)]  # no result since: the very same dict
            seen[(key, kind)] = v
        if rng.random() < 0.7:  # sometimes several steps of results between snapshots
            inc = builder.build(m, store, KINDS, probing, timestamp=t)
            full = build_snapshot(m, store, KINDS, probing, timestamp=t)
            assert inc.data == full.data
            got, want = renderer.build(inc.data), Rendered.build(full.data)
            assert got.status == want.status and got.beta == want.beta
            again = store.renders
            assert builder.build(m, store, KINDS, probing, timestamp=t).data == full.data
            assert builder.rendered == 0 and store.renders == again


def test_a_snapshot_after_unread_results_renders_each_changed_view_once() -> None:
    local = Node("me", addresses=("10.0.0.1",))
    m = Membership(local)
    m.feed("static")
    m.replace("static", [Node(f"n{i}", addresses=(f"10.1.0.{i + 1}",)) for i in range(20)])
    store = StateStore(3, 10)
    track(m, store, KINDS)
    probing = ProbingSettings()
    builder = SnapshotBuilder()
    builder.build(m, store, KINDS, probing)
    n3 = next(n for n in m.nodes() if n.name == "n3")
    key = m.paths_of(n3, host=True, endpoint=True)[0].key
    old = store.view(key, "icmp")
    t = time.time()
    for i in range(5):  # five results, none read: the latest one is what the snapshot shows
        store.record(key, "icmp", ProbeResult(i == 4, 0.002 if i == 4 else None,
                                              None if i == 4 else "timeout", {}, t + i, t + i))
    before = store.renders
    snap = builder.build(m, store, KINDS, probing)
    assert store.renders - before == 1 and builder.rendered == 1
    entry = next(n for n in snap.data["nodes"] if n["name"] == "n3")
    view = entry["paths"][0]["probes"]["icmp"]
    assert view is not old and view is store.view(key, "icmp")
    assert view["state"] == "reachable" and view["rtt_ms"] == 2.0
    assert view["samples"] == 5 and view["loss_pct"] == 80.0


@pytest.mark.anyio
async def test_a_cooperative_build_paces_itself_by_the_views_it_renders() -> None:
    """After a round every view is rendered during the build: it yields every VIEW_CHUNK
    views, not only every RENDER_CHUNK nodes (which would hold the loop 4 × longer)."""
    import anyio
    import anyio.lowlevel

    from healthmesh.core.snapshot import RENDER_CHUNK, VIEW_CHUNK

    local = Node("me", addresses=("10.0.0.1",))
    m = Membership(local)
    m.feed("static")
    n = RENDER_CHUNK  # fewer nodes than one node chunk: only the view pacing yields
    m.replace("static", [Node(f"n{i}", addresses=(f"10.1.0.{i + 1}",),
                              health_addresses=(f"10.2.0.{i + 1}",)) for i in range(n - 2)])
    store = StateStore(3, 10)
    track(m, store, KINDS)
    probing = ProbingSettings()
    builder = SnapshotBuilder()
    builder.build(m, store, KINDS, probing, timestamp=1.0)
    t = time.time()
    for node in m.nodes():
        for path in m.paths_of(node, host=True, endpoint=True):
            for kind in KINDS:
                store.record(path.key, kind, ProbeResult(True, 0.001, None, {}, t, t))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await anyio.lowlevel.checkpoint()
            before, renders = ticks, store.renders
            snap = await builder.build_async(m, store, KINDS, probing, timestamp=1.0)
            during = ticks - before
            tg.cancel_scope.cancel()
    views = store.renders - renders
    assert views == 4 * (n - 2) + 1 * 2  # every peer's 4 views, the local node's 2
    assert during >= 3  # 994 views: at least 3 chunks of VIEW_CHUNK, each followed by a yield
    assert views >= 3 * VIEW_CHUNK
    assert snap.data == build_snapshot(m, store, KINDS, probing, timestamp=1.0).data
