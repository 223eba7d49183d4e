"""The per-path state machine and its rolling statistics."""

from __future__ import annotations

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
