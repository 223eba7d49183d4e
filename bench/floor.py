"""The least CPU the probes of a round can cost on this machine: their syscalls in tight loops.

An agent's round at PEERS peers (a node and a health-endpoint address each) is 2 × PEERS
``GET /hello`` on fresh TCP connections, answered by the peers' responders, and 2 × PEERS
ICMP echoes. This script does the same work with nothing else around it — no event loop, no
scheduler, no statistics —, one probe after another in a single thread:
  * http: socket, SO_TIMESTAMPNS, connect, send; the server side's accept, recv, send, close;
    then recvmsg and close: the syscalls of the http probe and of the responder (both ends in
    this process, as in ``bench/agent.py``, where the agent is its own peers' responder);
  * icmp: one echo request on a raw socket (checksum computed here, as the icmp probe does)
    and the kernel's reply read back.
CPU is this process's user + system time (``getrusage``), per probe, median of ``--repeat``
runs; the last column scales it to one round of PEERS peers at INTERVAL seconds, as % of one
core. Everything goes to 127.1.x.y (loopback). Raw ICMP needs root; without it that row is
skipped with a note.

    .venv/bin/python bench/floor.py [--peers 5000] [--interval 10] [--repeat 5] [--json out.json]
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
import resource
import socket
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; not exported by 3.11
REQUEST = (b"GET /hello HTTP/1.1\r\nHost: 127.1.0.1:4240\r\nUser-Agent: healthmesh/0\r\n"
           b"Accept: */*\r\nConnection: close\r\n\r\n")
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
          b"Date: Tue, 01 Dec 2026 00:00:00 GMT\r\nContent-Length: 27\r\nConnection: close\r\n"
          b"\r\nHello from healthmesh 0\r\n\r\n")


def address(i: int) -> str:
    return f"127.1.{i // 250 % 250}.{i % 250 + 1}"


def cpu_us(n: int, fn: Callable[[int], None]) -> float:
    """CPU µs (user + system) per call of ``fn(i)`` over ``n`` calls."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(n):
        fn(i)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / n * 1e6


def http_floor(n: int) -> tuple[float, int]:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]

    def one(i: int) -> None:
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        c.connect((address(i), port))  # loopback: the handshake completes inside connect()
        c.send(REQUEST)
        s, _ = listener.accept()
        s.recv(65536)
        s.send(ANSWER)
        s.close()
        c.recvmsg(65536, 64)
        c.close()

    try:
        return cpu_us(n, one), 0
    finally:
        listener.close()


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_floor(n: int) -> tuple[float, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(0.2)
    lost: list[int] = []
    ident = os.getpid() & 0xFFFF
    payload = b"\0" * 48

    def one(i: int) -> None:
        seq = i & 0xFFFF
        head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        packet = struct.pack("!BBHHH", 8, 0, checksum(head + payload), ident, seq) + payload
        sock.sendto(packet, (address(i), 0))
        while True:  # the raw socket also sees our own requests: read up to the reply
            try:
                data = sock.recv(2048)
            except TimeoutError:  # lost (a test's iptables rule?): waiting costs no CPU
                lost.append(i)
                return
            hl = (data[0] & 0x0F) * 4
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[hl:hl + 8])
            if kind == 0 and rid == ident and rseq == seq:
                return

    try:
        us = cpu_us(n, one)
        if len(lost) > n // 100:
            raise SystemExit(f"icmp: {len(lost)} of {n} echoes unanswered "
                             f"(e.g. {address(lost[0])})")
        return us, len(lost)
    finally:
        sock.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=5000)
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    if not 1 <= args.peers <= 60000 or not 1 <= args.repeat <= 50 or args.interval <= 0:
        ap.error("--peers 1..60000, --repeat 1..50, --interval > 0")
    probes = 2 * args.peers  # a node and a health-endpoint address per peer, per kind
    rows: list[dict[str, Any]] = []
    for name, fn in (("http (probe + its answer)", http_floor), ("icmp echo", icmp_floor)):
        try:
            got = [fn(probes) for _ in range(args.repeat)]
        except PermissionError as exc:
            print(f"{name}: skipped ({exc}; raw ICMP needs root)")
            continue
        runs = [us for us, _ in got]
        us = statistics.median(runs)
        rows.append({"probe": name, "per_round": probes, "cpu_us_median": round(us, 1),
                     "cpu_us_runs": [round(r, 1) for r in runs],
                     "unanswered": sum(lost for _, lost in got),
                     "pct_of_core": round(100.0 * probes * us * 1e-6 / args.interval, 1)})
    print(f"{args.peers} peers x 2 addresses, one round per {args.interval:g} s; "
          f"median of {args.repeat} runs; load {os.getloadavg()[0]:.2f}")
    print("| probe | per round | CPU µs per probe | % of one core |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['probe']} | {r['per_round']:,} | {r['cpu_us_median']} | {r['pct_of_core']} |")
    total = sum(r["pct_of_core"] for r in rows)
    print(f"| both | | | {total:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peers": args.peers, "interval": args.interval, "rows": rows,
                       "total_pct_of_core": round(total, 1), "load": os.getloadavg(),
                       "python": platform.python_version(), "cpus": os.cpu_count(),
                       "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
