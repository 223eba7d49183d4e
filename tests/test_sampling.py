"""The sampled mesh's assignment (core/sampling.py) and how the agent applies it."""

from __future__ import annotations

import hashlib

import pytest

from healthmesh.core.config import ConfigError, load_raw
from healthmesh.core.sampling import Ring, assignment, position, targets_of


def ids(n: int, prefix: str = "node") -> list[str]:
    return [f"default/{prefix}-{i}" for i in range(n)]


@pytest.mark.parametrize(("n", "k"), [(1, 3), (3, 3), (4, 3), (50, 3), (200, 5), (1000, 10)])
def test_every_node_has_k_observers_and_every_agent_k_targets(n: int, k: int) -> None:
    members = ids(n)
    plan = assignment(members, k)
    want = min(k, n - 1)
    assert set(plan) == set(members)
    observers: dict[str, int] = {m: 0 for m in members}
    for observer, targets in plan.items():
        assert len(targets) == len(set(targets)) == want
        assert observer not in targets
        for t in targets:
            observers[t] += 1
    assert set(observers.values()) == {want}


def test_the_agent_view_agrees_with_the_whole_assignment() -> None:
    members = ids(300)
    plan = assignment(members, 4)
    ring = Ring()
    ring.rebuild(reversed(members))  # order of the membership does not matter
    for m in members[:50]:
        assert ring.targets(m, 4) == plan[m] == targets_of(members, m, 4)
        assert sorted(ring.observers(m, 4)) == sorted(o for o, ts in plan.items() if m in ts)


def test_positions_depend_on_the_id_alone() -> None:
    assert position("default/a") == position("default/a") != position("default/b")
    # The ring must be the same on every agent and every version: keyed BLAKE2b, 8 bytes.
    assert position("default/node-0") == int.from_bytes(
        hashlib.blake2b(b"default/node-0", digest_size=8, person=b"hm-observers").digest(),
        "big")


def pairs(plan: dict[str, list[str]]) -> set[tuple[str, str]]:
    return {(o, t) for o, ts in plan.items() for t in ts}


def test_a_join_or_a_leave_moves_only_its_neighbourhood() -> None:
    members = ids(500)
    k = 5
    before = pairs(assignment(members, k))
    after_join = pairs(assignment([*members, "default/newcomer"], k))
    # k observers each swap one target for the newcomer; the newcomer adds its own k.
    assert len(before - after_join) == k
    assert len(after_join - before) == 2 * k
    after_leave = pairs(assignment(members[1:], k))
    assert len(before - after_leave) == 2 * k
    assert len(after_leave - before) == k


def test_a_node_outside_the_membership_probes_its_would_be_successors() -> None:
    members = ids(20)
    got = targets_of(members, "default/outsider", 3)
    assert len(got) == 3 and "default/outsider" not in got


def test_zero_observers_means_no_sampled_targets() -> None:
    assert targets_of(ids(10), "default/node-1", 0) == []


def test_config_bounds_observers_and_always(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nname = "a"\naddresses = ["127.0.0.1"]\n'
                   '[probing]\nobservers = 3\nalways = ["b", "default/c"]\n')
    p = load_raw(str(cfg)).core.probing
    assert (p.observers, p.always) == (3, ["b", "default/c"])
    cfg.write_text('[node]\nname = "a"\naddresses = ["127.0.0.1"]\n[probing]\nobservers = -1\n')
    with pytest.raises(ConfigError, match=r"probing\.observers: must be between 0 and 1000"):
        load_raw(str(cfg))
    cfg.write_text('[node]\nname = "a"\naddresses = ["127.0.0.1"]\n[probing]\nalways = [""]\n')
    with pytest.raises(ConfigError, match=r"probing\.always"):
        load_raw(str(cfg))


def test_the_agent_probes_its_ring_targets_the_always_list_and_itself(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from healthmesh.cli import load_config
    from healthmesh.core.agent import Agent
    from healthmesh.core.model import Node

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[node]\nname = "n0"\naddresses = ["127.0.0.1"]\n'
        '[probing]\nobservers = 2\nalways = ["n7"]\n'
        '[sources.static]\nnodes = [{name = "x", addresses = ["127.9.9.9"]}]\n'
    )
    config, registry = load_config(str(cfg))
    agent = Agent(config, registry, console="json")
    peers = [Node(f"n{i}", addresses=(f"127.8.0.{i}",)) for i in range(1, 20)]
    agent.membership.on_change = agent._membership_changed
    agent.membership.replace("static", peers)
    members = ["default/n0", *(p.id for p in peers)]
    want = {"default/n0", "default/n7", *targets_of(members, "default/n0", 2)}
    assert {slot.path.node_id for slot in agent.scheduler.slots.values()} == want
    snap = agent.snapshot().data
    assert {f"default/{n['name']}" for n in snap["nodes"]} == want
    assert snap["summary"]["nodes"] == len(want)
    assert snap["sampling"] == {"observers": 2, "members": 20, "probed": len(want),
                                "always": ["n7"]}
    # A membership change re-assigns at once.
    agent.membership.replace("static", peers[:10])
    members = members[:11]
    want = {"default/n0", "default/n7", *targets_of(members, "default/n0", 2)}
    assert {slot.path.node_id for slot in agent.scheduler.slots.values()} == want
