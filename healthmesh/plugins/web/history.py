"""Per-path RTT/loss history: a fixed-size ring per (node, address, kind), fed by snapshots.

Memory is bounded and known in advance: each point is a wall time (8 bytes), an RTT and a
loss (4 bytes each, float32) and a state (1 byte), 17 bytes, held in preallocated
``array`` buffers; a ring holds ``min(history / interval, max_points)`` points, so an hour
at a 30 s interval is 120 points: 2,040 bytes per path and kind plus a fixed overhead of
under 1 KiB (the ring object, its arrays, its key; transitions once there are some).
docs/web.md gives the measured figures. A path that leaves the mesh is dropped once its
last point is older than the history.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from datetime import datetime
from typing import Any

#: State codes stored per point.
STATES = ("unknown", "reachable", "unreachable")
_CODE = {s: i for i, s in enumerate(STATES)}
#: State transitions kept per path and kind.
TRANSITIONS = 32


def parse_time(text: Any) -> float | None:
    """Seconds since the epoch from an RFC 3339 string, None when it is not one."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Ring:
    """The last ``capacity`` points of one path and kind, and its recent state transitions."""

    __slots__ = ("capacity", "count", "head", "last_state", "loss", "rtt", "state", "t",
                 "transitions")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.t = array("d", bytes(8 * capacity))
        self.rtt = array("f", bytes(4 * capacity))
        self.loss = array("f", bytes(4 * capacity))
        self.state = array("b", bytes(capacity))
        self.head = 0  # next slot to write
        self.count = 0
        self.last_state: str | None = None
        # Made at the first transition: an empty deque alone is about 600 bytes.
        self.transitions: deque[tuple[float, str, str, str]] | None = None

    def add(self, t: float, rtt_ms: float | None, loss_pct: float | None, state: str) -> None:
        """Append one point (the oldest is overwritten when full)."""
        i = self.head
        self.t[i] = t
        self.rtt[i] = math.nan if rtt_ms is None else rtt_ms
        self.loss[i] = math.nan if loss_pct is None else loss_pct
        self.state[i] = _CODE.get(state, 0)
        self.head = (i + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)

    def note_state(self, t: float, state: str, error: str, *, record: bool = True) -> None:
        """Record a transition when ``state`` differs from the last one seen (and ``record``)."""
        if record and self.last_state is not None and state != self.last_state:
            self.add_transition(t, self.last_state, state, error)
        self.last_state = state

    def add_transition(self, t: float, before: str, after: str, reason: str) -> None:
        if self.transitions is None:
            self.transitions = deque(maxlen=TRANSITIONS)
        self.transitions.append((t, before, after, reason[:200]))

    def last_time(self) -> float:
        return self.t[(self.head - 1) % self.capacity] if self.count else 0.0

    def points(self) -> dict[str, list[Any]]:
        """Oldest first: ``{"t": [...], "rtt_ms": [...], "loss_pct": [...], "state": [...]}``."""
        start = (self.head - self.count) % self.capacity
        order = [(start + k) % self.capacity for k in range(self.count)]
        return {
            "t": [round(self.t[i], 3) for i in order],
            "rtt_ms": [_num(self.rtt[i]) for i in order],
            "loss_pct": [_num(self.loss[i]) for i in order],
            "state": [STATES[self.state[i]] for i in order],
        }

    def nbytes(self) -> int:
        """Bytes of the point buffers (what grows with the capacity)."""
        return sum(a.itemsize * len(a) for a in (self.t, self.rtt, self.loss, self.state))


def _num(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


Key = tuple[str, str, str, str]  # node ("cluster/name"), address, role, kind


class History:
    """Every path's ring, fed by the snapshots the agent hands to outputs."""

    def __init__(self, history_s: float, max_points: int) -> None:
        self.history_s = history_s
        self.max_points = max_points
        self.capacity = 2
        self.rings: dict[Key, Ring] = {}
        #: True once the agent hands over events: transitions come from them (every one, at
        #: its own time), no longer from comparing snapshots (which miss a quick flap).
        self.from_events = False

    def capacity_for(self, interval_s: float) -> int:
        """Points per ring: one per round over the history, at least 2, at most max_points."""
        per = math.ceil(self.history_s / max(interval_s, 0.001))
        return max(2, min(self.max_points, per))

    def record(self, data: dict[str, Any], *, point: bool) -> None:
        """Take a snapshot: transitions always, one point per path and kind when ``point``.

        ``point`` is true for the snapshots of completed rounds (one point per interval);
        the snapshots handed over between rounds (a state change) only add transitions.
        """
        interval = float(data.get("interval_s") or 30.0)
        self.capacity = self.capacity_for(interval)
        now = parse_time(data.get("timestamp")) or 0.0
        seen: set[Key] = set()
        for node in data.get("nodes", ()):
            name = f"{node.get('cluster', 'default')}/{node.get('name', '')}"
            for path in node.get("paths", ()):
                for kind, view in (path.get("probes") or {}).items():
                    key = (name, str(path.get("address")), str(path.get("role")), str(kind))
                    seen.add(key)
                    ring = self._ring(key)
                    state = str(view.get("state", "unknown"))
                    at = parse_time(view.get("last_change")) or now
                    ring.note_state(at, state, str(view.get("error") or ""),
                                    record=not self.from_events)
                    if point:
                        rtt = view.get("rtt_ms")
                        loss = view.get("loss_pct")
                        ring.add(now, rtt if isinstance(rtt, (int, float)) else None,
                                 loss if isinstance(loss, (int, float)) else None, state)
        if point:
            # Paths gone from the mesh: keep them while their history is recent.
            for key in [k for k in self.rings if k not in seen]:
                if now - self.rings[key].last_time() > self.history_s:
                    del self.rings[key]

    def _ring(self, key: Key) -> Ring:
        ring = self.rings.get(key)
        if ring is None or ring.capacity != self.capacity:
            ring = self.rings[key] = self._resized(ring)
        return ring

    def event(self, event: Any) -> None:
        """Take one state-change event (``healthmesh.Event``): a path's transition."""
        if getattr(event, "type", None) != "path" or not event.path or not event.kind:
            return
        self.from_events = True
        key = (f"{event.cluster}/{event.node}", str(event.path), str(event.role),
               str(event.kind))
        ring = self._ring(key)
        ring.add_transition(parse_time(event.time) or 0.0, str(event.from_), str(event.to),
                            str(event.reason or ""))
        ring.last_state = str(event.to)

    def _resized(self, old: Ring | None) -> Ring:
        ring = Ring(self.capacity)
        if old is not None:  # the interval changed: keep the newest points that fit
            pts = old.points()
            for t, rtt, loss, state in list(zip(pts["t"], pts["rtt_ms"], pts["loss_pct"],
                                                pts["state"]))[-self.capacity:]:
                ring.add(t, rtt, loss, state)
            ring.transitions = old.transitions
            ring.last_state = old.last_state
        return ring

    def of_node(self, name: str) -> list[dict[str, Any]]:
        """The history of every path and kind of one node (``cluster/name``)."""
        out = []
        for (node, address, role, kind), ring in sorted(self.rings.items()):
            if node != name:
                continue
            out.append({
                "address": address,
                "role": role,
                "kind": kind,
                "points": ring.points(),
                "transitions": [
                    {"at": round(t, 3), "from": a, "to": b, "error": e}
                    for t, a, b, e in ring.transitions or ()
                ],
            })
        return out

    def nbytes(self) -> int:
        """Bytes held by the point buffers of every ring."""
        return sum(r.nbytes() for r in self.rings.values())
