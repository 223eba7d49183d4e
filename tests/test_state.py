"""The per-path state machine and its rolling statistics."""

from __future__ import annotations

import random

from healthmesh import PathState, ProbeResult
from healthmesh.core.state import KindState, combine


def fresh(threshold: int = 3, window: int = 10) -> KindState:
    return KindState(threshold, window)


def test_a_path_stays_unknown_until_it_answers_or_fails_threshold_times() -> None:
    st = fresh(threshold=3)
    assert st.state is PathState.UNKNOWN
    st.record(ProbeResult.failure("timeout"))
    st.record(ProbeResult.failure("timeout"))
    assert st.state is PathState.UNKNOWN
    assert st.record(ProbeResult.failure("timeout")) is True
    assert st.state is PathState.UNREACHABLE


def test_one_success_makes_a_path_reachable_and_resets_failures() -> None:
    st = fresh(threshold=2)
    st.record(ProbeResult.failure("x"))
    st.record(ProbeResult.failure("x"))
    assert st.state is PathState.UNREACHABLE
    st.record(ProbeResult.success(0.001))
    assert st.state is PathState.REACHABLE
    assert st.consecutive_failures == 0
    st.record(ProbeResult.failure("x"))
    assert st.state is PathState.REACHABLE  # one failure below the threshold does not flap


def test_rolling_statistics_cover_only_the_window() -> None:
    st = fresh(window=10)
    for ms in range(1, 21):  # 1..20 ms; the window keeps 11..20
        st.record(ProbeResult.success(ms / 1000))
    s = st.stats()
    assert s["min_ms"] == 11.0 and s["max_ms"] == 20.0
    assert s["avg_ms"] == 15.5
    assert s["p50_ms"] == 15.5
    assert 19.0 < s["p95_ms"] <= 20.0
    assert s["loss_pct"] == 0.0 and s["samples"] == 10


def test_loss_percent_and_consecutive_failures() -> None:
    st = fresh(window=10)
    for i in range(10):
        st.record(ProbeResult.success(0.001) if i % 5 else ProbeResult.failure("lost"))
    s = st.stats()
    assert s["loss_pct"] == 20.0
    st.record(ProbeResult.failure("lost"))
    st.record(ProbeResult.failure("lost"))
    assert st.stats()["consecutive_failures"] == 2


def test_float_details_become_averages_and_counts_do_not() -> None:
    st = fresh()
    st.record(ProbeResult.success(0.002, connect_ms=1.0, sent=1))
    st.record(ProbeResult.success(0.002, connect_ms=3.0, sent=1))
    view = st.as_dict()
    assert view["connect_ms_avg"] == 2.0
    assert "sent_avg" not in view and view["sent"] == 1
    assert view["rtt_ms"] == 2.0 and view["error"] is None


def test_last_error_is_shown_while_failing() -> None:
    st = fresh()
    st.record(ProbeResult.failure("HTTP 500 from 127.0.0.1:4240"))
    view = st.as_dict()
    assert view["error"] == "HTTP 500 from 127.0.0.1:4240" and view["rtt_ms"] is None


def test_node_state_combines_paths() -> None:
    R, U, X = PathState.REACHABLE, PathState.UNREACHABLE, PathState.UNKNOWN
    assert combine([R, R]) is R
    assert combine([R, U]) is U
    assert combine([R, X]) is X
    assert combine([X, X]) is X
    assert combine([]) is X


def _reference(results: list[ProbeResult], window: int) -> dict[str, float | None]:
    """The statistics of the last ``window`` results, in doubles, straight from the definition."""
    last = results[-window:]
    rtts = sorted(r.rtt for r in last if r.ok and r.rtt is not None)
    out: dict[str, float | None] = {"loss_pct": round(100.0 * sum(not r.ok for r in last)
                                                      / len(last), 2)}
    if rtts:
        def q(p: float) -> float:
            pos = p * (len(rtts) - 1)
            lo = int(pos)
            hi = min(lo + 1, len(rtts) - 1)
            return rtts[lo] + (rtts[hi] - rtts[lo]) * (pos - lo)
        out.update(min_ms=round(rtts[0] * 1000, 3), max_ms=round(rtts[-1] * 1000, 3),
                   avg_ms=round(sum(rtts) / len(rtts) * 1000, 3),
                   p50_ms=round(q(0.5) * 1000, 3), p95_ms=round(q(0.95) * 1000, 3))
    connects = [r.details["connect_ms"] for r in last if "connect_ms" in r.details]
    if connects:
        out["connect_ms_avg"] = round(sum(connects) / len(connects), 3)
    return out


def test_32_bit_rings_give_the_double_precision_figures_to_the_microsecond() -> None:
    """RTTs given to the µs (under 4 s): min/max exact, means and percentiles within 1 µs."""
    import random

    rng = random.Random(17)
    views = 0
    for window in (1, 2, 7, 100):
        st = fresh(window=window)
        results: list[ProbeResult] = []
        for _ in range(3 * window + 5):
            if rng.random() < 0.1:
                r = ProbeResult.failure("timeout")
            else:
                rtt = rng.randint(1, 4_000_000) / 1e6  # 1 µs .. 4 s
                details = {} if rng.random() < 0.2 else {"connect_ms": rng.randint(1, 10**6) / 1e3}
                r = ProbeResult.success(rtt, **details)
            results.append(r)
            st.record(r)
            want = _reference(results, window)
            got = st.as_dict()
            views += 1
            assert got["loss_pct"] == want["loss_pct"]
            if r.ok:
                assert got["rtt_ms"] == round(r.rtt * 1000, 3)  # the latest: kept as a double
            for key in ("min_ms", "max_ms"):
                assert got[key] == want.get(key), (window, key)
            for key in ("avg_ms", "p50_ms", "p95_ms", "connect_ms_avg"):
                if want.get(key) is None:
                    assert got.get(key) is None, (window, key)
                else:
                    assert abs(got[key] - want[key]) <= 0.0010001, (window, key, got, want)
    assert views > 300


def test_a_detail_missing_from_some_results_is_averaged_over_those_that_had_it() -> None:
    st = fresh(window=4)
    st.record(ProbeResult.success(0.001, connect_ms=1.0))
    st.record(ProbeResult.failure("refused"))  # no connect_ms
    st.record(ProbeResult.success(0.001, connect_ms=3.0, ttfb_ms=5.0))
    view = st.as_dict()
    assert view["connect_ms_avg"] == 2.0 and view["ttfb_ms_avg"] == 5.0
    for _ in range(4):  # the window turns over: only results without details remain
        st.record(ProbeResult.success(0.001))
    view = st.as_dict()
    assert "connect_ms_avg" not in view and "ttfb_ms_avg" not in view
    assert st.last is not None and st.last.details == {}


def test_views_share_their_rounded_floats_and_keep_signed_zeros() -> None:
    from healthmesh.core import state as state_mod

    a, b = KindState(3, 10), KindState(3, 10)
    for st in (a, b):
        for _ in range(3):
            st.record(ProbeResult(True, 0.000123, None, {"connect_ms": 0.05}, 1.0, 1.0))
    va, vb = a.as_dict(), b.as_dict()
    assert va == vb
    # Equal values are one object: two generations of views cost one set of floats.
    assert all(va[k] is vb[k] for k in ("rtt_ms", "min_ms", "p95_ms", "loss_pct",
                                        "connect_ms_avg", "connect_ms"))
    # Rounded as round(x, 3) was, to the same doubles, and shared.
    rng = random.Random(5)
    for _ in range(20_000):
        x = rng.uniform(0.0, 2000.0) if rng.random() < 0.5 else rng.uniform(0.0, 2.0)
        got = state_mod._thousandths(x)
        assert got == round(x, 3) or abs(x * 1000.0 % 1.0 - 0.5) < 1e-6  # ties may differ
        assert state_mod._thousandths(x) is got
    for odd in (-0.0004, -1.5, float("inf"), float("-inf"), 1e12):
        assert state_mod._thousandths(odd) == round(odd, 3)
    nan = state_mod._thousandths(float("nan"))
    assert nan != nan
    before = state_mod._SHARED_MAX
    try:
        state_mod._SHARED_MAX = 4
        for i in range(10):
            state_mod._thousandths(1000.0 + i)
        assert len(state_mod._THOUSANDTHS) <= 4  # bounded
    finally:
        state_mod._SHARED_MAX = before
