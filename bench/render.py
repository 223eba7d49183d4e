"""Rendering cost at N peers: recording results, building snapshots, the API's and json's bytes.

Builds a membership of PEERS peers (a node and a health-endpoint address each, icmp and http:
4 × PEERS path/kind states, windows full), then times, best of ``--repeat``:
  * recording one round of results (``StateStore.record``, which renders each view);
  * a snapshot after a round (every node changed) and right after another (nothing changed);
  * a round's results plus the snapshot after it: comparable across checkouts that render
    the views at different times (when recorded, or when the snapshot reads them);
  * the API's documents for each: ``/v1/status`` (and ``/v1beta/status`` in checkouts that
    encode it with the snapshot), then, where it is encoded on first request instead,
    that first request's encoding (``api_beta_first_request_ms``);
  * the json output's encoding of a snapshot;
  * a full cyclic garbage collection over that state, before and after ``gc.freeze()``.
Runs against another checkout with ``PYTHONPATH=<checkout>`` (main has no incremental
builder: its ``build_snapshot`` and ``Rendered.build`` are timed instead). No network.

    .venv/bin/python bench/render.py [--peers 5000] [--repeat 3] [--json out.json]
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)
from __future__ import annotations

import sys

# bench/ holds http.py: keep the folder off sys.path so ``import http`` finds the stdlib.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rpartition("/")[0] or ".")]

import argparse
import gc
import json
import os
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import healthmesh
from healthmesh.core import snapshot as snapshot_mod
from healthmesh.core.config import ProbingSettings
from healthmesh.core.membership import Membership
from healthmesh.core.model import Node, ProbeResult
from healthmesh.core.state import StateStore
from healthmesh.plugins.api import views as views_mod

KINDS = ["http", "icmp"]


def best(repeat: int, fn: Callable[[], Any], before: Callable[[], Any] | None = None) -> float:
    """The fastest of ``repeat`` runs of ``fn`` in ms (``before`` runs untimed first)."""
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(min(times) * 1000.0, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    if not 1 <= args.peers <= 100_000 or not 1 <= args.repeat <= 20:
        ap.error("--peers 1-100000, --repeat 1-20")
    rng = random.Random(1)
    m = Membership(Node("bench", addresses=("127.0.0.1",)))
    m.feed("static")
    m.replace("static", [
        Node(f"peer-{i}", addresses=(f"127.1.{i // 250}.{i % 250 + 1}",),
             health_addresses=(f"127.2.{i // 250}.{i % 250 + 1}",))
        for i in range(args.peers)
    ])
    store = StateStore(9, 100)
    probing = ProbingSettings(interval=healthmesh.Duration(10.0))
    keys = [(path.key, kind) for node in m.nodes()
            for path in m.paths_of(node, host=True, endpoint=True) for kind in KINDS]
    for key, kind in keys:
        store.ensure(key, kind)
    t0 = time.time()
    rounds = [0]

    def one_round() -> None:
        r = rounds[0] = rounds[0] + 1
        for key, kind in keys:
            details: dict[str, Any] = (
                {"sent": 1, "received": 1, "echo_loss_pct": 0.0, "late": 0} if kind == "icmp"
                else {"connect_ms": rng.uniform(0.05, 0.2), "ttfb_ms": rng.uniform(0.05, 0.2)}
            )
            start = t0 + 10.0 * r + rng.random() * 10.0
            store.record(key, kind, ProbeResult(True, rng.uniform(1e-4, 3e-4), None, details,
                                                start, start + 0.0003))

    for _ in range(100):  # fill the windows
        one_round()
    builder = snapshot_mod.SnapshotBuilder() if hasattr(snapshot_mod, "SnapshotBuilder") else None
    renderer = (views_mod.IncrementalRenderer() if hasattr(views_mod, "IncrementalRenderer")
                else None)

    def snap() -> Any:
        if builder is not None:
            return builder.build(m, store, KINDS, probing, timestamp=t0)
        return snapshot_mod.build_snapshot(m, store, KINDS, probing, timestamp=t0)

    def render(data: dict[str, Any]) -> Any:
        return renderer.build(data) if renderer is not None else views_mod.Rendered.build(data)

    encode_json: Callable[[dict[str, Any]], Any]
    out_src = Path(views_mod.__file__).parent.parent / "outputs" / "json.py"
    if "msgspec" in out_src.read_text():
        import msgspec

        encode_json = msgspec.json.Encoder().encode
    else:
        def encode_json(data: dict[str, Any]) -> Any:
            return json.dumps(data, separators=(",", ":"))

    res: dict[str, Any] = {"peers": args.peers, "series": len(keys),
                           "incremental": builder is not None}
    res["record_round_ms"] = best(args.repeat, one_round)
    res["record_us_per_result"] = round(res["record_round_ms"] * 1000.0 / len(keys), 1)
    holder: dict[str, Any] = {}

    def fresh() -> None:
        one_round()
        holder["data"] = snap().data
        render(holder["data"])

    res["snapshot_changed_ms"] = best(args.repeat, snap, one_round)
    res["round_and_snapshot_ms"] = best(args.repeat, lambda: (one_round(), snap()))
    res["snapshot_unchanged_ms"] = best(args.repeat, snap, snap)
    res["api_changed_ms"] = best(args.repeat, lambda: render(holder["data"]),
                                 lambda: (one_round(), holder.update(data=snap().data)))
    res["api_unchanged_ms"] = best(args.repeat, lambda: render(snap().data), fresh)
    if "_beta" in getattr(views_mod.Rendered, "__dataclass_fields__", {}):
        res["api_beta_first_request_ms"] = best(
            args.repeat, lambda: views_mod.Rendered(holder["data"], b"").beta)
    res["json_output_ms"] = best(args.repeat, lambda: encode_json(holder["data"]))
    res["gc_full_ms"] = best(args.repeat, gc.collect)
    res["gc_tracked"] = len(gc.get_objects())
    gc.freeze()
    res["gc_full_after_freeze_ms"] = best(args.repeat, gc.collect)
    gc.unfreeze()
    print(f"bench/render.py: {healthmesh.__file__.rsplit('/healthmesh/', 1)[0]}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load {os.getloadavg()[0]:.1f}, best of {args.repeat}")
    print("| measure | value |")
    print("|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
