"""Benchmark: a well-behaved client's ``/hello`` latency while other clients pipeline-flood.

Starts ``healthmesh responder`` in its own process on 127.0.0.1:PORT, then for each case
runs tests/flooder.py (another process: CONNECTIONS connections, each writing 2,000
pipelined ``GET /hello`` per write, reading the answers or not) for SECONDS, while this
process probes ``/hello`` on a new connection every 10 ms with the http probe's
``http_get`` (1 s timeout, as peers use). The latency is the probe's RTT: from
``connect()`` to the kernel's receive time of the answer, so this process's own
scheduling delay is not counted. Reported: probes, failures, p50, p99 and max latency,
the responder's CPU share. All traffic stays on 127.0.0.1; every case is bounded in time.

    .venv/bin/python bench/flood.py [--seconds 5] [--connections 10,200] [--json out.json]

``--source DIR`` runs the responder from another source tree (e.g. an older commit
unpacked with ``git archive REV healthmesh | tar -x -C DIR``) to compare before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import psutil

from healthmesh.plugins.http import http_get

ROOT = Path(__file__).resolve().parent.parent
FLOODER = ROOT / "tests" / "flooder.py"


@dataclass
class Row:
    case: str
    probes: int
    failures: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    responder_cpu_pct: float
    flood: dict[str, int]


class Responder:
    """``healthmesh responder`` on 127.0.0.1:port, optionally from another source tree."""

    def __init__(self, port: int, loop: str, source: str | None) -> None:
        env = dict(os.environ)
        if source:
            env["PYTHONPATH"] = source
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "healthmesh", "responder", "-l", f"127.0.0.1:{port}",
             "--loop", loop, "--log-level", "WARNING"],
            cwd=source or ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
        self.port = port
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"responder exited: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            if anyio.run(http_get, "127.0.0.1", port, "/hello", 1.0, backend="asyncio").ok:
                return
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"responder on port {port} did not start")

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> str:
        """Stop it; its stderr (to look for tracebacks)."""
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


async def measure(port: int, seconds: float) -> tuple[list[float], int]:
    """Probe /hello every 10 ms for ``seconds``: (latencies in ms, failures)."""
    rtts: list[float] = []
    failures = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        r = await http_get("127.0.0.1", port, "/hello", 1.0)
        if r.ok and r.rtt is not None:
            rtts.append(r.rtt * 1000)
        else:
            failures += 1
        await anyio.sleep(0.01)
    return rtts, failures


def run_case(resp: Responder, connections: int, mode: str, seconds: float) -> Row:
    flood = None
    if connections:
        flood = subprocess.Popen(
            [sys.executable, str(FLOODER), "--port", str(resp.port), "--connections",
             str(connections), "--seconds", str(seconds + 0.5), "--mode", mode],
            stdout=subprocess.PIPE, text=True,
        )
        time.sleep(0.3)  # let the flood get going
    cpu0, t0 = resp.cpu(), time.monotonic()
    rtts, failures = anyio.run(measure, resp.port, seconds, backend="asyncio")
    cpu_pct = 100 * (resp.cpu() - cpu0) / (time.monotonic() - t0)
    counts: dict[str, int] = {}
    if flood is not None:
        out, _ = flood.communicate(timeout=60)
        counts = json.loads(out)
    rtts.sort()
    name = f"{connections} × {mode}" if connections else "no flood"
    return Row(
        name, len(rtts) + failures, failures,
        statistics.median(rtts) if rtts else None,
        rtts[min(len(rtts) - 1, len(rtts) * 99 // 100)] if rtts else None,
        rtts[-1] if rtts else None, cpu_pct, counts,
    )


def table(rows: list[Row]) -> str:
    head = (f"| {'flooding connections':<20} | {'probes':>6} | {'failed':>6} | {'p50':>9} | "
            f"{'p99':>9} | {'max':>9} | {'responder CPU':>13} |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]

    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f} ms"

    for r in rows:
        lines.append(
            f"| {r.case:<20} | {r.probes:>6} | {r.failures:>6} | {ms(r.p50_ms):>9} | "
            f"{ms(r.p99_ms):>9} | {ms(r.max_ms):>9} | {r.responder_cpu_pct:>12.0f}% |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each case")
    ap.add_argument("--connections", default="10,200", help="flooding connections per case")
    ap.add_argument("--modes", default="read,noread", help="flooders read answers or not")
    ap.add_argument("--port", type=int, default=14241)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--source", metavar="DIR", help="run the responder from this source tree")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    a = ap.parse_args()
    if not 0 < a.seconds <= 60:
        ap.error("--seconds: between 0 and 60")
    counts = [int(c) for c in a.connections.split(",")]
    if any(not 0 < c <= 1000 for c in counts):
        ap.error("--connections: each between 1 and 1000")
    resp = Responder(a.port, a.loop, a.source)
    rows = []
    try:
        rows.append(run_case(resp, 0, "-", a.seconds))
        for c in counts:
            for mode in a.modes.split(","):
                rows.append(run_case(resp, c, mode, a.seconds))
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        err = resp.stop()
    tracebacks = err.count("Traceback")
    print(f"responder {a.source or 'this tree'} on {a.loop}, {a.seconds:g} s per case, "
          f"{platform.node()} ({os.cpu_count()} CPUs); tracebacks in its log: {tracebacks}")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "loop": a.loop, "seconds": a.seconds,
            "source": a.source, "tracebacks": tracebacks, "rows": [asdict(r) for r in rows],
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
