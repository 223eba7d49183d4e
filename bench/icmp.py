"""Benchmark: healthmesh's icmp probe against ``fping -C1`` on the same loopback peers.

Simulated peers are 127.1.0.1, 127.1.0.2, ... (Linux answers echo on every 127/8 address).
For each peer count, one round paced evenly over ``--round`` seconds and one round with
every probe at once; each tool runs in its own process, one after the other, so that CPU
time (getrusage of that process) is its own. Needs root (raw sockets, ``fping -i 0``).

    .venv/bin/python bench/icmp.py --json bench-icmp.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path as FsPath
from typing import Any

ROOT = FsPath(__file__).resolve().parent.parent

#: The targets the issue sets, relative to fping in the same run.
MEDIAN_FACTOR = 2.0
P99_FACTOR = 5.0
CPU_FACTOR = 3.0


def peer_addresses(n: int) -> list[str]:
    """``n`` loopback addresses 127.1.0.1 ... (250 per /24, never .0 or .255)."""
    if n > 250 * 256:
        raise SystemExit("at most 64,000 peers")
    return [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(n)]


def quantile(values: list[float], q: float) -> float | None:
    """Linear-interpolated quantile of ``values`` (None when empty)."""
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(tool: str, pacing: str, n: int, rtts_ms: list[float], cpu_s: float,
              round_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of the results table."""
    return {
        "tool": tool,
        "pacing": pacing,
        "peers": n,
        "dead": n - len(rtts_ms),
        "median_ms": quantile(rtts_ms, 0.5),
        "p99_ms": quantile(rtts_ms, 0.99),
        "cpu_s": cpu_s,
        "cpu_s_per_1000": cpu_s * 1000.0 / n,
        "round_s": round_s,
        **(extra or {}),
    }


# -- fping ------------------------------------------------------------------------------


def run_fping(fping: str, addresses: list[str], pacing: str, round_s: float,
              timeout: float) -> dict[str, Any]:
    """``fping -C1`` over ``addresses``; CPU is the child's rusage from wait4."""
    n = len(addresses)
    interval_ms = 0 if pacing == "all-at-once" else max(1, round(round_s * 1000 / n))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(addresses) + "\n")
        target_file = f.name
    cmd = [fping, "-C1", "-q", "-t", str(int(timeout * 1000)), "-i", str(interval_ms),
           "-f", target_file]
    try:
        # fping writes its -C report at exit: to a file, as a pipe would fill and block it.
        with tempfile.TemporaryFile() as report:
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=report)
            _pid, _status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
            proc.returncode = _status
            report.seek(0)
            err = report.read().decode()
    finally:
        os.unlink(target_file)
    rtts = []
    for line in err.splitlines():
        _addr, sep, value = line.partition(" : ")
        if sep and value.strip() not in ("-", ""):
            rtts.append(float(value.split()[0]))
    cpu = usage.ru_utime + usage.ru_stime
    return summarize("fping -C1", pacing, n, rtts, cpu, wall,
                     {"command": " ".join([*cmd[:-1], "PEERS.txt"])})


# -- healthmesh (worker process) --------------------------------------------------------


def cpu_now() -> float:
    """CPU seconds (user + system) used by this process so far."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


async def healthmesh_round(variant: str, addresses: list[str], pacing: str, round_s: float,
                           timeout: float, tick: float) -> dict[str, Any]:
    """One round of the icmp probe in this process; CPU counts the round only."""
    from healthmesh import Path, ProbeResult
    from healthmesh.plugins.icmp import IcmpProbe, IcmpSettings

    paths = [Path(f"peer{i}", a, "host", True) for i, a in enumerate(addresses)]
    n = len(paths)
    results: list[ProbeResult | None] = [None] * n
    loop = asyncio.get_running_loop()

    async with IcmpProbe(IcmpSettings(), None) as probe:

        async def one(i: int) -> None:
            results[i] = await probe.probe(paths[i], timeout)

        async def batch(lo: int, hi: int) -> None:
            results[lo:hi] = await probe.probe_many(paths[lo:hi], timeout)

        # The measured round is the agent's steady state, not its first contact with a peer.
        await probe.probe_many(paths, timeout)
        await asyncio.sleep(0.2)
        tasks: set[asyncio.Task[None]] = set()
        cpu0 = cpu_now()
        start = loop.time()
        if pacing == "all-at-once":
            if variant == "batched":
                tasks.add(loop.create_task(batch(0, n)))
            else:
                tasks.update(loop.create_task(one(i)) for i in range(n))
        elif variant == "batched":
            # Every tick, one probe_many for the paths that became due during it.
            spacing = round_s / n
            sent = 0
            while sent < n:
                due = min(n, int((loop.time() - start) / spacing) + 1)
                if due > sent:
                    tasks.add(loop.create_task(batch(sent, due)))
                    sent = due
                if sent < n:
                    await asyncio.sleep(tick)
        else:
            spacing = round_s / n
            for i in range(n):
                delay = start + i * spacing - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.add(loop.create_task(one(i)))
        await asyncio.gather(*tasks)
        wall = loop.time() - start
        cpu = cpu_now() - cpu0
        counters = vars(probe.counters).copy()
        mode = probe.mode
    rtts = [r.rtt * 1000.0 for r in results if r is not None and r.ok and r.rtt is not None]
    errors: dict[str, int] = {}
    for r in results:
        if r is not None and not r.ok:
            errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
    name = "healthmesh icmp" + (" (probe_many per tick)" if variant == "batched"
                                else " (a task per probe)")
    return summarize(name, pacing, n, rtts, cpu, wall,
                     {"variant": variant, "socket": mode, "counters": counters,
                      "errors": errors})


async def scheduler_round(addresses: list[str], pacing: str, round_s: float, timeout: float,
                          tick: float) -> dict[str, Any]:
    """One round through the agent's own Scheduler (ticks, probe_many), CPU of that round."""
    import anyio
    from loguru import logger

    from healthmesh import Duration, Path
    from healthmesh.core.config import ProbingSettings
    from healthmesh.core.scheduler import RoundInfo, Scheduler
    from healthmesh.core.state import StateStore
    from healthmesh.plugins.icmp import IcmpProbe, IcmpSettings

    logger.remove()  # the scheduler logs every state change; not part of the measurement
    paths = [Path(f"peer{i}", a, "host", True) for i, a in enumerate(addresses)]
    n = len(paths)
    probing = ProbingSettings(
        interval=Duration(round_s), timeout=Duration(timeout), tick=Duration(tick),
        max_rate=1e9 if pacing == "all-at-once" else 1000.0,
    )
    store = StateStore(9, 100)
    marks: dict[str, float] = {}
    done = anyio.Event()

    async def on_round(rnd: RoundInfo) -> None:
        if rnd.number == 1:
            marks["cpu"] = cpu_now() - marks["cpu0"]
            marks["wall"] = rnd.duration or 0.0
            done.set()

    async with IcmpProbe(IcmpSettings(), None) as probe:  # type: ignore[arg-type]
        sched = Scheduler(probing, {"icmp": probe}, store, seed="bench", on_round=on_round)
        sched.set_paths(paths)
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: sched.run(rounds=False, task_status=task_status))
            await sched.probe_all()  # first contact, not measured
            await anyio.sleep(0.2)
            if pacing == "all-at-once":
                marks["cpu0"] = cpu_now()
                start = anyio.current_time()
                await sched.probe_all()
                marks["cpu"] = cpu_now() - marks["cpu0"]
                marks["wall"] = anyio.current_time() - start
            tg.cancel_scope.cancel()
        if pacing != "all-at-once":
            # Round 0 runs at max_rate; round 1 is the steady, paced round that is measured.
            async with anyio.create_task_group() as tg:
                sched2 = Scheduler(probing, {"icmp": probe}, store, seed="bench",
                                   on_round=on_round)
                sched2.set_paths(paths)
                marks["cpu0"] = 0.0

                async def mark_start() -> None:
                    while not sched2.rounds or sched2.rounds[-1].number < 1:
                        await anyio.sleep(0.001)
                    marks["cpu0"] = cpu_now()

                tg.start_soon(sched2.run)
                await mark_start()
                with anyio.fail_after(round_s + timeout + 30):
                    await done.wait()
                tg.cancel_scope.cancel()
        mode = probe.mode
    rtts: list[float] = []
    dead = 0
    for path in paths:
        st = store.get(path.key, "icmp")
        last = None if st is None else st.last
        if last is not None and last.ok and last.rtt is not None:
            rtts.append(last.rtt * 1000.0)
        else:
            dead += 1
    row = summarize("healthmesh icmp (agent Scheduler)", pacing, n, rtts, marks["cpu"],
                    marks["wall"], {"variant": "scheduler", "socket": mode, "tick_s": tick})
    return row


def combine(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one case as one row: the median of each figure, the worst dead count."""
    if len(rows) == 1:
        return rows[0]
    out = dict(rows[-1])
    for key in ("median_ms", "p99_ms", "cpu_s", "cpu_s_per_1000", "round_s"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    out["dead"] = max(r["dead"] for r in rows)
    out["runs"] = len(rows)
    return out


def run_healthmesh(variant: str, n: int, pacing: str, round_s: float, timeout: float,
                   tick: float, sched_tick: float = 0.05) -> dict[str, Any]:
    """Run one healthmesh round in a fresh worker process and read its JSON row."""
    cmd = [sys.executable, str(FsPath(__file__).resolve()), "--worker", variant,
           "--peers", str(n), "--pacing", pacing, "--round", str(round_s),
           "--timeout", str(timeout), "--tick", str(tick), "--sched-tick", str(sched_tick)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          timeout=round_s + timeout + 120)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


# -- report ---------------------------------------------------------------------------


def judge(rows: list[dict[str, Any]], round_s: float, timeout: float) -> None:
    """Add the issue's pass/fail checks to every healthmesh row, against fping's row."""
    reference = {(r["peers"], r["pacing"]): r for r in rows if r["tool"].startswith("fping")}
    for r in rows:
        if r["tool"].startswith("fping"):
            continue
        ref = reference.get((r["peers"], r["pacing"]))
        checks: dict[str, bool] = {"no live peer dead": r["dead"] == 0}
        if ref is not None and ref["median_ms"] and r["median_ms"] is not None:
            checks[f"median <= {MEDIAN_FACTOR:g}x fping"] = (
                r["median_ms"] <= MEDIAN_FACTOR * ref["median_ms"])
            checks[f"p99 <= {P99_FACTOR:g}x fping"] = r["p99_ms"] <= P99_FACTOR * ref["p99_ms"]
            checks[f"CPU <= {CPU_FACTOR:g}x fping"] = (
                r["cpu_s_per_1000"] <= CPU_FACTOR * ref["cpu_s_per_1000"])
        if r["pacing"] == "paced":
            checks["round <= interval + timeout"] = r["round_s"] <= round_s + timeout
        r["checks"] = checks


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    head = ("| peers | pacing | tool | dead | median ms | p99 ms | CPU s / 1000 probes "
            "| round s | targets |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        checks = r.get("checks")
        verdict = "" if checks is None else (
            "all met" if all(checks.values())
            else "missed: " + ", ".join(k for k, ok in checks.items() if not ok))
        lines.append(
            f"| {r['peers']:,} | {r['pacing']} | {r['tool']} | {r['dead']} "
            f"| {fmt(r['median_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['cpu_s_per_1000'])} "
            f"| {fmt(r['round_s'], 2)} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; run the worker, or the whole comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="1000,5000",
                    help="comma-separated peer counts (default 1000,5000)")
    ap.add_argument("--round", type=float, default=10.0, help="paced round length, s")
    ap.add_argument("--timeout", type=float, default=1.0, help="probe timeout, s")
    ap.add_argument("--tick", type=float, default=0.05,
                    help="batching tick of the probe_many variant, s")
    ap.add_argument("--pacing", default="paced,all-at-once",
                    help="comma-separated: paced, all-at-once")
    ap.add_argument("--variants", default="scheduler,batched,tasks",
                    help="healthmesh variants: scheduler (the agent's own Scheduler and "
                    "its ticks), batched (probe_many), tasks (probe per task)")
    ap.add_argument("--sched-tick", type=float, default=0.05,
                    help="the scheduler variant's tick ([probing] tick), s")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each all-at-once case (the median is shown); paced run once")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.peers.split(",")]
    pacings = args.pacing.split(",")

    if args.worker == "scheduler":
        row = asyncio.run(scheduler_round(peer_addresses(counts[0]), pacings[0], args.round,
                                          args.timeout, args.sched_tick))
        print(json.dumps(row))
        return 0
    if args.worker:
        row = asyncio.run(healthmesh_round(args.worker, peer_addresses(counts[0]), pacings[0],
                                           args.round, args.timeout, args.tick))
        print(json.dumps(row))
        return 0

    fping = shutil.which("fping")
    if fping is None:
        print("needs fping (apt-get install fping)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("run as root: raw ICMP sockets and fping -i 0", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    for n in counts:
        addresses = peer_addresses(n)
        for pacing in pacings:
            runs = 1 if pacing == "paced" else max(1, args.repeat)
            rows.append(combine([run_fping(fping, addresses, pacing, args.round, args.timeout)
                                 for _ in range(runs)]))
            print(f"{n} {pacing} fping done", file=sys.stderr)
            for variant in args.variants.split(","):
                rows.append(combine([
                    run_healthmesh(variant, n, pacing, args.round, args.timeout, args.tick,
                                   args.sched_tick)
                    for _ in range(runs)
                ]))
                print(f"{n} {pacing} healthmesh {variant} done", file=sys.stderr)
    judge(rows, args.round, args.timeout)
    print(table(rows))
    fping_version = subprocess.run([fping, "-v"], capture_output=True, text=True).stdout.strip()
    meta = {
        "command": "bench/icmp.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fping": fping_version,
        "round_s": args.round,
        "timeout_s": args.timeout,
        "median_of_fping": {f"{r['peers']} {r['pacing']}": r["median_ms"]
                            for r in rows if r["tool"].startswith("fping")},
    }
    print(f"\n{meta['date']}, {meta['cpus']} CPUs, Linux {meta['kernel']}, "
          f"Python {meta['python']}, {fping_version}")
    if args.json:
        FsPath(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    met = all(all(r.get("checks", {}).values()) for r in rows)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
