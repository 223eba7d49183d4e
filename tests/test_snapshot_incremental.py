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


def small_mesh(rng: random.Random, peers: int) -> tuple[Membership, StateStore]:
    """A membership of ``peers`` random nodes and the local one, every path tracked."""
    m = Membership(Node("me", addresses=("10.0.0.1",)))
    m.feed("static")
    m.replace("static", [make_node(i, rng) for i in range(peers)])
    store = StateStore(3, 10)
    track(m, store, KINDS)
    return m, store


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


def test_the_renderer_keeps_offsets_into_its_documents_not_copies() -> None:
    from healthmesh.plugins.api.views import encode

    rng = random.Random(7)
    m, store = small_mesh(rng, 30)
    builder, renderer = SnapshotBuilder(), IncrementalRenderer()
    t = time.time()
    for step in range(4):
        # Every other node gets a result: reused and re-encoded nodes alternate.
        for node in list(m.nodes())[step % 2::2]:
            for path in m.paths_of(node, host=True, endpoint=True):
                store.record(path.key, "icmp", result(rng, t + step))
        got = renderer.build(builder.build(m, store, KINDS, ProbingSettings()).data)
        assert 0 < renderer.encoded < 31 or step == 0
        for node in got.data["nodes"]:
            kept = renderer._frags[id(node)]
            assert kept[0] is node and all(type(v) is int for v in kept[1:])
            assert got.status[kept[1]:kept[2]] == encode(node)


def test_the_cilium_document_is_encoded_on_first_request_only() -> None:
    import anyio

    from healthmesh.plugins.api.cilium import status_response
    from healthmesh.plugins.api.views import encode

    m, store = small_mesh(random.Random(3), 20)
    data = SnapshotBuilder().build(m, store, KINDS, ProbingSettings()).data
    got = IncrementalRenderer().build(data)
    assert got._beta is None  # publishing encodes /v1/status only

    async def two_first_requests() -> list[bytes]:
        out: list[bytes] = []

        async def ask() -> None:
            out.append(await got.beta_async())

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            tg.start_soon(ask)
        return out

    first, second = anyio.run(two_first_requests)
    assert first == encode(status_response(data))
    assert first is second is got.beta  # encoded once, then kept with the snapshot
