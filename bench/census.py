"""Memory census of a real running agent: where its RSS goes, by allocation site and by type.

Runs ``healthmesh run -o json`` in this process (the same entry point as the command; its
json lines go to /dev/null) with PEERS loopback peers configured as ``bench/agent.py``
does (node + endpoint address each, icmp + http, the agent's own responder answering HTTP,
API on a unix socket). A thread of its own waits until the API reports ROUNDS completed
rounds, then SETTLE seconds more (mid-round, steady state), and takes:

  * the RSS, Python's live memory blocks and the bytes tracemalloc traces (when tracing);
  * a tracemalloc snapshot (``--trace``, started before the agent, ``--frames`` deep):
    the top allocation sites by size, and the totals per file;
  * a census of the objects the cyclic collector tracks (frozen ones included) and the
    untracked objects they refer to (bytes, str, floats, arrays ...), by type: count and
    ``sys.getsizeof`` bytes — cheaper than tracing, and it names what is kept, not where;

then stops the agent with SIGTERM and prints the tables. Tracing slows every allocation
(CPU ≈ 2× and more memory), so ``--trace`` is for the breakdown, not for RSS or CPU figures:
the RSS the agent has without it is ``bench/agent.py``'s. All traffic stays on 127/8.

    .venv/bin/python bench/census.py [--peers 5000] [--interval 30] [--rounds 3]
        [--settle 10] [--trace] [--frames 1] [--top 25] [--json out.json]

``HM_ROOT=<checkout>`` runs another checkout's agent (e.g. main) under the same census.
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
import shutil
import signal
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("HM_ROOT", str(ROOT)))


def mb(n: float) -> float:
    return round(n / 2**20, 1)


def object_census(top: int) -> tuple[list[dict[str, Any]], int, int]:
    """Tracked objects and their untracked referents by type: (rows, objects, bytes)."""
    gc.unfreeze()  # frozen objects are not in gc.get_objects(); the agent stops after this
    tracked = gc.get_objects()
    seen: set[int] = set()
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()

    def add(obj: Any) -> None:
        seen.add(id(obj))
        name = type(obj).__qualname__
        mod = type(obj).__module__
        if mod not in ("builtins", None):
            name = f"{mod}.{name}"
        count[name] += 1
        try:
            size[name] += sys.getsizeof(obj)
        except TypeError:
            pass

    for obj in tracked:
        if id(obj) not in seen:
            add(obj)
    for obj in tracked:
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not gc.is_tracked(ref):
                add(ref)
    del tracked
    rows = [{"type": name, "count": count[name], "mb": mb(size[name])}
            for name, _ in size.most_common(top)]
    return rows, sum(count.values()), sum(size.values())


def trace_tables(top: int) -> dict[str, Any]:
    snap = tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__),))
    sites = []
    for stat in snap.statistics("traceback")[:top]:
        frames = [f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback]  # caller first
        sites.append({"site": " → ".join(frames), "mb": mb(stat.size), "blocks": stat.count})
    files = []
    for stat in snap.statistics("filename")[:top]:
        name = stat.traceback[0].filename
        for prefix in (str(ROOT) + "/", os.environ.get("HM_ROOT", str(ROOT)) + "/",
                       sys.prefix + "/", sys.base_prefix + "/"):
            name = name.removeprefix(prefix)
        files.append({"file": name, "mb": mb(stat.size), "blocks": stat.count})
    return {"sites": sites, "files": files}


def rounds_completed(sock: Path) -> int:
    import httpx

    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                          base_url="http://localhost", timeout=30) as c:
            return int(c.get("/v1/healthz").json().get("rounds_completed", 0))
    except (httpx.HTTPError, ValueError):
        return -1


def sampler(out: dict[str, Any], stop: threading.Event) -> None:
    """Once a second from start: RSS, and with tracing the traced bytes' peak in that second."""
    proc = psutil.Process()
    t0 = time.monotonic()
    timeline: list[list[float]] = out.setdefault("timeline", [])
    while not stop.wait(1.0):
        row = [round(time.monotonic() - t0, 1), mb(proc.memory_info().rss)]
        if tracemalloc.is_tracing():
            row += [mb(n) for n in tracemalloc.get_traced_memory()]
            tracemalloc.reset_peak()
        timeline.append(row)


def trim() -> float | None:
    """glibc's malloc_trim(0): free memory of the C heap back to the system; RSS after."""
    import ctypes

    try:
        t = time.perf_counter()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        ms = (time.perf_counter() - t) * 1000
    except (OSError, AttributeError):
        return None
    print(f"malloc_trim(0): {ms:.1f} ms", file=sys.__stderr__)
    return mb(psutil.Process().memory_info().rss)


def pymalloc_stats() -> dict[str, float]:
    """pymalloc's own accounting (``sys._debugmallocstats``, which writes to fd 2): MB in
    arenas, in live blocks, free in used pools, in empty pools, in pool headers."""
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")
    wanted = {
        "# arenas allocated current": "arenas_current",
        "# bytes in allocated blocks": "in_live_blocks_mb",
        "# bytes in available blocks": "free_in_used_pools_mb",
        "# bytes lost to pool headers": "pool_headers_mb",
        "# bytes lost to quantization": "quantization_mb",
        "# bytes lost to arena alignment": "arena_alignment_mb",
    }
    got: dict[str, float] = {}
    for line in text.splitlines():
        head, _, value = line.rpartition("=")
        head = head.strip()
        try:
            number = int(value.strip().replace(",", ""))
        except ValueError:
            continue
        if "unused pools" in head:
            got["empty_pools_mb"] = mb(number)
            continue
        for prefix, name in wanted.items():
            if head.startswith(prefix) and name not in got:
                got[name] = number if name == "arenas_current" else mb(number)
                break
    return got


def watcher(args: argparse.Namespace, sock: Path, out: dict[str, Any], failed: list[str]) -> None:
    proc = psutil.Process()
    stop = threading.Event()
    threading.Thread(target=sampler, args=(out, stop), daemon=True).start()
    deadline = time.monotonic() + 180 + args.rounds * args.interval * 2 + args.peers / 100
    try:
        while rounds_completed(sock) < args.rounds:
            if time.monotonic() > deadline:
                failed.append(f"no {args.rounds} rounds completed in time")
                return
            time.sleep(1.0)
        time.sleep(args.settle)
        stop.set()
        out["rss_mb"] = mb(proc.memory_info().rss)
        out["rss_after_malloc_trim_mb"] = trim()
        out["pymalloc"] = pymalloc_stats()
        out["python_blocks"] = sys.getallocatedblocks()
        out["threads"] = threading.active_count()
        if tracemalloc.is_tracing():
            traced, _ = tracemalloc.get_traced_memory()
            out["traced_mb"] = mb(traced)
            out["traced_peak_mb"] = max((r[3] for r in out["timeline"]), default=None)
            out["tracemalloc_overhead_mb"] = mb(tracemalloc.get_tracemalloc_memory())
            out.update(trace_tables(args.top))
            tracemalloc.stop()
        t = time.perf_counter()
        rows, objects, size = object_census(args.top)
        out["census_s"] = round(time.perf_counter() - t, 1)
        out["types"], out["objects"], out["objects_mb"] = rows, objects, mb(size)
    except Exception as exc:  # reported, then the agent is stopped
        failed.append(f"{type(exc).__name__}: {exc}")
    finally:
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=5000)
    ap.add_argument("--interval", type=float, default=30.0)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="completed rounds before the census")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after that round")
    ap.add_argument("--trace", action="store_true", help="tracemalloc from the start")
    ap.add_argument("--frames", type=int, default=1, help="tracemalloc frames per site")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    if not (1 <= args.peers <= 60_000 and args.interval > 0 and 1 <= args.rounds <= 100
            and 0 <= args.settle <= 600 and 1 <= args.frames <= 50 and 1 <= args.top <= 500):
        ap.error("--peers 1..60000, --rounds 1..100, --settle 0..600, --frames 1..50")
    sys.path.insert(0, str(ROOT / "bench"))
    from agent import free_port, write_config  # bench/agent.py's configuration

    tmp = Path(tempfile.mkdtemp(prefix="hm-bench-census-"))
    sock, cfg = tmp / "health.sock", tmp / "agent.toml"
    write_config(cfg, sock, args.peers, 0, args.interval, free_port(), args.window)
    out: dict[str, Any] = {
        "root": os.environ.get("HM_ROOT", str(ROOT)), "peers": args.peers,
        "interval_s": args.interval, "rounds": args.rounds, "settle_s": args.settle,
        "trace": args.trace, "frames": args.frames, "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load": round(os.getloadavg()[0], 1),
    }
    failed: list[str] = []
    if args.trace:
        tracemalloc.start(args.frames)
    threading.Thread(target=watcher, args=(args, sock, out, failed), daemon=True).start()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the agent's json lines
    try:
        from healthmesh.cli import main as healthmesh

        healthmesh(["run", "-c", str(cfg), "-o", "json"])
    except SystemExit:
        pass
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        shutil.rmtree(tmp, ignore_errors=True)
    if failed or "rss_mb" not in out:
        print(f"census failed: {'; '.join(failed) or 'the agent stopped first'}", file=sys.stderr)
        return 1
    print(f"{out['root']}: {args.peers} peers at {args.interval:g} s, census after "
          f"{args.rounds} rounds + {args.settle:g} s, {out['date']}, load {out['load']}")
    print(f"RSS {out['rss_mb']} MB ({out['rss_after_malloc_trim_mb']} after malloc_trim), "
          f"Python blocks {out['python_blocks']:,}, threads "
          f"{out['threads']}" + (f", traced {out['traced_mb']} MB (peak {out['traced_peak_mb']},"
                                 f" tracemalloc's own {out['tracemalloc_overhead_mb']})"
                                 if args.trace else ""))
    print(f"pymalloc: {out['pymalloc']}")
    print("\nmax RSS MB (with --trace: max traced peak MB) per 10 s from start:")
    line = out["timeline"]
    print("  ".join(
        f"{chunk[-1][0]:.0f}s {max(r[1] for r in chunk)}"
        + (f" ({max(r[3] for r in chunk)})" if len(chunk[0]) > 2 else "")
        for chunk in (line[i:i + 10] for i in range(0, len(line), 10))))
    if args.trace:
        print("\n| allocation site | MB | blocks |\n|---|---|---|")
        for s in out["sites"]:
            print(f"| {s['site']} | {s['mb']} | {s['blocks']:,} |")
        print("\n| file | MB | blocks |\n|---|---|---|")
        for f in out["files"]:
            print(f"| {f['file']} | {f['mb']} | {f['blocks']:,} |")
    print(f"\nobjects: {out['objects']:,}, {out['objects_mb']} MB (sys.getsizeof; census took "
          f"{out['census_s']} s)\n| type | count | MB |\n|---|---|---|")
    for r in out["types"]:
        print(f"| {r['type']} | {r['count']:,} | {r['mb']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
