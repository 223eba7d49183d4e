"""Memory and CPU cost of the per-path statistics (core/state.py), per series, with tracemalloc.

Builds a ``StateStore`` holding PEERS × 2 addresses × 2 kinds series (icmp and http, the
results shaped like the real probes': http with connect_ms/ttfb_ms, icmp with
sent/received/echo_loss_pct/late), folds WINDOW + 10 results into every series (the window
full and turning over, about 2 % of them failures), renders every JSON view once (as a
snapshot does), and reports:
  * bytes per series held (tracemalloc, after a GC), and the top allocation sites;
  * µs of CPU per ``StateStore.record`` and per ``view`` once the window is full.

    .venv/bin/python bench/state.py [--peers 1000] [--window 100] [--top 8] [--json out.json]
        [--compare OTHER_CHECKOUT]

``--compare`` runs the same measurement on another checkout (HM_ROOT, e.g. main) in a
subprocess and prints both, before and after, side by side.
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
import subprocess
import tempfile
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("HM_ROOT", str(ROOT)))

from healthmesh.core.model import ProbeResult
from healthmesh.core.state import StateStore


def result(kind: str, rng: random.Random, t: float) -> ProbeResult:
    """One result shaped like the real probe's (same detail keys and value types)."""
    if rng.random() < 0.02:
        if kind == "http":
            return ProbeResult(False, None, "timeout after 1s", {"connect_ms": 0.2}, t, t + 1)
        return ProbeResult(False, None, "timeout after 1s",
                           {"sent": 1, "received": 0, "echo_loss_pct": 100.0, "late": 0}, t, t + 1)
    rtt = rng.uniform(0.0001, 0.002)
    if kind == "http":
        details: dict[str, Any] = {"connect_ms": round(rtt * 400, 3),
                                   "ttfb_ms": round(rtt * 500, 3)}
    else:
        details = {"sent": 1, "received": 1, "echo_loss_pct": 0.0, "late": 0}
    return ProbeResult(True, rtt, None, details, t, t + rtt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--top", type=int, default=8, help="allocation sites to list")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--compare", metavar="CHECKOUT",
                    help="also measure this checkout (e.g. /work/main) and print both")
    args = ap.parse_args()
    other = None
    if args.compare:
        other = compare(args, Path(args.compare))
    rng = random.Random(1)
    keys = [((f"default/peer-{i}", f"127.{1 + j}.{i // 250}.{i % 250 + 1}", role), kind)
            for i in range(args.peers)
            for j, role in enumerate(("host", "endpoint"))
            for kind in ("http", "icmp")]
    gc.collect()
    tracemalloc.start(1)
    base = tracemalloc.take_snapshot()
    base_bytes = tracemalloc.get_traced_memory()[0]
    store = StateStore(9, args.window)
    for key, kind in keys:
        store.ensure(key, kind)
    t = time.time()
    for r in range(args.window + 10):
        for key, kind in keys:
            store.record(key, kind, result(kind, rng, t + r))
    for key, kind in keys:
        store.view(key, kind)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base_bytes
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    top = snap.compare_to(base, "lineno")[: args.top]
    sites = [{"site": f"{Path(s.traceback[0].filename).name}:{s.traceback[0].lineno}",
              "bytes_per_series": round(s.size_diff / len(keys)),
              "blocks_per_series": round(s.count_diff / len(keys), 1)} for s in top]

    # CPU per record and per view with the window full (tracemalloc off).
    results = [result(kind, rng, t + 1000) for key, kind in keys]
    c0 = time.process_time()
    for (key, kind), res in zip(keys, results):
        store.record(key, kind, res)
    rec_us = (time.process_time() - c0) / len(keys) * 1e6
    c0 = time.process_time()
    for key, kind in keys:
        store._cache.pop((key, kind), None) if hasattr(store, "_cache") else None
        store.view(key, kind)
    view_us = (time.process_time() - c0) / len(keys) * 1e6

    out: dict[str, Any] = {
        "root": os.environ.get("HM_ROOT", str(ROOT)),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "series": len(keys),
        "window": args.window,
        "bytes_per_series": round(held / len(keys)),
        "total_mb": round(held / 2**20, 1),
        "record_us": round(rec_us, 1),
        "view_us": round(view_us, 1),
        "top_sites": sites,
    }
    print(f"{out['series']} series, window {args.window}: {out['bytes_per_series']} B/series "
          f"({out['total_mb']} MB); record {out['record_us']} µs, view {out['view_us']} µs")
    print(f"{'allocation site':<24} {'B/series':>9} {'blocks/series':>14}")
    for s in sites:
        print(f"{s['site']:<24} {s['bytes_per_series']:>9} {s['blocks_per_series']:>14}")
    if other is not None:
        print(f"\n{'':<24} {'before':>10} {'after':>10}   (before: {args.compare})")
        for key in ("bytes_per_series", "total_mb", "record_us", "view_us"):
            print(f"{key:<24} {other[key]:>10} {out[key]:>10}")
        out = {"before": other, "after": out}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def compare(args: argparse.Namespace, checkout: Path) -> dict[str, Any]:
    """The same measurement on ``checkout``, run in a subprocess (its own interpreter)."""
    if not (checkout / "healthmesh" / "core" / "state.py").is_file():
        raise SystemExit(f"--compare: {checkout} is not a healthmesh checkout")
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "before.json"
        subprocess.run([sys.executable, __file__, "--peers", str(args.peers),
                        "--window", str(args.window), "--top", str(args.top),
                        "--json", str(dest)],
                       env={**os.environ, "HM_ROOT": str(checkout)}, check=True, timeout=3600)
        print()
        return json.loads(dest.read_text())


if __name__ == "__main__":
    sys.exit(main())
