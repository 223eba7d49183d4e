"""Whole-agent benchmark: a real ``healthmesh run`` probing N loopback peers (icmp + http).

Each row starts the agent with PEERS peers, each with a node address (127.1.x.y, role host)
and a health-endpoint address (127.2.x.y, role endpoint), so 2 × PEERS paths and 4 × PEERS
probes per round; the agent's own responder on 0.0.0.0:PORT answers HTTP for every 127.x
address and the kernel answers ICMP. With ``dead`` > 0 that percentage of the peers use
addresses in 127.DEAD.0.0/16 instead, blackholed for the run by one iptables rule on INPUT
of ``lo`` for exactly that /16 (no other traffic is touched; the rule is removed after).
After a warm-up (the first round, at ``max_rate``, and one whole steady round), during
``duration`` seconds it samples, once a second, the agent's CPU time and RSS
(psutil), and every 5 s GETs /v1/status over the API socket (latency) including the
scheduler's lateness block. Reported per row:
  * CPU % of one core: mean, and max over 5 s windows (the saw-tooth), and their ratio;
    CPU seconds per round (less sensitive to a loaded machine than lateness);
  * RSS when the API first answers (start-up, before results), at the start of measuring
    and at the end, and growth in %;
  * schedule lateness of probe starts (p50/p99/max, and starts later than 100 ms);
  * false failures (live peers or paths not reachable at the end), dead peers detected;
  * /v1/status latency (median and max; polled from a thread of its own) and size;
  * confirmation re-probes not sent because of the agent-wide bounds (when reported).
All traffic stays on 127.0.0.0/8.

    .venv/bin/python bench/agent.py [--rows 1000:30,5000:30,10000:30,5000:10,5000:30:10]
        [--duration 90] [--window 100] [--json out.json]

A row is ``peers:interval[:dead_pct]``. The defaults take about 15 minutes (90 s measured
per row, plus the warm-up).
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)
from __future__ import annotations

import sys

# bench/ holds http.py: keep the folder off sys.path so ``import http`` finds the stdlib.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rpartition("/")[0] or ".")]

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
#: Second octet of the blackholed /16 (nothing else on this machine uses 127.203.0.0/16).
DEAD_OCTET = 203


@dataclass
class Row:
    """One run of the agent."""

    peers: int
    interval_s: float
    dead_pct: float
    duration_s: float
    window: int
    cpu_mean_pct: float = 0.0
    cpu_s_per_round: float = 0.0
    cpu_max_5s_pct: float = 0.0
    sawtooth_ratio: float = 0.0
    rss_startup_mb: float = 0.0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth_pct: float = 0.0
    lag_p50_ms: float | None = None
    lag_p99_ms: float | None = None
    lag_max_ms: float | None = None
    starts: int = 0
    late_starts: int = 0
    skipped: int = 0
    confirm_skipped: int | None = None
    false_failures: int = 0
    dead_detected: int = 0
    dead_expected: int = 0
    live_rtt_p50_ms: float | None = None
    api_p50_ms: float = 0.0
    api_max_ms: float = 0.0
    api_bytes: int = 0
    api_errors: int = 0
    log_warnings: list[str] = field(default_factory=list)
    #: The latest error of live paths whose latest probe failed, addresses blanked: count.
    live_errors: dict[str, int] = field(default_factory=dict)
    rss_series_mb: list[float] = field(default_factory=list)
    cpu_5s_series_pct: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def addr(second: int, i: int) -> str:
    return f"127.{second}.{i // 250}.{i % 250 + 1}"


def write_config(path: Path, sock: Path, peers: int, dead: int, interval: float, port: int,
                 window: int) -> None:
    lines = []
    for i in range(peers):
        if i < dead:
            a, h = addr(DEAD_OCTET, 2 * i), addr(DEAD_OCTET, 2 * i + 1)
        else:
            a, h = addr(1, i), addr(2, i)
        lines.append(f'{{name = "peer-{i}", addresses = ["{a}"], health_addresses = ["{h}"]}}')
    nodes = ",\n  ".join(lines)
    path.write_text(f"""
[node]
name = "bench"
addresses = ["127.0.0.1"]
[probing]
interval = "{interval:g}s"
timeout = "1s"
window = {window}
[log]
level = "WARNING"
[responder]
listen = ["0.0.0.0:{port}"]
[probes.http]
port = {port}
[sources.static]
nodes = [
  {nodes}
]
[outputs.api]
socket = "{sock}"
""")


def iptables(op: str) -> None:
    rule = ["INPUT", "-i", "lo", "-d", f"127.{DEAD_OCTET}.0.0/16", "-j", "DROP"]
    subprocess.run(["iptables", op, *rule], check=op != "-D", capture_output=True)


def status(c: httpx.Client, row: Row) -> tuple[dict[str, Any], float, int] | None:
    """GET /v1/status; a failed or cut answer is counted in ``api_errors`` (3 tries)."""
    for _ in range(3):
        t = time.perf_counter()
        try:
            resp = c.get("/v1/status")
            body = resp.content
        except httpx.HTTPError:
            row.api_errors += 1
            continue
        ms = (time.perf_counter() - t) * 1000.0
        if resp.status_code != 200:
            raise SystemExit(f"/v1/status answered {resp.status_code}")
        return json.loads(body), ms, len(body)
    return None


def run_row(peers: int, interval: float, dead_pct: float, duration: float, window: int) -> Row:
    dead = int(peers * dead_pct / 100)
    row = Row(peers, interval, dead_pct, duration, window, dead_expected=dead)
    tmp = Path(tempfile.mkdtemp(prefix="hm-bench-agent-"))
    sock, cfg = tmp / "health.sock", tmp / "agent.toml"
    write_config(cfg, sock, peers, dead, interval, free_port(), window)
    if dead:
        iptables("-I")
    agent = subprocess.Popen(
        [sys.executable, "-m", "healthmesh", "run", "-c", str(cfg), "-o", "json"],
        # HM_ROOT: another checkout to run instead (before/after comparisons).
        stdout=subprocess.DEVNULL, stderr=open(tmp / "agent.log", "wb"),
        cwd=os.environ.get("HM_ROOT", str(ROOT)),
    )
    try:
        proc = psutil.Process(agent.pid)
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://localhost", timeout=30) as c:
            deadline = time.monotonic() + 120 + 3 * interval + peers / 250
            # Warm-up: the first round (at max_rate), then one whole steady round.
            while True:
                if agent.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("agent did not complete a round:\n"
                                     + (tmp / "agent.log").read_text()[-2000:])
                try:
                    done = c.get("/v1/healthz").json().get("rounds_completed", 0)
                except httpx.TransportError:
                    time.sleep(0.5)
                    continue
                if not row.rss_startup_mb:  # the API answers: started, first round just begun
                    row.rss_startup_mb = round(proc.memory_info().rss / 2**20, 1)
                if done >= 2:
                    break
                time.sleep(0.5)
            time.sleep(2.0)
            cpu0 = sum(proc.cpu_times()[:2])
            t0 = time.monotonic()
            row.rss_start_mb = round(proc.memory_info().rss / 2**20, 1)
            cpu_marks = [(t0, cpu0)]
            api_ms: list[float] = []
            # The API is polled from a thread of its own, so a slow answer does not stop
            # the once-a-second CPU and RSS samples.
            stop = threading.Event()

            def poll_api() -> None:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                                  base_url="http://localhost", timeout=30) as api:
                    while not stop.is_set():
                        got = status(api, row)
                        if got is not None:
                            api_ms.append(got[1])
                            row.api_bytes = got[2]
                        stop.wait(5.0)

            poller = threading.Thread(target=poll_api, daemon=True)
            poller.start()
            while time.monotonic() - t0 < duration:
                time.sleep(1.0)
                now = time.monotonic()
                cpu_marks.append((now, sum(proc.cpu_times()[:2])))
                row.rss_series_mb.append(round(proc.memory_info().rss / 2**20, 1))
            stop.set()
            poller.join(65)
            t1, cpu1 = cpu_marks[-1]
            row.cpu_mean_pct = round(100.0 * (cpu1 - cpu0) / (t1 - t0), 1)
            row.cpu_s_per_round = round((cpu1 - cpu0) / ((t1 - t0) / interval), 3)
            for j in range(5, len(cpu_marks), 5):
                (ta, ca), (tb, cb) = cpu_marks[j - 5], cpu_marks[j]
                row.cpu_5s_series_pct.append(round(100.0 * (cb - ca) / (tb - ta), 1))
            row.cpu_max_5s_pct = max(row.cpu_5s_series_pct, default=0.0)
            row.sawtooth_ratio = round(row.cpu_max_5s_pct / max(row.cpu_mean_pct, 0.01), 2)
            row.rss_end_mb = row.rss_series_mb[-1]
            row.rss_growth_pct = round(100.0 * (row.rss_end_mb / row.rss_start_mb - 1), 1)
            got = status(c, row)
            if got is None:
                raise SystemExit(f"{peers} peers: /v1/status failed at the end of the row")
            snap = got[0]
            api_ms.append(got[1])
            row.api_p50_ms = round(statistics.median(api_ms), 1)
            row.api_max_ms = round(max(api_ms), 1)
            sch = snap.get("scheduler") or {}
            row.lag_p50_ms = sch.get("lag_p50_ms")
            row.lag_p99_ms = sch.get("lag_p99_ms")
            row.lag_max_ms = sch.get("lag_max_ms_ever")
            row.starts = sch.get("starts", 0)
            row.late_starts = sch.get("late", 0)
            row.skipped = sch.get("skipped", 0)
            row.confirm_skipped = sch.get("confirm_skipped")
            rtts: list[float] = []
            for node in snap["nodes"]:
                if node["local"]:
                    continue
                is_dead = int(node["name"].split("-")[1]) < dead
                if is_dead:
                    row.dead_detected += node["state"] == "unreachable"
                    continue
                for path in node["paths"]:
                    for kind, probe in path["probes"].items():
                        if probe.get("error"):
                            text = re.sub(r"127\.\d+\.\d+\.\d+", "ADDR", probe["error"])
                            text = f"{kind}: {text}"
                            row.live_errors[text] = row.live_errors.get(text, 0) + 1
                        if probe["state"] != "reachable":
                            row.false_failures += 1
                        elif kind == "http" and probe.get("avg_ms") is not None:
                            rtts.append(probe["avg_ms"])
            row.live_rtt_p50_ms = round(statistics.median(rtts), 3) if rtts else None
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        if dead:
            iptables("-D")
        try:  # the agent's warnings (a blocked loop, ...), the last 20, for the JSON
            lines = (tmp / "agent.log").read_text(errors="replace").splitlines()
            row.log_warnings = [ln for ln in lines if "WARNING" in ln or "ERROR" in ln][-20:]
        except OSError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1000:30,5000:30,10000:30,5000:10,5000:30:10",
                    help="comma-separated peers:interval[:dead_pct]")
    ap.add_argument("--duration", type=float, default=90.0, help="measured seconds per row")
    ap.add_argument("--window", type=int, default=100, help="probing.window")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    specs = []
    for spec in args.rows.split(","):
        parts = spec.split(":")
        try:
            peers, interval = int(parts[0]), float(parts[1])
            dead_pct = float(parts[2]) if len(parts) > 2 else 0.0
        except (ValueError, IndexError):
            ap.error(f"--rows: {spec!r} is not peers:interval[:dead_pct]")
        if not (1 <= peers <= 60_000 and interval > 0 and 0 <= dead_pct <= 50):
            ap.error(f"--rows: {spec!r} out of range")
        specs.append((peers, interval, dead_pct))
    if any(d for _, _, d in specs) and shutil.which("iptables") is None:
        ap.error("rows with dead peers need iptables")
    rows = [run_row(p, i, d, args.duration, args.window) for p, i, d in specs]
    print(f"bench/agent.py: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}, "
          f"{args.duration:g} s measured per row, window {args.window}")
    print("| peers | interval | dead | CPU mean % | CPU s/round | CPU max 5 s % | max/mean "
          "| RSS at start-up MB | RSS start→end MB "
          "| growth % | lag p50/p99/max ms | late >100 ms | false failures | dead seen "
          "| live http avg ms | API p50/max ms | re-probes skipped |")
    print("|" + "---|" * 17)
    for r in rows:
        print(f"| {r.peers:,} | {r.interval_s:g} s | {r.dead_pct:g} % | {r.cpu_mean_pct} "
              f"| {r.cpu_s_per_round} | {r.cpu_max_5s_pct} | {r.sawtooth_ratio} "
              f"| {r.rss_startup_mb} "
              f"| {r.rss_start_mb}→{r.rss_end_mb} "
              f"| {r.rss_growth_pct} | {r.lag_p50_ms}/{r.lag_p99_ms}/{r.lag_max_ms} "
              f"| {r.late_starts} of {r.starts} | {r.false_failures} "
              f"| {r.dead_detected}/{r.dead_expected} | {r.live_rtt_p50_ms} "
              f"| {r.api_p50_ms}/{r.api_max_ms} ({r.api_errors} cut) "
              f"| {'—' if r.confirm_skipped is None else r.confirm_skipped} |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"cores": os.cpu_count(), "python": platform.python_version(),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "duration_s": args.duration, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0 if all(r.false_failures == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
