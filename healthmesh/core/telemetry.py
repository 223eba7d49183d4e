"""Cheap counters the core keeps for output plugins (metrics): O(1) plain ints per result.

The ``Telemetry`` object is fed where every result already passes (``StateStore.record``),
where the scheduler starts due probes, where a round finishes and where the responder chooses
a status code. It keeps only plain ints and lists, so the hot path costs a dict lookup, a
``bisect`` and a few increments; plugins read it at scrape time.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

from healthmesh.core.model import PathState, ProbeResult

#: RTT buckets of ``healthmesh_probe_duration_seconds``: 0.1 ms to 8 s.
RTT_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0,
)
#: Cilium's buckets of ``cilium_node_health_connectivity_latency_seconds``.
CILIUM_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0,
)
#: How late due probes start: a wake-up is normally late by well under a millisecond.
LAG_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
#: Round durations: a round lasts about one interval (1 s in tests, 30 s by default).
ROUND_BUCKETS: tuple[float, ...] = (
    0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0,
)

PathKey = tuple[str, str, str]  # (node id, address, role)


class Histogram:
    """Counts per bucket (not cumulative; the last one is +Inf) and the sum of observations."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, as Prometheus' ``le`` (less or equal).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, cumulative count), ..., ("+Inf", count)]`` for an exposition."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            out.append((repr(float(bound)), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile_bound(self, q: float, since: list[int] | None = None) -> float | None:
        """The bucket bound under which a fraction ``q`` of the observations fall (``inf`` past
        the last bound; None with no observation); with ``since``, of those made after that
        copy of ``counts``."""
        counts = self.counts if since is None else [c - s for c, s in zip(self.counts, since)]
        total = sum(counts)
        if total <= 0:
            return None
        want, seen = q * total, 0
        for bound, count in zip(self.bounds, counts):
            seen += count
            if seen >= want:
                return bound
        return float("inf")


class KindCell:
    """Counters of one (kind, role): probes by result, RTT histogram, paths per state."""

    __slots__ = ("changes", "failures", "paths", "rtt", "successes")

    def __init__(self) -> None:
        self.successes = 0
        self.failures = 0
        self.changes = 0
        self.rtt = Histogram(RTT_BUCKETS)
        self.paths: dict[PathState, int] = dict.fromkeys(PathState, 0)


def _always_primary(key: PathKey) -> bool:
    return True


class Telemetry:
    """The agent's counters (``AgentContext.telemetry``); every update is O(1).

    ``cells[(kind, role)]`` holds probe counts, the RTT histogram, state changes and the
    number of tracked paths per state. ``cilium[(role, kind, primary)]`` is Cilium's latency
    histogram, fed only when ``cilium`` is switched on (by the metrics plugin): a failed probe
    is observed as ``timeout``, as Cilium does.
    """

    def __init__(self, timeout: float = 1.0) -> None:
        self.timeout = timeout
        self.cells: dict[tuple[str, str], KindCell] = {}
        self.cilium_enabled = False
        self.cilium: dict[tuple[str, str, bool], Histogram] = {}
        #: Whether a path is its node's primary path of its role (set by the agent).
        self.primary_of: Callable[[PathKey], bool] = _always_primary
        self.lag = Histogram(LAG_BUCKETS)
        self.rounds = Histogram(ROUND_BUCKETS)
        self.last_round_at = 0.0  # wall clock of the last completed round (a heartbeat)
        self.responses: dict[int, int] = {}

    def cell(self, kind: str, role: str) -> KindCell:
        c = self.cells.get((kind, role))
        if c is None:
            c = self.cells[(kind, role)] = KindCell()
        return c

    # -- fed by the state store ------------------------------------------------------------

    def result(
        self, key: PathKey, kind: str, result: ProbeResult, old: PathState, new: PathState
    ) -> None:
        """One probe result of ``key``/``kind`` whose path went from ``old`` to ``new``."""
        c = self.cells.get((kind, key[2]))
        if c is None:
            c = self.cell(kind, key[2])
        if result.ok:
            c.successes += 1
            rtt = result.rtt
            if rtt is not None:
                c.rtt.observe(rtt)
        else:
            c.failures += 1
            rtt = None
        if new is not old:
            c.changes += 1
            c.paths[old] -= 1
            c.paths[new] += 1
        if self.cilium_enabled:
            ck = (key[2], kind, self.primary_of(key))
            h = self.cilium.get(ck)
            if h is None:
                h = self.cilium[ck] = Histogram(CILIUM_BUCKETS)
            h.observe(self.timeout if rtt is None else rtt)

    def path_added(self, key: PathKey, kind: str, state: PathState) -> None:
        """A path/kind is tracked (new, or restored from retirement with its state)."""
        self.cell(kind, key[2]).paths[state] += 1

    def path_removed(self, key: PathKey, kind: str, state: PathState) -> None:
        """A path/kind is no longer tracked."""
        self.cell(kind, key[2]).paths[state] -= 1

    # -- fed by the scheduler, the agent and the responder ---------------------------------

    def started_late(self, seconds: float) -> None:
        """A wake-up of the scheduler started its due probes ``seconds`` after they were due."""
        self.lag.observe(seconds if seconds > 0.0 else 0.0)

    def round_finished(self, seconds: float | None) -> None:
        """A round completed after ``seconds``."""
        self.last_round_at = time.time()
        if seconds is not None:
            self.rounds.observe(seconds)

    def responded(self, code: int) -> None:
        """The responder answered a request with status ``code``."""
        self.responses[code] = self.responses.get(code, 0) + 1
