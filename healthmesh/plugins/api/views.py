"""The answers of one snapshot, rendered once (in a worker thread) and served as bytes.

At 5,000 peers a snapshot is several megabytes of JSON: building and encoding it per
request would cost tens of milliseconds of event-loop time that the probes need. The API
renders each round's snapshot once and serves the same bytes until the next round.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec

from healthmesh import AgentContext, Snapshot
from healthmesh.plugins.api.cilium import status_response

#: Before the first round completes, a live snapshot is rebuilt at most this often...
LIVE_TTL = 1.0
#: ...and at most once per this many times the last build took.
LIVE_COST_FACTOR = 10.0



def _enc_hook(obj: Any) -> Any:
    # Config types such as Name (a str) and Duration (a float) reach the snapshot.
    for base in (str, float, int):
        if isinstance(obj, base):
            return base(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def encode(obj: Any) -> bytes:
    """Compact JSON bytes."""
    return _encoder.encode(obj)


def node_summary(node: dict[str, Any]) -> dict[str, Any]:
    """A node without its per-path results: what ``GET /v1/nodes`` lists."""
    return {
        "name": node["name"],
        "cluster": node["cluster"],
        "state": node["state"],
        "local": bool(node.get("local", False)),
        "source": node.get("source"),
        "labels": node.get("labels", {}),
        "addresses": [p["address"] for p in node["paths"] if p["role"] == "host"],
        "health_addresses": [p["address"] for p in node["paths"] if p["role"] == "endpoint"],
    }


@dataclass
class Rendered:
    """One snapshot and its encoded answers for ``/v1/status`` and ``/v1beta/status``."""

    data: dict[str, Any]
    status: bytes
    beta: bytes
    built: float = field(default_factory=time.monotonic)
    _index: dict[tuple[str, str], dict[str, Any]] | None = None

    @classmethod
    def build(cls, data: dict[str, Any]) -> Rendered:
        """Encode both documents (CPU-bound: run it in a worker thread)."""
        return cls(data, encode(data), encode(status_response(data)))

    def node(self, cluster: str, name: str) -> dict[str, Any] | None:
        """The snapshot entry of one node, or None."""
        if self._index is None:
            self._index = {(n["cluster"], n["name"]): n for n in self.data["nodes"]}
        return self._index.get((cluster, name))

    def nodes(
        self, state: str | None = None, cluster: str | None = None
    ) -> list[dict[str, Any]]:
        """Node summaries, optionally only those in ``state`` and/or ``cluster``."""
        return [
            node_summary(n)
            for n in self.data["nodes"]
            if (state is None or n["state"] == state)
            and (cluster is None or n["cluster"] == cluster)
        ]


class Views:
    """The newest rendered snapshot: the last round's, or a live one before the first round."""

    def __init__(self, context: AgentContext) -> None:
        self.context = context
        self.current: Rendered | None = None
        #: Scheduler rounds completed (on-demand probe rounds are not counted).
        self.rounds_completed = 0
        self._round: dict[str, Any] | None = None
        self._current_seq = -1
        self._seq = itertools.count()
        self._live: Rendered | None = None
        self._live_ttl = LIVE_TTL
        self._live_lock = anyio.Lock()

    async def publish(self, snapshot: Snapshot) -> Rendered:
        """Render ``snapshot`` and serve it from now on (unless a newer one got there first)."""
        seq = next(self._seq)
        data = snapshot.data
        rnd = data.get("round")
        if isinstance(rnd, dict):
            self._round = rnd
            completed = rnd.get("completed")
            if isinstance(completed, int):
                self.rounds_completed = max(self.rounds_completed, completed)
        elif self._round is not None:
            # An on-demand probe round's snapshot: keep the keys of the scheduled rounds'.
            data = {**data, "round": self._round}
        rendered = await anyio.to_thread.run_sync(Rendered.build, data)
        if seq > self._current_seq:
            self.current, self._current_seq = rendered, seq
        return rendered

    async def latest(self) -> Rendered:
        """What a status request is answered with."""
        if self.current is not None:
            return self.current
        async with self._live_lock:
            live = self._live
            if live is None or time.monotonic() - live.built > self._live_ttl:
                # The snapshot is built on the event loop (the state it reads lives there);
                # only the encoding goes to a thread. At thousands of peers a build costs
                # the loop a noticeable time, so rebuilds are spaced to keep that under 10%.
                t = time.perf_counter()
                data = self.context.snapshot().data
                self._live_ttl = max(LIVE_TTL, LIVE_COST_FACTOR * (time.perf_counter() - t))
                live = self._live = await anyio.to_thread.run_sync(Rendered.build, data)
            return live
