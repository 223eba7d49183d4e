"""Simulation of the sampled mesh (``probing.observers = k``, core/sampling.py).

For N nodes and k observers it reports, from the pure assignment function:
  * observers per node (min/mean/max) and probes per agent (min/mean/max);
  * the fraction of (observer, target) pairs that move when 1 % of the nodes join, and when
    1 % leave (pairs of the old assignment no longer in the new one, over the old total);
  * the time for one agent to compute its own targets: cold (every id hashed, then sorted)
    and warm (after a 1 % change, positions of known ids cached, as the agent does),
    CPU ms, median of 5;
and, for comparison, rendezvous (highest-random-weight) hashing — each node's observers are
the top k of hash(node, observer) — at N = 1,000: its balance, its moves, and the time one
agent needs to find whose top k it is in (every weight: O(N²)).

    .venv/bin/python bench/sampled.py [--sizes 1000,10000,50000] [--ks 3,5,10] [--json out.json]
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)
from __future__ import annotations

import sys

# bench/ holds http.py: keep the folder off sys.path so ``import http`` finds the stdlib.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rpartition("/")[0] or ".")]

import argparse
import hashlib
import heapq
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from healthmesh.core.sampling import Ring, assignment


@dataclass
class Row:
    """One (scheme, N, k) case."""

    scheme: str
    nodes: int
    k: int
    observers_min: int
    observers_mean: float
    observers_max: int
    probes_min: int
    probes_mean: float
    probes_max: int
    moved_join_pct: float
    moved_leave_pct: float
    compute_cold_ms: float
    compute_warm_ms: float | None


def ids(n: int, prefix: str = "node") -> list[str]:
    return [f"default/{prefix}-{i}" for i in range(n)]


def pairs(plan: dict[str, list[str]]) -> set[tuple[str, str]]:
    return {(o, t) for o, ts in plan.items() for t in ts}


def moved(before: set[tuple[str, str]], after: set[tuple[str, str]]) -> float:
    return round(100.0 * len(before - after) / len(before), 3)


def stats(
    plan: dict[str, list[str]], members: list[str]
) -> tuple[int, float, int, int, float, int]:
    observers = dict.fromkeys(members, 0)
    for targets in plan.values():
        for t in targets:
            observers[t] += 1
    probes = [len(t) for t in plan.values()]
    obs = list(observers.values())
    return (min(obs), round(statistics.mean(obs), 2), max(obs),
            min(probes), round(statistics.mean(probes), 2), max(probes))


def timed(fn: object, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        # CPU time of this process: on a shared machine wall time mostly measures neighbours.
        t = time.process_time()
        fn()  # type: ignore[operator]
        times.append((time.process_time() - t) * 1000.0)
    return round(statistics.median(times), 1)


def ring_row(n: int, k: int) -> Row:
    members = ids(n)
    plan = assignment(members, k)
    before = pairs(plan)
    extra = max(1, n // 100)
    join = pairs(assignment([*members, *ids(extra, "new")], k))
    leave = pairs(assignment(members[extra:], k))
    me = members[n // 2]

    def cold() -> None:
        ring = Ring()
        ring.rebuild(members)
        ring.targets(me, k)

    warm_ring = Ring()
    warm_ring.rebuild(members)
    changed = [*members[extra:], *ids(extra, "new")]

    def warm() -> None:
        warm_ring.rebuild(changed)
        warm_ring.targets(me, k)
        warm_ring.rebuild(members)

    # warm() rebuilds twice (the change and back): half of it is one change.
    return Row("ring", n, k, *stats(plan, members), moved(before, join), moved(before, leave),
               timed(cold), round(timed(warm) / 2, 1))


def weight(node: str, observer: str) -> int:
    digest = hashlib.blake2b(f"{node}|{observer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def hrw(members: list[str], k: int) -> dict[str, list[str]]:
    plan: dict[str, list[str]] = {m: [] for m in members}
    for t in members:
        top = heapq.nlargest(k, (o for o in members if o != t), key=lambda o: weight(t, o))
        for o in top:
            plan[o].append(t)
    return plan


def hrw_row(n: int, k: int) -> Row:
    members = ids(n)
    plan = hrw(members, k)
    before = pairs(plan)
    extra = max(1, n // 100)
    join = pairs(hrw([*members, *ids(extra, "new")], k))
    leave = pairs(hrw(members[extra:], k))
    me = members[n // 2]

    def one_agent() -> None:  # whose top k is ``me`` in: every weight is needed
        for t in members:
            if t == me:
                continue
            mine = weight(t, me)
            above = 0
            for o in members:
                if o != t and weight(t, o) > mine:
                    above += 1
                    if above >= k:
                        break

    return Row("rendezvous (HRW)", n, k, *stats(plan, members), moved(before, join),
               moved(before, leave), timed(one_agent, repeat=1), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--ks", default="3,5,10")
    ap.add_argument("--hrw", type=int, default=1000, help="N of the rendezvous rows (0: none)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        ap.error("--sizes and --ks are comma-separated integers")
    if not all(2 <= n <= 200_000 for n in sizes) or not all(1 <= k <= 100 for k in ks):
        ap.error("sizes must be 2..200000 and ks 1..100")
    rows = [ring_row(n, k) for n in sizes for k in ks]
    if args.hrw:
        rows += [hrw_row(args.hrw, k) for k in ks]
    print(f"bench/sampled.py: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| scheme | nodes | k | observers/node min/mean/max | probes/agent min/mean/max "
          "| moved, 1 % join | moved, 1 % leave | one agent's targets, cold ms | warm ms |")
    print("|" + "---|" * 9)
    for r in rows:
        print(f"| {r.scheme} | {r.nodes:,} | {r.k} "
              f"| {r.observers_min}/{r.observers_mean}/{r.observers_max} "
              f"| {r.probes_min}/{r.probes_mean}/{r.probes_max} | {r.moved_join_pct} % "
              f"| {r.moved_leave_pct} % | {r.compute_cold_ms} "
              f"| {'—' if r.compute_warm_ms is None else r.compute_warm_ms} |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"cores": os.cpu_count(), "python": platform.python_version(),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    ok = all(r.compute_cold_ms <= 100 for r in rows if r.scheme == "ring")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
