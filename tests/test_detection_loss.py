"""Two minutes of 10% random packet loss on one host: never reported, shown as ~10% loss.

The issue's acceptance test for the detection rule (one failure plus eight overlapping
confirmation re-probes, all failed, before a path is unreachable): with loss p per probe a
false report needs p^9 (1e-9 at 10%), where Cilium's threshold of 3 gives 1e-3 and flaps.
"""

from __future__ import annotations

import statistics
import time

import pytest

from tests.netlab import Lab, find_node, probe_entries
from tests.netlab.fixtures import *  # noqa: F403

DURATION = 120.0
LOSS = 0.1


@pytest.mark.timeout(DURATION + 60)
def test_ten_percent_loss_for_two_minutes_is_never_reported_and_shows_as_about_ten_percent(
    netlab: Lab,
) -> None:
    lossy = netlab.host("h4")
    observers = [h for h in netlab.hosts if h is not lossy]
    t0 = time.time()
    netlab.loss(lossy, LOSS)
    bad: list[tuple[float, str, object]] = []
    deadline = time.monotonic() + DURATION
    while time.monotonic() < deadline:
        for h in netlab.hosts:
            view = netlab.view(h)
            assert view is not None, f"agent {h.name} stopped answering"
            if view["summary"]["unreachable"]:
                bad.append((time.time() - t0, h.name, view["summary"]))
        time.sleep(0.5)
    views = {h.name: netlab.view(h) for h in observers}
    # Every agent's log holds every state change it made: there must be none.
    reports = [t for h in netlab.hosts for t in netlab.transitions(h, since=t0)]
    assert reports == []
    assert bad == []
    loss: dict[str, list[float]] = {}
    for name, view in views.items():
        assert view is not None
        node = find_node(view, lossy.name)
        assert node is not None and node["state"] == "reachable", name
        for e in probe_entries(node):
            assert e["samples"] >= 100  # a full window of probes with loss in it
            assert 1.0 <= e["loss_pct"] <= 25.0, (name, e)
            loss.setdefault(e["kind"], []).append(e["loss_pct"])
    for kind, values in loss.items():
        # 3 observers x 4 paths x 100 probes per kind: the mean is within a few points.
        assert 6.0 <= statistics.fmean(values) <= 15.0, (kind, values)
