"""Memory an agent holds for N peers with full windows, without probing (robust to machine load).

Builds what a running agent keeps for PEERS peers (node + endpoint address each, icmp and
http): the membership, a ``StateStore`` with every window full (WINDOW + 10 results per
series, shaped like the real probes'), then runs ROUNDS rounds the way the agent does: one
more result per series, ``build_snapshot``, the API's ``Rendered.build`` (``/v1/status`` and
``/v1beta/status`` encoded, in a worker thread) and the json output's encoding, keeping the
latest snapshot and rendering as the agent and the API do, and (when the checkout has it)
``release_free_memory`` after each round as the agent does. It prints RSS (psutil) at each
step, the live Python objects after the last round, and the RSS after glibc's
``malloc_trim(0)`` (how much of it is free memory the allocator keeps). Nothing is probed,
so unlike ``bench/agent.py`` the figure does not depend on how busy the machine is.

    .venv/bin/python bench/held.py [--peers 5000] [--window 100] [--rounds 6] [--json out.json]

``HM_ROOT=<checkout>`` measures another checkout (e.g. main). Like ``healthmesh run``, it
fixes glibc's mmap threshold first when the checkout has ``core/memory.py`` (unless
``MALLOC_MMAP_THRESHOLD_`` is set); other glibc settings can be compared through the
environment (``MALLOC_ARENA_MAX=2``).
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)
from __future__ import annotations

import sys

# bench/ holds http.py: keep the folder off sys.path so ``import http`` finds the stdlib.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rpartition("/")[0] or ".")]

import argparse
import ctypes
import gc
import json
import os
import platform
import random
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("HM_ROOT", str(ROOT)))
sys.path.insert(0, str(ROOT / "bench"))  # bench/state.py's result shapes

from state import result

from healthmesh.core.config import ProbingSettings
from healthmesh.core.membership import Membership
from healthmesh.core.model import Node
from healthmesh.core.snapshot import SnapshotBuilder, build_snapshot
from healthmesh.core.state import StateStore
from healthmesh.plugins.api.views import IncrementalRenderer, Rendered


def mb(proc: psutil.Process) -> float:
    return round(proc.memory_info().rss / 2**20, 1)


def render(data: dict[str, Any], into: list[Any], renderer: Any = None) -> None:
    """The API's rendering, in a thread of its own as the API's worker thread does it."""
    into.append(Rendered.build(data) if renderer is None else renderer.build(data))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=5000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--incremental", action="store_true",
                    help="build as the agent does: SnapshotBuilder and the API's "
                         "IncrementalRenderer (they keep per-node entries and fragments)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    if not (1 <= args.peers <= 60_000 and 2 <= args.window <= 10_000 and 1 <= args.rounds <= 50):
        ap.error("--peers 1..60000, --window 2..10000, --rounds 1..50")
    try:  # as `healthmesh run` does at start (a checkout without it: glibc's defaults)
        from healthmesh.core.memory import tune_allocator
    except ImportError:
        tuned = False
    else:
        tuned = tune_allocator()
    try:  # as the agent does after each round (a checkout without it: nothing)
        from healthmesh.core.memory import release_free_memory
    except ImportError:
        release_free_memory = None
    proc = psutil.Process()
    out: dict[str, Any] = {
        "allocator_tuned": tuned,
        "root": os.environ.get("HM_ROOT", str(ROOT)),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "peers": args.peers, "window": args.window,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "rss_imports_mb": mb(proc),
    }
    rng = random.Random(1)
    local = Node("bench", addresses=("127.0.0.1",))
    membership = Membership(local)
    membership.feed("static").replace(
        Node(f"peer-{i}", addresses=(f"127.1.{i // 250}.{i % 250 + 1}",),
             health_addresses=(f"127.2.{i // 250}.{i % 250 + 1}",))
        for i in range(args.peers))
    probing = ProbingSettings(window=args.window)
    kinds = ["icmp", "http"]
    store = StateStore(probing.confirm_probes + 1, args.window)  # the default threshold
    series = [(path.key, kind) for node in membership.nodes() if node.id != local.id
              for path in membership.paths_of(node, host=True, endpoint=True) for kind in kinds]
    for key, kind in series:
        store.ensure(key, kind)
    t = time.time()
    for r in range(args.window + 10):
        for key, kind in series:
            store.record(key, kind, result(kind, rng, t + r))
    gc.collect()
    out["series"] = len(series)
    out["rss_windows_full_mb"] = mb(proc)
    latest: list[Any] = [None, None]  # the agent's snapshot and the API's rendering
    rounds: list[float] = []
    blocks: list[int] = []  # live Python memory blocks: growth here is data, not fragmentation
    builder = SnapshotBuilder() if args.incremental else None
    renderer = IncrementalRenderer() if args.incremental else None
    for r in range(args.rounds):
        for key, kind in series:
            store.record(key, kind, result(kind, rng, t + args.window + 10 + r))
        if builder is not None:
            snap = builder.build(membership, store, kinds, probing)
        else:
            snap = build_snapshot(membership, store, kinds, probing)
        holder: list[Any] = []
        worker = threading.Thread(target=render, args=(snap.data, holder, renderer))
        worker.start()
        worker.join()
        line = json.dumps(snap.data, separators=(",", ":")) + "\n"  # the json output
        json_bytes = len(line)
        del line
        latest[:] = [snap, holder[0]]
        if release_free_memory is not None:
            release_free_memory()
        rounds.append(mb(proc))
        blocks.append(sys.getallocatedblocks())
    out["rss_rounds_mb"] = rounds
    out["allocated_blocks_rounds"] = blocks
    out["status_bytes"] = len(latest[1].status)
    out["beta_bytes"] = len(latest[1].beta)
    out["json_output_bytes"] = json_bytes
    t0 = time.perf_counter()
    gc.collect()  # a full collection, as the interpreter runs now and then on the loop
    out["gc_full_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    out["gc_tracked_objects"] = len(gc.get_objects())
    out["rss_end_mb"] = mb(proc)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["rss_after_malloc_trim_mb"] = mb(proc)
    except OSError:
        out["rss_after_malloc_trim_mb"] = None
    print(f"{out['root']}: {args.peers} peers, {len(series)} series, window {args.window}, "
          f"malloc env {out['malloc_env'] or '-'}, allocator tuned: {tuned}")
    print("| after imports MB | windows full MB | per round MB | end MB | after malloc_trim MB "
          "| /v1/status MB | /v1beta MB | tracked objects | full GC ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {out['rss_imports_mb']} | {out['rss_windows_full_mb']} "
          f"| {' '.join(map(str, rounds))} | {out['rss_end_mb']} "
          f"| {out['rss_after_malloc_trim_mb']} | {out['status_bytes'] / 2**20:.1f} "
          f"| {out['beta_bytes'] / 2**20:.1f} | {out['gc_tracked_objects']:,} "
          f"| {out['gc_full_ms']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
