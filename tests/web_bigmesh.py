"""``python -m tests.web_bigmesh N``: the real ``[outputs.web]`` serving a synthetic N × N mesh.

For the page's scale test: no agent can run 1,000 peers on a shared 2-core machine, so an
agent context offers a mesh of N nodes in 10 clusters, built like issue 14's contract, with
one node down (``c5/n0500`` at N=1000) and one link cut (``c0/n0001 ↔ c0/n0002``), and
verdicts saying so (one with markup in its evidence, which the page must show as text).
Prints ``web page: URL`` and republishes every 2.5 s (the interval is 5 s) until killed.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace
from typing import Any

import anyio

from healthmesh import Node, Snapshot, rfc3339
from healthmesh.plugins.web import WebOutput, WebSettings

CLUSTERS = 10


def names(n: int) -> list[str]:
    per = max(1, n // CLUSTERS)
    return [f"c{min(i // per, CLUSTERS - 1)}/n{i:04d}" for i in range(n)]


class BigMesh:
    """An agent context with ``mesh()``: the N × N contract, cells shared to save memory."""

    def __init__(self, n: int) -> None:
        self.nodes = names(n)
        self.down = self.nodes[n // 2]
        self.link = (self.nodes[1], self.nodes[2])
        self.since = rfc3339(time.time() - 90)
        self.config = SimpleNamespace(components={})
        self.local_node = Node(name="n0000", cluster="c0", addresses=("127.0.0.1",))
        self.started_at = time.time()
        self.once = False
        ok = [{"state": "reachable", "kinds": {"icmp": "reachable", "http": "reachable"},
               "rtt_ms": round(0.1 + 0.37 * k, 3), "loss_pct": 0.0} for k in range(8)]
        bad = {"state": "unreachable", "kinds": {"icmp": "unreachable", "http": "unreachable"},
               "rtt_ms": None, "loss_pct": 100.0}
        self.cells: dict[str, dict[str, Any]] = {}
        for i, obs in enumerate(self.nodes):
            row = {tgt: ok[(i + j) % 8] for j, tgt in enumerate(self.nodes)}
            row[self.down] = bad
            self.cells[obs] = row
        a, b = self.link
        self.cells[a][b] = self.cells[b][a] = bad

    def snapshot(self) -> Snapshot:
        return Snapshot({
            "timestamp": rfc3339(time.time()), "interval_s": 5.0,
            "local": {"name": "n0000", "cluster": "c0"},
            "summary": {"nodes": len(self.nodes), "reachable": len(self.nodes) - 1,
                        "unreachable": 1, "unknown": 0},
            "nodes": [], "components": [], "round": {"completed": 1, "duration_s": 2.0},
        })

    def mesh(self) -> dict[str, Any]:
        return {
            "timestamp": rfc3339(time.time()),
            "observers": self.nodes, "targets": self.nodes, "cells": self.cells,
            "verdicts": [
                {"kind": "node-down", "subject": self.down, "confidence": 0.97,
                 "evidence": f"{len(self.nodes) - 1} of {len(self.nodes) - 1} observers "
                             "fail icmp and http", "since": self.since},
                {"kind": "link", "subject": list(self.link), "confidence": 0.9,
                 "evidence": "both directions fail; both reach everyone else",
                 "since": self.since},
                # Markup in data is shown as text, never parsed (the page's XSS check).
                {"kind": "degraded", "subject": [self.nodes[3], self.nodes[4]],
                 "confidence": 0.5, "evidence": '<img src="x" class="xss">loss 40%',
                 "since": self.since},
            ],
            "local_only": False,
        }


async def main(n: int) -> None:
    context = BigMesh(n)
    out = WebOutput(WebSettings(listen="127.0.0.1:0"), context)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(out.run)
        await out.round_completed(context.snapshot())
        print(f"web page: {out.url}", flush=True)
        while True:
            await anyio.sleep(2.5)
            await out.round_completed(context.snapshot())


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]))
