"""Per-path, per-kind state machine and rolling statistics over a window of results."""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from healthmesh.core.model import PathState, ProbeResult
from healthmesh.core.telemetry import Telemetry

_SECOND: list[Any] = [None, ""]  # the last whole second formatted, and its text


def rfc3339(ts: float | None) -> str | None:
    """Seconds since the epoch as an RFC 3339 UTC timestamp with milliseconds (None stays None).

    Called for every result; the date and time up to the second are formatted once per second.
    """
    if ts is None or ts == 0:
        return None
    sec = math.floor(ts)
    if _SECOND[0] != sec:
        _SECOND[1] = datetime.fromtimestamp(sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _SECOND[0] = sec
    ms = min(int((ts - sec) * 1000.0), 999)
    return f"{_SECOND[1]}.{ms:03d}Z"


@dataclass
class KindState:
    """State of one path for one probe kind.

    ``failure_threshold`` consecutive failures make the path unreachable; one success makes
    it reachable. Until either happens the state stays unknown.
    """

    failure_threshold: int
    window: int
    state: PathState = PathState.UNKNOWN
    consecutive_failures: int = 0
    last: ProbeResult | None = None
    last_ok: ProbeResult | None = None
    last_change: float | None = None
    probes: int = 0
    failures: int = 0
    history: deque[tuple[bool, float | None]] = field(default_factory=deque)
    detail_history: dict[str, deque[float]] = field(default_factory=dict)
    # Running aggregates of the window, so statistics cost O(1) to read at any scale:
    # the successful RTTs kept sorted, their sum, the count of losses, detail sums.
    _sorted_rtts: list[float] = field(default_factory=list, repr=False)
    _rtt_sum: float = 0.0
    _lost: int = 0
    _detail_sums: dict[str, float] = field(default_factory=dict, repr=False)

    def record(self, result: ProbeResult) -> bool:
        """Fold one result in; return True when the state changed.

        A failure of a probe that was sent before the latest success (an overlapping
        confirmation re-probe that timed out late) is old news: it counts as loss in the
        statistics but not toward ``failure_threshold``, which counts consecutive failures.
        """
        stale = (
            not result.ok
            and self.last_ok is not None
            and 0 < result.started_at < self.last_ok.started_at
        )
        if not stale:
            self.last = result
        self.probes += 1
        self._push(result.ok, result.rtt)
        for key, value in result.details.items():
            if type(value) is float:  # measurements (connect_ms); counts are not averaged
                dq = self.detail_history.get(key)
                if dq is None:
                    dq = self.detail_history[key] = deque()
                dq.append(value)
                total = self._detail_sums.get(key, 0.0) + value
                if len(dq) > self.window:
                    total -= dq.popleft()
                self._detail_sums[key] = total
        if result.ok:
            self.last_ok = result
            self.consecutive_failures = 0
            new = PathState.REACHABLE
        elif stale:
            self.failures += 1
            new = self.state
        else:
            self.failures += 1
            self.consecutive_failures += 1
            new = (
                PathState.UNREACHABLE
                if self.consecutive_failures >= self.failure_threshold
                else self.state
            )
        if new is not self.state:
            self.state = new
            self.last_change = result.finished_at or time.time()
            return True
        return False

    def _push(self, ok: bool, rtt: float | None) -> None:
        self.history.append((ok, rtt))
        if ok and rtt is not None:
            bisect.insort(self._sorted_rtts, rtt)
            self._rtt_sum += rtt
        elif not ok:
            self._lost += 1
        if len(self.history) > self.window:
            old_ok, old_rtt = self.history.popleft()
            if old_ok and old_rtt is not None:
                del self._sorted_rtts[bisect.bisect_left(self._sorted_rtts, old_rtt)]
                self._rtt_sum -= old_rtt
            elif not old_ok:
                self._lost -= 1

    def stats(self) -> dict[str, Any]:
        """Rolling statistics over the window: RTTs in ms, loss in percent."""
        out: dict[str, Any] = {}
        self._fill_stats(out)
        return out

    def _fill_stats(self, out: dict[str, Any]) -> None:
        rtts = self._sorted_rtts
        n = len(self.history)
        k = len(rtts)
        if k:
            out["min_ms"] = round(rtts[0] * 1000.0, 3)
            out["avg_ms"] = round(max(self._rtt_sum, 0.0) / k * 1000.0, 3)
            out["max_ms"] = round(rtts[-1] * 1000.0, 3)
            out["p50_ms"] = round(_quantile(rtts, 0.5) * 1000.0, 3)
            out["p95_ms"] = round(_quantile(rtts, 0.95) * 1000.0, 3)
        else:
            out["min_ms"] = out["avg_ms"] = out["max_ms"] = out["p50_ms"] = out["p95_ms"] = None
        out["loss_pct"] = round(100.0 * self._lost / n, 2) if n else None
        out["samples"] = n
        out["consecutive_failures"] = self.consecutive_failures
        out["last_change"] = rfc3339(self.last_change)
        for key, values in self.detail_history.items():
            if values:
                out[key + "_avg"] = round(self._detail_sums[key] / len(values), 3)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of a per-kind probe entry (docs/snapshot.schema.json)."""
        last = self.last
        out: dict[str, Any] = {"state": self.state.value}
        if last is None:
            out["rtt_ms"] = out["error"] = out["last_probed"] = None
        else:
            ok = last.ok
            out["rtt_ms"] = round(last.rtt * 1000.0, 3) if ok and last.rtt is not None else None
            out["error"] = None if ok else last.error
            out["last_probed"] = rfc3339(last.started_at)
        self._fill_stats(out)
        if last is not None:
            for key, value in last.details.items():
                if key not in out:
                    out[key] = round(value, 3) if type(value) is float else value
        return out


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def combine(states: Iterable[PathState]) -> PathState:
    """Node (or path) state from its parts: reachable when every known part is reachable.

    Any unreachable part makes the whole unreachable; all-unknown (or nothing) is unknown.
    """
    seen = list(states)
    if any(s is PathState.UNREACHABLE for s in seen):
        return PathState.UNREACHABLE
    if seen and all(s is PathState.REACHABLE for s in seen):
        return PathState.REACHABLE
    return PathState.UNKNOWN


RETIRED_MAX = 100_000
RETIRED_TTL = 3600.0


class StateStore:
    """Every path's per-kind state; removed paths are retired, and restored when re-added."""

    def __init__(
        self, failure_threshold: int, window: int, telemetry: Telemetry | None = None
    ) -> None:
        self.failure_threshold = failure_threshold
        self.window = window
        #: Counts every result and state change for the metrics (O(1) per result).
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self._states: dict[tuple[tuple[str, str, str], str], KindState] = {}
        self._retired: dict[tuple[tuple[str, str, str], str], tuple[float, KindState]] = {}
        self._cache: dict[tuple[tuple[str, str, str], str], dict[str, Any]] = {}

    def ensure(self, key: tuple[str, str, str], kind: str) -> KindState:
        """The state of ``key``/``kind``, created (or brought back from retirement) if needed."""
        k = (key, kind)
        st = self._states.get(k)
        if st is None:
            retired = self._retired.pop(k, None)
            if retired is not None and time.monotonic() - retired[0] < RETIRED_TTL:
                st = retired[1]
            else:
                st = KindState(self.failure_threshold, self.window, history=deque())
            self._states[k] = st
            self.telemetry.path_added(key, kind, st.state)
        return st

    def retire(self, key: tuple[str, str, str], kind: str) -> None:
        """Stop tracking ``key``/``kind`` but keep its history for a while."""
        k = (key, kind)
        st = self._states.pop(k, None)
        self._cache.pop(k, None)
        if st is None:
            return
        self.telemetry.path_removed(key, kind, st.state)
        self._retired[k] = (time.monotonic(), st)
        if len(self._retired) > RETIRED_MAX:
            oldest = min(self._retired, key=lambda x: self._retired[x][0])
            del self._retired[oldest]

    def record(self, key: tuple[str, str, str], kind: str, result: ProbeResult) -> KindState | None:
        """Fold a result into a tracked path; results for retired paths are dropped."""
        st = self._states.get((key, kind))
        if st is None:
            return None
        old = st.state
        st.record(result)
        self.telemetry.result(key, kind, result, old, st.state)
        # Render the JSON view now, while results trickle in, rather than all 10,000s of
        # them at once when the snapshot is built at the end of a round.
        self._cache[(key, kind)] = st.as_dict()
        return st

    def get(self, key: tuple[str, str, str], kind: str) -> KindState | None:
        return self._states.get((key, kind))

    def view(self, key: tuple[str, str, str], kind: str) -> dict[str, Any] | None:
        """The JSON form of one path/kind, cached until its next result."""
        k = (key, kind)
        cached = self._cache.get(k)
        if cached is None:
            st = self._states.get(k)
            if st is None:
                return None
            cached = self._cache[k] = st.as_dict()
        return cached
