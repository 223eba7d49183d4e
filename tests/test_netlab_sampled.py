"""A sampled mesh (probing.observers = 3) of 8 real agents in network namespaces.

Each agent's snapshot must list exactly the nodes the pure assignment (core/sampling.py)
gives it, a host that goes down must be reported by its observers, and a membership change
must move only the (observer, target) pairs the assignment says.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pytest

from healthmesh.core.sampling import assignment
from tests.conftest import require
from tests.netlab import Host, Lab, all_reachable, node_state, unavailable_reason

K = 3
HOSTS = 8


def plan(hosts: Iterable[Host]) -> dict[str, set[str]]:
    """``{host: names it probes}`` from the pure function (its own node included)."""
    names = [h.name for h in hosts]
    got = assignment([f"default/{n}" for n in names], K)
    return {n: {t.partition("/")[2] for t in got[f"default/{n}"]} | {n} for n in names}


def probed(view: dict) -> set[str]:  # type: ignore[type-arg]
    return {n["name"] for n in view["nodes"]}


class SampledLab(Lab):
    """A lab whose agents are ready when each sees its own assignment reachable."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        #: The hosts in the peers file, when not all of them.
        self.members: list[Host] | None = None

    def wait_ready(self, timeout: float = 30.0) -> None:
        want = plan(self.hosts_in)
        self.wait_until(
            lambda v: probed(v) == want[v["local"]["name"]]
            and all_reachable(v, want[v["local"]["name"]], self.kinds),
            hosts=self.hosts_in, timeout=timeout,
        )

    @property
    def hosts_in(self) -> list[Host]:
        return self.members or self.hosts


@pytest.fixture(scope="module")
def sampled() -> Iterator[SampledLab]:
    require(unavailable_reason())
    with SampledLab(HOSTS, probing={"interval": "1s", "timeout": "500ms", "observers": K}) as sl:
        yield sl


def test_every_host_is_probed_by_exactly_its_chosen_observers(sampled: SampledLab) -> None:
    sampled.wait_ready(30)
    want = plan(sampled.hosts)
    observers: dict[str, int] = {h.name: 0 for h in sampled.hosts}
    for h in sampled.hosts:
        view = sampled.view(h)
        assert view is not None
        assert probed(view) == want[h.name], h.name
        assert view["sampling"]["observers"] == K and view["sampling"]["members"] == HOSTS
        assert view["summary"]["nodes"] == K + 1 == view["summary"]["reachable"]
        for name in want[h.name] - {h.name}:
            observers[name] += 1
    assert set(observers.values()) == {K}


def test_a_host_going_down_is_reported_by_its_observers(sampled: SampledLab) -> None:
    sampled.wait_ready(30)
    victim = sampled.host(5)
    want = plan(sampled.hosts)
    watchers = [h for h in sampled.hosts if victim.name in want[h.name] and h is not victim]
    others = [h for h in sampled.hosts if h not in watchers and h is not victim]
    assert len(watchers) == K
    sampled.link_down(victim)
    try:
        sampled.wait_until(lambda v: node_state(v, victim.name) == "unreachable",
                           hosts=watchers, timeout=10)
        for h in others:  # not its observers: they do not list it at all
            assert node_state(sampled.view(h), victim.name) is None
    finally:
        sampled.link_up(victim)
    sampled.wait_ready(20)


def test_a_membership_change_moves_only_the_expected_assignments(sampled: SampledLab) -> None:
    sampled.wait_ready(30)
    before = plan(sampled.hosts)
    leaver = sampled.host(8)
    members = [h for h in sampled.hosts if h is not leaver]
    after = plan(members)
    sampled.members = members
    try:
        sampled.write_peers(members)
        sampled.wait_ready(20)
        for h in members:
            view = sampled.view(h)
            assert view is not None and probed(view) == after[h.name]
        pairs = lambda p: {(o, t) for o, ts in p.items() for t in ts if o != t}  # noqa: E731
        gone, new = pairs(before) - pairs(after), pairs(after) - pairs(before)
        # The leaver's K targets and its K observers' pairs to it go; each observer gains one.
        assert len(gone) == 2 * K and len(new) == K
        changed = {o for o, _ in gone | new if o != leaver.name}
        assert all(after[o] == before[o] for o in (h.name for h in members) if o not in changed)
    finally:
        sampled.members = None
        sampled.write_peers(sampled.hosts)
        sampled.wait_ready(20)
