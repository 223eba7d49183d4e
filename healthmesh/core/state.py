"""Per-path, per-kind state machine and rolling statistics over a window of results."""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from healthmesh.core.model import PathState, ProbeResult
from healthmesh.core.telemetry import Telemetry

#: Date and time up to the second, by whole second: a view formats two timestamps (the
#: latest probe, and the last change, often long ago), so one cached second would thrash.
_SECONDS: dict[int, str] = {}
_SECONDS_MAX = 4096


def rfc3339(ts: float | None) -> str | None:
    """Seconds since the epoch as an RFC 3339 UTC timestamp with milliseconds (None stays None).

    Called for every result; each second's date and time is formatted once (bounded cache).
    """
    if ts is None or ts == 0:
        return None
    sec = math.floor(ts)
    text = _SECONDS.get(sec)
    if text is None:
        if len(_SECONDS) >= _SECONDS_MAX:
            _SECONDS.clear()
        text = _SECONDS[sec] = datetime.fromtimestamp(sec, timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S"
        )
    ms = min(int((ts - sec) * 1000.0), 999)
    return f"{text}.{ms:03d}Z"


class KindState:
    """State of one path for one probe kind, and its rolling statistics over ``window`` results.

    ``failure_threshold`` consecutive failures make the path unreachable; one success makes
    it reachable. Until either happens the state stays unknown.

    Storage is compact because an agent keeps tens of thousands of these (docs/architecture.md,
    "Per-path storage"): the window is one preallocated block of 32-bit floats holding a ring
    of RTTs (a loss stored as +inf) and, after it, one ring per float detail (NaN where a
    result lacked that detail); of the latest result only the fields the view shows are kept,
    its detail names as a tuple shared by every path with the same names, never the
    ``ProbeResult`` itself.
    """

    __slots__ = (
        "_acc",
        "_avg_keys",
        "_change_at",
        "_change_text",
        "_dkeys",
        "_dvals",
        "_error",
        "_finished",
        "_has_last",
        "_keys",
        "_lost",
        "_n",
        "_no_rtt",
        "_ok",
        "_pos",
        "_ring",
        "_rtt",
        "_rtt_sum",
        "_started",
        "_view",
        "consecutive_failures",
        "failure_threshold",
        "failures",
        "last_change",
        "last_ok_started",
        "probes",
        "state",
        "window",
    )

    def __init__(self, failure_threshold: int, window: int) -> None:
        self.failure_threshold = failure_threshold
        self.window = max(1, window)
        self.state = PathState.UNKNOWN
        self.consecutive_failures = 0
        self.last_change: float | None = None
        self.probes = 0
        self.failures = 0
        #: When the latest successful probe was sent (None before the first success).
        self.last_ok_started: float | None = None
        # The latest (non-stale) result, field by field; its details as names and values.
        self._has_last = False
        self._ok = False
        self._rtt: float | None = None
        self._error: str | None = None
        self._started = 0.0
        self._finished = 0.0
        self._keys: tuple[str, ...] = ()
        self._dvals: tuple[Any, ...] = ()
        # The window: RTT of each result in seconds (+inf: lost; -inf: ok without an RTT),
        # written round-robin at _pos; allocated whole up front, so memory does not creep
        # while the window fills. 32-bit floats: 7 significant digits, far below the
        # microsecond the views round to for any RTT under 10 s.
        self._ring = array("f", bytes(4 * self.window))
        self._pos = 0
        self._n = 0
        self._rtt_sum = 0.0
        self._lost = 0
        self._no_rtt = 0
        # Float details: their names (shared tuple), a ring each after the RTT ring in
        # _ring, and per name [count of values in the window, their sum] in _acc.
        self._dkeys: tuple[str, ...] = ()
        self._avg_keys: tuple[str, ...] = ()  # ``<name>_avg`` of each, shared the same way
        self._acc: array[float] | None = None
        #: The JSON view (``as_dict``) cached by the ``StateStore`` until the next result.
        self._view: dict[str, Any] | None = None
        # ``last_change`` as text, formatted once per change rather than once per view (a
        # state changes rarely; a string shared by the views saves one per series each).
        self._change_at: float | None = None
        self._change_text: str | None = None

    @property
    def last(self) -> ProbeResult | None:
        """The latest result (rebuilt from what is kept; None before the first)."""
        if not self._has_last:
            return None
        return ProbeResult(self._ok, self._rtt, self._error, dict(zip(self._keys, self._dvals)),
                           self._started, self._finished)

    @property
    def samples(self) -> int:
        """Results in the window."""
        return self._n

    def record(self, result: ProbeResult) -> bool:
        """Fold one result in; return True when the state changed.

        A failure of a probe that was sent before the latest success (an overlapping
        confirmation re-probe that timed out late) is old news: it counts as loss in the
        statistics but not toward ``failure_threshold``, which counts consecutive failures.
        """
        ok = result.ok
        stale = (
            not ok
            and self.last_ok_started is not None
            and 0 < result.started_at < self.last_ok_started
        )
        details = result.details
        if not stale:
            self._has_last = True
            self._ok = ok
            self._rtt = result.rtt
            self._error = result.error
            self._started = result.started_at
            self._finished = result.finished_at
            if details:
                self._keys = _names(tuple(details))
                self._dvals = tuple(details.values())
            else:
                self._keys = self._dvals = ()
        self.probes += 1
        pos = self._pos
        self._push(ok, result.rtt)
        if details or self._dkeys:
            self._push_details(details, pos)
        if ok:
            self.last_ok_started = result.started_at
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
        ring = self._ring
        pos = self._pos
        if self._n < self.window:
            self._n += 1
        else:
            old = ring[pos]
            if old == _LOST:
                self._lost -= 1
            elif old == _NO_RTT:
                self._no_rtt -= 1
            else:
                self._rtt_sum -= old
        if not ok:
            ring[pos] = _LOST
            self._lost += 1
        elif rtt is None or not math.isfinite(rtt):
            ring[pos] = _NO_RTT
            self._no_rtt += 1
        else:
            ring[pos] = rtt
            self._rtt_sum += ring[pos]  # the stored (rounded) value, as subtracted later
        pos += 1
        if pos == self.window:
            pos = 0
            # Once per window, sum afresh: the running sum's rounding error stays bounded.
            self._rtt_sum = math.fsum(v for v in ring[:self.window] if _NO_RTT < v < _LOST)
        self._pos = pos

    def _push_details(self, details: dict[str, Any] | None, pos: int) -> None:
        """Write this result's float details at ``pos`` of their rings (NaN where absent)."""
        if details:
            for key, value in details.items():
                # Measurements (connect_ms) are averaged; counts (sent) are not.
                if type(value) is float and key not in self._dkeys:
                    self._add_detail(key)
        ring, acc, w = self._ring, self._acc, self.window
        if acc is None:
            return
        for i, key in enumerate(self._dkeys):
            at = (i + 1) * w + pos
            old = ring[at]
            if old == old:  # not NaN: a value leaves the window
                acc[2 * i] -= 1
                acc[2 * i + 1] -= old
            value = details.get(key) if details else None
            if type(value) is float and value == value:
                ring[at] = value
                acc[2 * i] += 1
                acc[2 * i + 1] += ring[at]
            else:
                ring[at] = _NAN
            if pos == w - 1:  # once per window, sum afresh (as for the RTTs)
                acc[2 * i + 1] = math.fsum(v for v in ring[at - pos:at + 1] if v == v)

    def _add_detail(self, key: str) -> None:
        self._dkeys = _names((*self._dkeys, key))
        self._avg_keys = _names(tuple(name + "_avg" for name in self._dkeys))
        # Concatenated into new arrays of the exact size (extend() would over-allocate).
        self._ring = self._ring + _nan_ring(self.window)
        self._acc = array("d", bytes(16)) if self._acc is None else self._acc + _ZEROS

    def stats(self) -> dict[str, Any]:
        """Rolling statistics over the window: RTTs in ms, loss in percent."""
        out: dict[str, Any] = {}
        self._fill_stats(out)
        return out

    def _fill_stats(self, out: dict[str, Any]) -> None:
        n = self._n
        k = n - self._lost - self._no_rtt
        if k:
            # Sorted afresh (a few µs for 100 values) rather than kept sorted: an array
            # that grows as results arrive would make memory creep until the window fills.
            # Losses (+inf) sort last and RTT-less successes (-inf) first.
            ordered = sorted(self._ring[:n])
            rtts = ordered[self._no_rtt:self._no_rtt + k]
            out["min_ms"] = _ms(rtts[0])
            out["avg_ms"] = _ms(max(self._rtt_sum, 0.0) / k)
            out["max_ms"] = _ms(rtts[-1])
            out["p50_ms"] = _ms(_quantile(rtts, 0.5))
            out["p95_ms"] = _ms(_quantile(rtts, 0.95))
        else:
            out["min_ms"] = out["avg_ms"] = out["max_ms"] = out["p50_ms"] = out["p95_ms"] = None
        out["loss_pct"] = _thousandths(round(100.0 * self._lost / n, 2)) if n else None
        out["samples"] = n
        out["consecutive_failures"] = self.consecutive_failures
        changed = self.last_change
        if changed != self._change_at:
            self._change_text = rfc3339(changed)
            self._change_at = changed
        out["last_change"] = self._change_text
        acc = self._acc
        if acc is not None:
            for i, key in enumerate(self._avg_keys):  # names made once, not per view
                count = acc[2 * i]
                if count > 0:
                    out[key] = _thousandths(acc[2 * i + 1] / count)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of a per-kind probe entry (docs/snapshot.schema.json)."""
        out: dict[str, Any] = {"state": self.state.value}
        if not self._has_last:
            out["rtt_ms"] = out["error"] = out["last_probed"] = None
        else:
            ok = self._ok
            rtt = self._rtt
            out["rtt_ms"] = _ms(rtt) if ok and rtt is not None else None
            out["error"] = None if ok else self._error
            out["last_probed"] = rfc3339(self._started)
        self._fill_stats(out)
        for key, value in zip(self._keys, self._dvals):
            if key not in out:
                out[key] = _thousandths(value) if type(value) is float else value
        return out


#: Rounded values of the views, one float object per distinct value (bounded; emptied when
#: full). The views of 20,000 series hold about 11 floats each, in two generations while a
#: snapshot holds the previous views; rounded to the microsecond, RTTs and losses take a few
#: thousand distinct values, so most views share their floats (docs/benchmarks.md). Keyed
#: by the value in thousandths as an int, which is also quicker than ``round(x, 3)``.
_THOUSANDTHS: dict[int, float] = {}
_SHARED_MAX = 16384


def _thousandths(value: float) -> float:
    """``round(value, 3)``, as the float object already made for that value if any."""
    if not 0.0 <= value < 1e9:  # negative, NaN, infinite or huge: not shared
        return round(value, 3)
    n = int(value * 1000.0 + 0.5)
    got = _THOUSANDTHS.get(n)
    if got is None:
        if len(_THOUSANDTHS) >= _SHARED_MAX:
            _THOUSANDTHS.clear()
        # n / 1000 is the double nearest n thousandths, as round() gives: the same value.
        got = _THOUSANDTHS[n] = n / 1000.0
    return got


def _ms(seconds: float) -> float:
    """Seconds in milliseconds to the microsecond, shared (``_thousandths``)."""
    return _thousandths(seconds * 1000.0)


#: Detail-name tuples, one object per distinct tuple (every path of a kind shares one).
_NAMES: dict[tuple[str, ...], tuple[str, ...]] = {}
_NAMES_MAX = 1024
_NAN = math.nan
_NAN_RINGS: dict[int, array[float]] = {}
_ZEROS = array("d", (0.0, 0.0))


def _names(keys: tuple[str, ...]) -> tuple[str, ...]:
    got = _NAMES.get(keys)
    if got is None:
        if len(_NAMES) >= _NAMES_MAX:  # a plugin with ever-new names: stop sharing, stay bounded
            return keys
        got = _NAMES[keys] = keys
    return got


def _nan_ring(window: int) -> array[float]:
    ring = _NAN_RINGS.get(window)
    if ring is None:
        ring = _NAN_RINGS[window] = array("f", [_NAN]) * window
    return ring


_LOST = math.inf
_NO_RTT = -math.inf


def _quantile(sorted_values: Sequence[float], q: float) -> float:
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
        # Each state caches its own JSON view (``KindState._view``): no second dict keyed
        # by 20,000 more tuples at 5,000 peers.
        self._states: dict[tuple[tuple[str, str, str], str], KindState] = {}
        self._retired: dict[tuple[tuple[str, str, str], str], tuple[float, KindState]] = {}

    def ensure(self, key: tuple[str, str, str], kind: str) -> KindState:
        """The state of ``key``/``kind``, created (or brought back from retirement) if needed."""
        return self.ensure_slot((key, kind))

    def ensure_slot(self, k: tuple[tuple[str, str, str], str]) -> KindState:
        """``ensure`` by the ``(key, kind)`` tuple itself, kept as the store's own key.

        The scheduler passes its slot's key: one tuple per series, not one per dict.
        """
        key, kind = k
        st = self._states.get(k)
        if st is None:
            retired = self._retired.pop(k, None)
            if retired is not None and time.monotonic() - retired[0] < RETIRED_TTL:
                st = retired[1]
            else:
                st = KindState(self.failure_threshold, self.window)
            self._states[k] = st
            self.telemetry.path_added(key, kind, st.state)
        return st

    def retire(self, key: tuple[str, str, str], kind: str) -> None:
        """Stop tracking ``key``/``kind`` but keep its history for a while."""
        k = (key, kind)
        st = self._states.pop(k, None)
        if st is None:
            return
        st._view = None
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
        st._view = st.as_dict()
        return st

    def get(self, key: tuple[str, str, str], kind: str) -> KindState | None:
        return self._states.get((key, kind))

    def view(self, key: tuple[str, str, str], kind: str) -> dict[str, Any] | None:
        """The JSON form of one path/kind, cached until its next result."""
        st = self._states.get((key, kind))
        if st is None:
            return None
        cached = st._view
        if cached is None:
            cached = st._view = st.as_dict()
        return cached
