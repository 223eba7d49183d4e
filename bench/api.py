"""Benchmark of the local API at 5,000 peers: how fast status is answered over the socket.

Starts a real agent (``healthmesh run``) probing PEERS loopback peers (127.1.x.y) by HTTP
against its own responder on 0.0.0.0:PORT, with its API socket in a temporary directory,
then measures, over the real unix socket with a keep-alive httpx client:
  * how soon after start the API answers ``/v1beta/status`` (from spawn, and from the
    agent's own start time as ``/v1/healthz`` reports it);
  * latency of REQUESTS sequential requests per endpoint before the first round completes
    (answers built live) and after it (answers rendered once per round);
  * ``healthmesh status -o json`` as a whole command (interpreter start included).
All traffic stays on 127.0.0.0/8. Target: status answered in <= 50 ms at 5,000 peers.

    .venv/bin/python bench/api.py [--peers 5000] [--interval 30] [--requests 200] [--json out.json]
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
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    """Latency of one endpoint in one phase."""

    phase: str
    endpoint: str
    requests: int
    bytes: int
    p50_ms: float
    p95_ms: float
    max_ms: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def peer_address(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


def write_config(path: Path, sock: Path, peers: int, interval: float, port: int) -> None:
    nodes = ",\n  ".join(
        f'{{name = "peer-{i}", addresses = ["{peer_address(i)}"]}}' for i in range(peers)
    )
    path.write_text(
        f"""
[node]
name = "bench"
addresses = ["127.0.0.1"]
[probing]
interval = "{interval:g}s"
timeout = "1s"
[plugins]
disable = ["icmp"]
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
"""
    )


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(client: httpx.Client, phase: str, method: str, url: str, n: int) -> Row:
    """``n`` sequential requests; latency to the last byte of the body."""
    times: list[float] = []
    size = 0
    for _ in range(n):
        t = time.perf_counter()
        resp = client.request(method, url)
        body = resp.content
        times.append((time.perf_counter() - t) * 1000.0)
        if resp.status_code != 200:
            raise SystemExit(f"{method} {url} answered {resp.status_code}: {resp.text[:200]}")
        size = len(body)
    return Row(phase, f"{method} {url}", n, size, round(statistics.median(times), 2),
               round(quantile(times, 0.95), 2), round(max(times), 2))


def healthz(client: httpx.Client) -> dict[str, Any]:
    return client.get("/v1/healthz").json()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=5000)
    ap.add_argument("--interval", type=float, default=30.0, help="probe interval, seconds")
    ap.add_argument("--requests", type=int, default=200, help="requests per endpoint")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    if not 1 <= args.peers <= 250 * 256:
        ap.error("--peers must be between 1 and 64000")

    tmp = Path(tempfile.mkdtemp(prefix="hm-bench-api-"))
    sock = tmp / "health.sock"
    cfg = tmp / "agent.toml"
    write_config(cfg, sock, args.peers, args.interval, free_port())
    spawned = time.monotonic()
    agent = subprocess.Popen(
        [sys.executable, "-m", "healthmesh", "run", "-c", str(cfg), "-o", "json"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "agent.log", "wb"), cwd=ROOT,
    )
    rows: list[Row] = []
    result: dict[str, Any] = {}
    transport = httpx.HTTPTransport(uds=str(sock))
    try:
        with httpx.Client(transport=transport, base_url="http://localhost", timeout=30) as c:
            deadline = time.monotonic() + 60
            while True:
                if agent.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("agent did not serve:\n" + (tmp / "agent.log").read_text())
                try:
                    first = c.get("/v1beta/status")
                    answered = time.time()
                    break
                except httpx.TransportError:
                    time.sleep(0.005)
            since_spawn = time.monotonic() - spawned
            h = healthz(c)
            started = datetime.fromisoformat(h["started_at"].replace("Z", "+00:00")).timestamp()
            result["first_answer_s_after_spawn"] = round(since_spawn, 3)
            result["first_answer_s_after_agent_start"] = round(answered - started, 3)
            result["first_answer_nodes"] = len(first.json()["nodes"])

            n_pre = max(10, args.requests // 4)
            for url in ("/v1beta/status", "/v1/status"):
                if healthz(c)["rounds_completed"] == 0:
                    rows.append(measure(c, "before 1st round", "GET", url, n_pre))

            deadline = time.monotonic() + 3 * args.interval + 30
            while healthz(c)["rounds_completed"] < 1:
                if time.monotonic() > deadline:
                    raise SystemExit("no round completed in time")
                time.sleep(0.2)
            result["first_round_s_after_spawn"] = round(time.monotonic() - spawned, 1)
            snap = c.get("/v1/status").json()
            result["summary"] = snap["summary"]
            for method, url in (
                ("GET", "/v1beta/status"),
                ("GET", "/v1/status"),
                ("GET", "/v1/nodes?state=unreachable"),
                ("GET", "/v1/nodes/default/peer-4999"),
                ("GET", "/v1beta/healthz"),
            ):
                rows.append(measure(c, "steady", method, url, args.requests))

        cli: list[float] = []
        env = {**os.environ, "HEALTHMESH_SOCK": str(sock)}
        for _ in range(5):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "healthmesh", "status", "-o", "json"],
                                  capture_output=True, env=env, cwd=ROOT, timeout=60)
            cli.append((time.perf_counter() - t) * 1000.0)
            if proc.returncode not in (0, 1):
                raise SystemExit(proc.stderr.decode())
        result["cli_status_json_ms_median"] = round(statistics.median(cli), 1)
        p = psutil.Process(agent.pid)
        result["agent_rss_mb"] = round(p.memory_info().rss / 2**20, 1)
        cpu = p.cpu_times()
        result["agent_cpu_s"] = round(cpu.user + cpu.system, 1)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        result["socket_removed_on_exit"] = not sock.exists()
        shutil.rmtree(tmp, ignore_errors=True)

    header = f"{'phase':<17} {'endpoint':<38} {'n':>4} {'bytes':>9} {'p50 ms':>7} " \
             f"{'p95 ms':>7} {'max ms':>7}"
    print(f"bench/api.py: {args.peers} peers, interval {args.interval:g}s, "
          f"{os.cpu_count()} cores, {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(header)
    for r in rows:
        print(f"{r.phase:<17} {r.endpoint:<38} {r.requests:>4} {r.bytes:>9} {r.p50_ms:>7} "
              f"{r.p95_ms:>7} {r.max_ms:>7}")
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"peers": args.peers, "interval_s": args.interval, "cores": os.cpu_count(),
             "date": time.strftime("%Y-%m-%d"), "rows": [asdict(r) for r in rows], **result},
            indent=2) + "\n")
    steady = [r for r in rows if r.phase == "steady" and "status" in r.endpoint]
    return 0 if all(r.p95_ms <= 50 for r in steady) else 1


if __name__ == "__main__":
    sys.exit(main())
