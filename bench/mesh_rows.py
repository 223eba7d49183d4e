"""Benchmark of mesh rows in etcd: a row's size and cost at N peers, and the write load.

For each mesh size N, builds a realistic row of N peers (sub-ms RTTs, 10% of cells with
some loss, 1% with a failing kind), encodes it as the etcd plugin does (compact JSON, zlib)
and decodes it back with the full validation, then computes the cluster-wide write load
from the publishing rules (docs/mesh.md, "Load on etcd"):

  * each agent writes at most once per gap(N) = max(rows_min_gap, N / 100) seconds, so the
    whole mesh writes at most N / gap(N) <= 100 rows per second;
  * steady state (no state change): one refresh per max(rows_refresh, gap(N)) per agent.

No network: the measured write counts of a real 4-node mesh are in tests/test_mesh_netlab.py.

    .venv/bin/python bench/mesh_rows.py [--sizes 4,100,1000,5000] [--json out.json]
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)
from __future__ import annotations

import sys

# bench/ holds http.py: keep the folder off sys.path so ``import http`` finds the stdlib.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rpartition("/")[0] or ".")]

import argparse
import json
import platform
import random
import statistics
import time
import zlib
from datetime import datetime, timezone
from typing import Any

from healthmesh.plugins.clustermesh.rows import WRITE_BUDGET, decode_row, encode_row

MIN_GAP = 2.0  # rows_min_gap default
REFRESH = 60.0  # rows_refresh default
ETCD_LIMIT = 1_572_864


def make_row(n: int, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    cells = {}
    for i in range(n):
        bad = rng.random() < 0.01
        cells[f"default/node-{i:05d}"] = {
            "state": "degraded" if bad else "reachable",
            "kinds": {"http": "unreachable" if bad else "reachable", "icmp": "reachable"},
            "rtt_ms": round(rng.uniform(0.1, 2.0), 3),
            "loss_pct": 0.0 if rng.random() < 0.9 else round(rng.uniform(0, 10), 2),
            "since": float(1_796_000_000 + rng.randrange(100_000)),
        }
    return {"observer": "default/node-00000", "timestamp": time.time(), "cells": cells}


def measure(n: int, repeat: int = 5) -> dict[str, Any]:
    row = make_row(n)
    enc, dec = [], []
    value = b""
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = encode_row(row)
        enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decode_row("default", "node-00000", value, max_bytes=ETCD_LIMIT)
        dec.append(time.perf_counter() - t0)
    gap = max(MIN_GAP, n / WRITE_BUDGET)
    worst_w = n / gap
    steady_w = n / max(REFRESH, gap)
    size = len(value)
    return {
        "nodes": n,
        "row_bytes": size,
        "raw_json_bytes": len(zlib.decompress(value)),
        "share_of_etcd_limit_pct": round(100 * size / ETCD_LIMIT, 2),
        "encode_ms": round(statistics.median(enc) * 1000, 2),
        "decode_ms": round(statistics.median(dec) * 1000, 2),
        "gap_s": gap,
        "steady_writes_per_s": round(steady_w, 2),
        "steady_mb_per_s": round(steady_w * size / 1e6, 3),
        "worst_writes_per_s": round(worst_w, 2),
        "worst_mb_per_s": round(worst_w * size / 1e6, 3),
        "watch_out_mb_per_s_all_read": round(steady_w * size * n / 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4,100,1000,5000")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    results = [measure(int(n)) for n in args.sizes.split(",")]
    cols = ["nodes", "row_bytes", "raw_json_bytes", "share_of_etcd_limit_pct", "encode_ms",
            "decode_ms", "gap_s", "steady_writes_per_s", "steady_mb_per_s",
            "worst_writes_per_s", "worst_mb_per_s", "watch_out_mb_per_s_all_read"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    ok = all(r["worst_writes_per_s"] <= 100 and r["worst_mb_per_s"] <= 10 for r in results)
    print(f"targets (<= 100 writes/s and <= 10 MB/s cluster-wide): {'met' if ok else 'MISSED'}")
    if args.json:
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "python": platform.python_version(), "machine": platform.machine()}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
