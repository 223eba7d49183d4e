"""Fault detection and recovery times, and false reports under random loss, in a netlab.

Builds a lab of real agents in network namespaces (tests/netlab; needs root), injects each
fault kind ``--reps`` times at a random phase of the probe interval, and measures, per
observing agent:

- detection: fault injected -> the agent's state change (``last_change`` of the first
  affected path; a node is unreachable as soon as one path is), -> the first snapshot
  served by its API (or NDJSON) that shows that path unreachable, and -> the first one
  that shows every affected path unreachable;
- recovery: fault reverted -> every affected path reachable again (same two clocks).

Then it puts ``--loss`` random loss (iptables ``statistic``) on one host for
``--loss-duration`` seconds and counts the unreachable reports of every agent and the loss %
the others show for that host; ``--baseline`` repeats that with a plain threshold of 3
failures and no confirmation re-probes (Cilium's rule) for comparison.

    sudo .venv/bin/python bench/detection.py --reps 5 --json /tmp/detection.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, bench/ would come first on sys.path, and bench/http.py would shadow the
# standard library's http package: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from tests.netlab import (  # noqa: E402
    Host,
    Lab,
    entries_change,
    entries_state,
    find_node,
    lab,
    parse_time,
    probe_entries,
    unavailable_reason,
)

Json = dict[str, Any]


@dataclass
class Fault:
    """One fault kind: how to inject and revert it, who sees it, and on which entries."""

    name: str
    what: str
    inject: Callable[[Lab, Host, Host], None]
    revert: Callable[[Lab, Host, Host], None]
    observers: Callable[[Lab, Host, Host], list[Host]]
    role: str | None = None
    kind: str | None = None
    #: The agent observed is the source A (one-direction drop) rather than the target.
    subject: Callable[[Lab, Host, Host], Host] = lambda lab, a, b: b


def _others(the_lab: Lab, a: Host, b: Host) -> list[Host]:
    return [h for h in the_lab.hosts if h is not b]


FAULTS = [
    Fault(
        "link", "host link down (all paths)",
        lambda lab, a, b: lab.link_down(b), lambda lab, a, b: lab.link_up(b), _others,
    ),
    Fault(
        "endpoint", "health endpoint down (endpoint paths)",
        lambda lab, a, b: lab.endpoint_down(b), lambda lab, a, b: lab.endpoint_up(b), _others,
        role="endpoint",
    ),
    Fault(
        "port", "TCP 4240 blocked (host http)",
        lambda lab, a, b: lab.block_tcp(b), lambda lab, a, b: lab._reset_firewall(b), _others,
        role="host", kind="http",
    ),
    Fault(
        "icmp", "ICMP echo dropped (host icmp)",
        lambda lab, a, b: lab.drop_icmp(b), lambda lab, a, b: lab._reset_firewall(b), _others,
        role="host", kind="icmp",
    ),
    Fault(
        "agent", "agent SIGKILLed (host http; recovery includes agent start-up)",
        lambda lab, a, b: lab.kill_agent(b), lambda lab, a, b: lab.start_agent(b), _others,
        role="host", kind="http",
    ),
    Fault(
        "oneway", "A->B dropped (seen by A)",
        lambda lab, a, b: lab.drop(a, b), lambda lab, a, b: lab._reset_firewall(a),
        lambda lab, a, b: [a],
    ),
]


def wait_all(
    the_lab: Lab, observers: list[Host], check: Callable[[Json], float | None], timeout: float,
    full: Callable[[Json], float | None] | None = None,
) -> dict[str, tuple[float, float, float | None]]:
    """Poll views until ``check`` (and ``full``, when given) gives a time for every observer.

    Returns ``{observer: (change time, time the served view first passed check, time it
    first passed full or None)}``.
    """
    first: dict[str, tuple[float, float]] = {}
    whole: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    names = {h.name for h in observers}
    while time.monotonic() < deadline and (
        set(first) != names or (full is not None and set(whole) != names)
    ):
        for h in observers:
            if h.name in first and (full is None or h.name in whole):
                continue
            view = the_lab.view(h)
            if view is None:
                continue
            now = time.time()
            if h.name not in first:
                changed = check(view)
                if changed is not None:
                    first[h.name] = (changed, now)
            if full is not None and h.name not in whole and full(view) is not None:
                whole[h.name] = now
        time.sleep(0.02)
    return {n: (c, seen, whole.get(n)) for n, (c, seen) in first.items()}


def run_fault(the_lab: Lab, fault: Fault, reps: int, rng: random.Random) -> Json:
    """Inject and revert ``fault`` ``reps`` times; the measured seconds per observer."""
    interval = the_lab_interval(the_lab)
    rows: Json = {"detect": [], "detect_seen": [], "detect_all_seen": [], "recover": [],
                  "recover_seen": [], "missed": 0}
    kinds = [k for k in the_lab.kinds if fault.kind in (None, k)]
    for rep in range(reps):
        a, b = rng.sample(the_lab.hosts, 2)
        target = fault.subject(the_lab, a, b)
        observers = fault.observers(the_lab, a, b)
        time.sleep(rng.uniform(0.0, interval))  # a random phase of the probe schedule
        t0 = time.time()
        fault.inject(the_lab, a, b)
        got = wait_all(
            the_lab, observers,
            lambda v, n=target.name, t=t0: _first_down(v, n, fault, after=t),
            timeout=10.0,
            full=lambda v, n=target.name, t=t0: _change(
                v, n, "unreachable", fault, kinds, after=t),
        )
        rows["missed"] += len(observers) - len(got)
        for changed, seen, all_seen in got.values():
            rows["detect"].append(changed - t0)
            rows["detect_seen"].append(seen - t0)
            if all_seen is not None:
                rows["detect_all_seen"].append(all_seen - t0)
        time.sleep(1.0)
        t1 = time.time()
        fault.revert(the_lab, a, b)
        got = wait_all(
            the_lab, observers,
            lambda v, n=target.name, t=t1: _change(v, n, "reachable", fault, kinds, after=t),
            timeout=15.0,
        )
        rows["missed"] += len(observers) - len(got)
        for changed, seen, _ in got.values():
            rows["recover"].append(changed - t1)
            rows["recover_seen"].append(seen - t1)
        the_lab.heal()
        print(f"  {fault.name} rep {rep + 1}/{reps} done", file=sys.stderr)
    return rows


def _first_down(view: Json, name: str, fault: Fault, *, after: float) -> float | None:
    """When the first of the fault's paths of node ``name`` went unreachable (None: none yet)."""
    node = find_node(view, name)
    if node is None:
        return None
    stamps = [
        parse_time(e.get("last_change"))
        for e in probe_entries(node, fault.role, fault.kind)
        if e["state"] == "unreachable"
    ]
    known = [t for t in stamps if t is not None and t >= after]
    return min(known) if known else None


def _change(
    view: Json, name: str, state: str, fault: Fault, kinds: list[str], *, after: float
) -> float | None:
    when = entries_change(view, name, state, role=fault.role, kind=fault.kind)
    if when is None or when < after:
        return None
    if fault.kind is None and not set(kinds) <= {
        e["kind"] for e in probe_entries(find_node(view, name) or {"paths": []})
    }:
        return None
    return when


def the_lab_interval(the_lab: Lab) -> float:
    text = str(the_lab.probing["interval"])
    return float(text[:-2]) / 1000 if text.endswith("ms") else float(text.rstrip("s"))


def run_loss(the_lab: Lab, probability: float, duration: float) -> Json:
    """Random loss on one host for ``duration`` s: unreachable reports and loss % shown."""
    lossy = the_lab.hosts[-1]
    others = [h for h in the_lab.hosts if h is not lossy]
    t0 = time.time()
    the_lab.loss(lossy, probability)
    flips: list[str] = []
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        for h in the_lab.hosts:
            view = the_lab.view(h)
            if view is not None and "unreachable" in entries_state(view, lossy.name):
                flips.append(h.name)
        time.sleep(0.5)
    views = {h.name: the_lab.view(h) for h in others}
    the_lab._reset_firewall(lossy)
    reports = [
        t for h in the_lab.hosts for t in the_lab.transitions(h, since=t0)
        if t.new == "unreachable"
    ]
    loss: dict[str, list[float]] = {}
    for view in views.values():
        node = None if view is None else find_node(view, lossy.name)
        for e in probe_entries(node) if node else []:
            if e.get("loss_pct") is not None:
                loss.setdefault(e["kind"], []).append(e["loss_pct"])
    probes = 0
    for view in views.values():
        node = None if view is None else find_node(view, lossy.name)
        probes += sum(e.get("samples") or 0 for e in probe_entries(node)) if node else 0
    return {
        "probability": probability,
        "duration_s": duration,
        "unreachable_reports": len(reports),
        "reports": [f"{t.node} {t.address} {t.kind}: {t.error}" for t in reports[:20]],
        "views_showing_unreachable": len(flips),
        "loss_pct": {k: round(statistics.fmean(v), 2) for k, v in loss.items()},
        "loss_pct_range": {k: [min(v), max(v)] for k, v in loss.items()},
        "window_samples": probes,
    }


def stats(values: list[float]) -> Json:
    if not values:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {
        "n": len(values),
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per fault kind")
    parser.add_argument("--interval", default="1s")
    parser.add_argument("--timeout", default="500ms")
    parser.add_argument("--faults", default=",".join(f.name for f in FAULTS),
                        help="comma-separated subset of: " + ", ".join(f.name for f in FAULTS))
    parser.add_argument("--loss", type=float, default=0.1, help="loss probability (0: skip)")
    parser.add_argument("--loss-duration", type=float, default=120.0)
    parser.add_argument("--baseline", action="store_true",
                        help="also run the loss phase with threshold 3 and no confirmations")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"bench/detection.py {reason}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    wanted = args.faults.split(",")
    probing = {"interval": args.interval, "timeout": args.timeout}
    result: Json = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}",
        "hosts": args.hosts,
        "probing": probing,
        "faults": {},
    }
    with lab(args.hosts, probing=probing) as the_lab:
        result["kinds"] = the_lab.kinds
        result["report_via"] = "api" if the_lab.api else "ndjson"
        for fault in FAULTS:
            if fault.name not in wanted:
                continue
            print(f"fault {fault.name}: {fault.what}", file=sys.stderr)
            rows = run_fault(the_lab, fault, args.reps, rng)
            result["faults"][fault.name] = {
                "what": fault.what,
                "missed": rows["missed"],
                **{k: stats(v) for k, v in rows.items() if k != "missed"},
            }
        if args.loss > 0:
            print(f"loss {args.loss:.0%} for {args.loss_duration:g}s", file=sys.stderr)
            result["loss"] = run_loss(the_lab, args.loss, args.loss_duration)
    if args.loss > 0 and args.baseline:
        base = {**probing, "failure_threshold": 3, "confirm_probes": 0}
        print("baseline: threshold 3, no confirmations", file=sys.stderr)
        with lab(args.hosts, probing=base) as the_lab:
            result["loss_baseline_threshold3"] = run_loss(the_lab, args.loss, args.loss_duration)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def print_table(result: Json) -> None:
    """The results as a Markdown table (seconds)."""
    print(f"\n{result['hosts']} hosts, interval {result['probing']['interval']}, timeout "
          f"{result['probing']['timeout']}, kinds {', '.join(result['kinds'])}, "
          f"report read via {result['report_via']}; seconds, min / median / max (n)\n")
    print("| fault | detect (state change) | detect (served) | all paths down (served) "
          "| recover (state change) | recover (served) | missed |")
    print("|---|---|---|---|---|---|---|")
    for name, row in result["faults"].items():
        cells = [
            _cell(row[k])
            for k in ("detect", "detect_seen", "detect_all_seen", "recover", "recover_seen")
        ]
        print(f"| {name}: {row['what']} | " + " | ".join(cells) + f" | {row['missed']} |")
    for key, label in (("loss", "confirmation (default)"),
                       ("loss_baseline_threshold3", "threshold 3, no confirmation")):
        loss = result.get(key)
        if loss:
            print(f"\nloss {loss['probability']:.0%} for {loss['duration_s']:g}s, {label}: "
                  f"{loss['unreachable_reports']} unreachable reports, "
                  f"{loss['views_showing_unreachable']} polled views showing one; "
                  f"loss shown {loss['loss_pct']} (ranges {loss['loss_pct_range']})")


def _cell(s: Json) -> str:
    if not s["n"]:
        return "-"
    return f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f} ({s['n']})"


if __name__ == "__main__":
    sys.exit(main())
