"""Sampled mesh: which peers each agent probes when ``probing.observers = k`` (a hash ring).

Every node id (``cluster/name``) gets a position on a 64-bit ring from a keyed BLAKE2b hash
of the id alone. An agent probes the ``k`` nodes that follow it on the ring; so each node is
probed by the ``k`` nodes that precede it (its *observers*). The result is a pure function of
the membership, the same on every agent that sees the same membership, and:

* every node has exactly ``k`` observers and every agent exactly ``k`` targets when there are
  more than ``k`` nodes (all the others otherwise) — balance does not depend on luck;
* a join or a leave changes only the ring neighbourhood of that node: ``k`` observers gain
  or lose one target each, plus the node's own ``k`` pairs — about ``2k + k`` of the ``N·k``
  (observer, target) pairs, i.e. ``≈ 3/N`` of the assignment;
* one agent computes its own targets in O(N): N hashes and one pass for the k nearest
  positions after its own (positions of members are cached across membership changes, so a
  change hashes only the newcomers).

Rendezvous (highest-random-weight) hashing — a node's observers are the top ``k`` of
``hash(node, observer)`` — has the same stability but needs every (node, observer) weight to
know whose top ``k`` an agent is in: O(N²) per agent (bench/sampled.py measures both;
docs/architecture.md, "Sampled mesh", explains the choice).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable

#: Key of the ring hash, so that positions do not coincide with other uses of BLAKE2b on ids.
_PERSON = b"hm-observers"
_KEYED = hashlib.blake2b(digest_size=8, person=_PERSON)
_MASK = (1 << 64) - 1


def position(node_id: str) -> int:
    """The node's place on the ring: 64 bits of a keyed BLAKE2b of its id."""
    h = _KEYED.copy()  # a copy of the keyed state costs half of a fresh blake2b(...)
    h.update(node_id.encode())
    return int.from_bytes(h.digest(), "big")


class Ring:
    """Ring positions of the membership, cached between rebuilds.

    One agent's targets need no sort: they are the ``k`` ids nearest after its own position,
    found in one O(N) pass (``heapq.nsmallest``) over the cached positions.
    """

    def __init__(self) -> None:
        self._positions: dict[str, int] = {}

    def rebuild(self, ids: Iterable[str]) -> None:
        """Take ``ids`` as the membership (hashing only ids not seen in the previous rebuild)."""
        old = self._positions
        positions: dict[str, int] = {}
        for node_id in ids:
            pos = old.get(node_id)
            positions[node_id] = position(node_id) if pos is None else pos
        self._positions = positions

    def __len__(self) -> int:
        return len(self._positions)

    def targets(self, me: str, k: int) -> list[str]:
        """The ``k`` nodes after ``me`` on the ring (every other node when there are ≤ k)."""
        if k <= 0 or not self._positions:
            return []
        mine = self._positions.get(me)
        if mine is None:  # not a member: the nodes that follow where it would be
            mine = position(me)
        near = heapq.nsmallest(k + 1, self._positions.items(),
                               key=lambda kv: (kv[1] - mine) & _MASK)
        return [node_id for node_id, _ in near if node_id != me][:k]

    def observers(self, node: str, k: int) -> list[str]:
        """The ``k`` members that probe ``node`` (the ones before it on the ring)."""
        mine = self._positions.get(node)
        if k <= 0 or mine is None:
            return []
        near = heapq.nsmallest(k + 1, self._positions.items(),
                               key=lambda kv: (mine - kv[1]) & _MASK)
        return [node_id for node_id, _ in near if node_id != node][:k]


def targets_of(ids: Iterable[str], me: str, k: int) -> list[str]:
    """The peers ``me`` probes among ``ids`` with ``k`` observers per node (one-shot)."""
    ring = Ring()
    ring.rebuild(ids)
    return ring.targets(me, k)


def assignment(ids: Iterable[str], k: int) -> dict[str, list[str]]:
    """Every member's targets: the whole sampled mesh (for simulations, tests and views)."""
    order = sorted((position(node_id), node_id) for node_id in dict.fromkeys(ids))
    n = len(order)
    m = min(k, n - 1) if k > 0 else 0
    return {order[i][1]: [order[(i + j) % n][1] for j in range(1, m + 1)] for i in range(n)}
