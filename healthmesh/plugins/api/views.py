"""The answers of one snapshot, rendered once (in a worker thread) and served as bytes.

At 5,000 peers a snapshot is several megabytes of JSON: building and encoding it per
request would cost tens of milliseconds of event-loop time that the probes need. The API
renders each round's snapshot once and serves the same bytes until the next round; the
``IncrementalRenderer`` re-encodes only the nodes whose entry changed since the previous
snapshot (the agent's snapshot builder reuses unchanged node entries) and splices the rest.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from healthmesh import AgentContext, Snapshot, json_encoder
from healthmesh.plugins.api.cilium import status_response

#: Before the first round completes, a live snapshot is rebuilt at most this often...
LIVE_TTL = 1.0
#: ...and at most once per this many times the last build took.
LIVE_COST_FACTOR = 10.0

_encoder = json_encoder


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
    """One snapshot and its encoded answers for ``/v1/status`` and ``/v1beta/status``.

    ``/v1/status`` is encoded when the snapshot is published; Cilium's ``/v1beta/status``
    on its first request (``beta_async``), then kept with the snapshot: an agent nobody
    asks through Cilium's API holds no second document (3.2 MB at 5,000 peers) and spends
    no time encoding one every round.
    """

    data: dict[str, Any]
    status: bytes
    _beta: bytes | None = None
    built: float = field(default_factory=time.monotonic)
    _index: dict[tuple[str, str], dict[str, Any]] | None = None
    _beta_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def build(cls, data: dict[str, Any]) -> Rendered:
        """Encode ``/v1/status`` (CPU-bound: run it in a worker thread)."""
        return cls(data, encode(data))

    @property
    def beta(self) -> bytes:
        """The ``/v1beta/status`` document, encoded on first use (CPU-bound at thousands of
        nodes: from the event loop, use ``beta_async``)."""
        got = self._beta
        if got is None:
            with self._beta_lock:  # two first requests at once encode it once
                if self._beta is None:
                    self._beta = encode(status_response(self.data))
                got = self._beta
        return got

    async def beta_async(self) -> bytes:
        """``beta``, encoded in a worker thread when not yet done."""
        got = self._beta
        if got is None:
            got = await anyio.to_thread.run_sync(lambda: self.beta)
        return got

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


class IncrementalRenderer:
    """Encodes snapshots for ``Rendered``, each node's ``/v1/status`` fragment once per entry.

    A node entry (a dict of the snapshot's ``nodes``) that is the same object as in the
    previous snapshot has the same JSON: its fragment is copied from the previous document,
    and the document is the encoded rest with the fragments spliced in where a placeholder
    list stood. The bytes are those of encoding the whole document.

    Memory: of each node only its offsets in the previous document are kept (not a copy of
    its fragment: that was 1.5 KB per node, as much again as the document), and the document
    is written into one growing buffer, changed nodes encoded straight into it, so a round
    leaves no thousands of freed fragment-sized blocks in the allocator's heap.
    """

    def __init__(self) -> None:
        #: id(node entry) -> (the entry, its start and end in ``_status``).
        self._frags: dict[int, tuple[dict[str, Any], int, int]] = {}
        self._status = b""
        self._lock = threading.Lock()  # publishes may overlap, each in a worker thread
        # A placeholder no snapshot contains: the only occurrence of its encoding is ours.
        self._mark = f"\x00healthmesh-nodes-{os.urandom(8).hex()}"
        self._mark_list = encode([self._mark])
        #: Nodes encoded afresh by the latest build (for tests and benchmarks).
        self.encoded = 0

    def build(self, data: dict[str, Any]) -> Rendered:
        """``Rendered.build(data)``, re-encoding only the changed nodes (CPU-bound: thread)."""
        with self._lock:
            nodes = data["nodes"]
            old = self._frags
            # Each node: its previous entry when unchanged (the same dict), else None.
            reused: list[tuple[dict[str, Any], int, int] | None] = []
            encoded = 0
            for node in nodes:
                entry = old.get(id(node))
                if entry is None or entry[0] is not node:
                    entry = None
                    encoded += 1
                reused.append(entry)
            status = self._splice({**data, "nodes": [self._mark]}, nodes, reused, self._status)
            if status is None:  # cannot happen; the whole document then
                self._frags, self._status = {}, b""
                return Rendered.build(data)
            status, at = status
            # Holding the node dicts keeps their ids from being reused by other objects.
            self._frags = {id(node): (node, at[i], at[i + 1] - 1) for i, node in enumerate(nodes)}
            self._status = status
            self.encoded = encoded
            return Rendered(data, status)

    def _splice(
        self, doc: dict[str, Any], nodes: list[dict[str, Any]],
        reused: list[tuple[dict[str, Any], int, int] | None], previous: bytes,
    ) -> tuple[bytes, list[int]] | None:
        """The document with the nodes' fragments in place of the placeholder list, and
        where each fragment starts (one more entry: the end of the last, plus one).

        A node's fragment is ``previous[entry[1]:entry[2]]`` when reused, else the node's
        encoding.
        """
        head, sep, tail = encode(doc).partition(self._mark_list)
        if not sep or self._mark_list in tail:
            return None
        buf = bytearray(head)
        buf += b"["
        starts: list[int] = []
        # Reused fragments that follow each other in ``previous`` (every node, between two
        # rounds) are copied as one run: [run_from, run_to) of ``previous``, to go at ``at``.
        run_from = run_to = at = -1
        with memoryview(previous) as prev:
            for node, entry in zip(nodes, reused):
                if entry is not None and entry[1] == run_to + 1:  # after ours and a comma
                    starts.append(at + entry[1] - run_from)
                    run_to = entry[2]
                    continue
                if run_to >= 0:
                    buf += prev[run_from:run_to]
                    run_from = run_to = -1
                if starts:
                    buf += b","
                starts.append(len(buf))
                if entry is None:
                    _encoder.encode_into(node, buf, -1)
                else:
                    run_from, run_to, at = entry[1], entry[2], len(buf)
            if run_to >= 0:
                buf += prev[run_from:run_to]
        starts.append(len(buf) + 1)  # as if a comma followed the last fragment
        buf += b"]"
        buf += tail
        return bytes(buf), starts


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
        self._renderer = IncrementalRenderer()

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
        rendered = await anyio.to_thread.run_sync(self._renderer.build, data)
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
                live = self._live = await anyio.to_thread.run_sync(self._renderer.build, data)
            return live
