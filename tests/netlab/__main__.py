"""``python -m tests.netlab up 4 | down | status``: a lab for humans to look at and break.

``up`` builds a persistent lab (it outlives this command) and prints how to reach it;
``down`` tears down every lab (or one, by id); ``status`` lists labs and each agent's view.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tests.netlab import (
    STATE_ROOT,
    Lab,
    LabError,
    api_get,
    cleanup_leftovers,
    lab_namespaces,
    read_lab,
    remove_lab,
    unavailable_reason,
)


def cmd_up(args: argparse.Namespace) -> int:
    the_lab = Lab(
        args.hosts,
        endpoints=not args.no_endpoints,
        probing={"interval": args.interval, "timeout": args.timeout},
        persistent=True,
    )
    try:
        the_lab.start()
    except BaseException:
        the_lab.teardown()
        raise
    print(f"lab {the_lab.id}: {len(the_lab.hosts)} hosts, state in {the_lab.root}")
    for h in the_lab.hosts:
        ep = f", endpoint {h.ep_ns} {' '.join(h.health_addresses)}" if h.endpoint else ""
        print(f"  {h.name}: netns {h.ns} {' '.join(h.addresses)}{ep}")
    h1 = the_lab.hosts[0]
    if the_lab.api:
        print(f"\nlook:  healthmesh status -H unix://{h1.socket}")
    print(f"log:   {h1.log}")
    print(f"break: ip netns exec {the_lab.hosts[-1].ns} ip link set eth0 down")
    print("done:  python -m tests.netlab down")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Remove persistent labs (and leftovers); a lab a live test run owns is left alone."""
    removed = cleanup_leftovers()
    for lab_id in sorted(_lab_ids()):
        info = read_lab(lab_id) or {}
        if args.id not in (None, lab_id):
            continue
        if not info.get("persistent"):
            print(f"lab {lab_id} belongs to the running pid {info.get('owner')}; left alone")
            continue
        remove_lab(lab_id)
        removed.append(lab_id)
    for lab_id in removed:
        print(f"lab {lab_id} removed")
    if not removed:
        print("no lab removed")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cleanup_leftovers()
    ids = sorted(_lab_ids())
    if not ids:
        print("no lab")
    for lab_id in ids:
        info = read_lab(lab_id) or {}
        kind = "persistent" if info.get("persistent") else f"owned by pid {info.get('owner')}"
        print(f"lab {lab_id} ({kind}), namespaces: {len(lab_namespaces().get(lab_id, []))}")
        for host in info.get("hosts", []):
            print(f"  {host['name']}: {_summary(lab_id, host['name'])}")
    return 0


def _lab_ids() -> set[str]:
    ids = set(lab_namespaces())
    if STATE_ROOT.is_dir():
        ids |= {p.name for p in STATE_ROOT.iterdir() if p.is_dir()}
    return ids


def _summary(lab_id: str, host: str) -> str:
    sock = STATE_ROOT / lab_id / host / "health.sock"
    doc: dict[str, Any] | None = None
    if sock.exists():
        try:
            doc = api_get(sock, "/v1/status")
        except (LabError, ValueError):
            doc = None
    if doc is None:
        ndjson = STATE_ROOT / lab_id / host / "snapshots.ndjson"
        try:
            lines = ndjson.read_text().splitlines()
            doc = json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            doc = None
    if doc is None:
        return "no snapshot (agent down?)"
    s = doc["summary"]
    bad = [n["name"] for n in doc["nodes"] if n["state"] != "reachable"]
    return (f"{s['reachable']}/{s['nodes']} reachable"
            + (f"; not reachable: {', '.join(bad)}" if bad else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a persistent lab of N hosts")
    up.add_argument("hosts", type=int, nargs="?", default=4)
    up.add_argument("--no-endpoints", action="store_true", help="no health endpoints")
    up.add_argument("--interval", default="1s")
    up.add_argument("--timeout", default="500ms")
    down = sub.add_parser("down", help="tear down every lab, or the one given")
    down.add_argument("id", nargs="?")
    sub.add_parser("status", help="list labs and each agent's summary")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"netlab {reason}", file=sys.stderr)
        return 2
    try:
        return {"up": cmd_up, "down": cmd_down, "status": cmd_status}[args.command](args)
    except LabError as exc:
        print(f"netlab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
