"""The metrics output: core telemetry counters, and a real agent's /metrics scraped over TCP."""

from __future__ import annotations

import time
from pathlib import Path

from healthmesh import PathState, ProbeResult
from healthmesh.core.state import StateStore
from healthmesh.core.telemetry import CILIUM_BUCKETS, RTT_BUCKETS, Histogram, Telemetry
from tests.agentproc import AgentProc
from tests.conftest import require_binary, run_cli
from tests.metrics_support import (
    get,
    metrics_config,
    promtool_check_metrics,
    samples,
    wait_metrics,
)

KEY = ("default/peer", "127.0.0.2", "host")
DEFAULT_FAMILIES = [
    "healthmesh_agent_info",
    "healthmesh_nodes",
    "healthmesh_paths",
    "healthmesh_probe_duration_seconds_bucket",
    "healthmesh_probes_total",
    "healthmesh_state_changes_total",
    "healthmesh_round_duration_seconds_count",
    "healthmesh_scheduler_lag_seconds_bucket",
    "healthmesh_peers",
    "healthmesh_responder_requests_total",
    "healthmesh_last_round_timestamp_seconds",
    "process_cpu_seconds_total",
    "python_info",
]


def ok(rtt: float) -> ProbeResult:
    return ProbeResult(True, rtt, None, {}, 1.0, 1.0 + rtt)


def test_histogram_buckets_are_less_or_equal_and_cumulative() -> None:
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.005, 0.01, 5.0):
        h.observe(v)
    assert h.cumulative() == [("0.001", 2), ("0.01", 4), ("+Inf", 5)]
    assert h.count == 5 and abs(h.sum - 5.0165) < 1e-9


def test_store_feeds_telemetry_results_changes_and_path_states() -> None:
    t = Telemetry(timeout=0.5)
    t.cilium_enabled = True
    t.primary_of = lambda key: key[1] == "127.0.0.2"
    store = StateStore(2, 10, t)
    store.ensure(KEY, "icmp")
    cell = t.cells[("icmp", "host")]
    assert cell.paths[PathState.UNKNOWN] == 1
    store.record(KEY, "icmp", ok(0.0003))
    assert (cell.successes, cell.changes) == (1, 1)
    assert cell.paths[PathState.REACHABLE] == 1 and cell.paths[PathState.UNKNOWN] == 0
    store.record(KEY, "icmp", ProbeResult.failure("timeout"))
    assert cell.changes == 1  # one failure of two needed: still reachable
    store.record(KEY, "icmp", ProbeResult.failure("timeout"))
    assert (cell.failures, cell.changes) == (2, 2)
    assert cell.paths[PathState.UNREACHABLE] == 1 and cell.paths[PathState.REACHABLE] == 0
    assert cell.rtt.count == 1  # only successes have an RTT
    # Cilium's histogram observes a failure as the probe timeout.
    ch = t.cilium[("host", "icmp", True)]
    assert ch.count == 3 and abs(ch.sum - (0.0003 + 2 * 0.5)) < 1e-9
    store.retire(KEY, "icmp")
    assert sum(cell.paths.values()) == 0
    store.ensure(KEY, "icmp")  # restored from retirement with its state
    assert cell.paths[PathState.UNREACHABLE] == 1
    store.record(("default/peer", "127.0.0.3", "host"), "icmp", ok(0.001))  # untracked: dropped
    assert cell.successes == 1


def test_telemetry_lag_rounds_responses() -> None:
    t = Telemetry()
    t.started_late(-0.001)  # early counts as on time
    t.started_late(0.003)
    t.round_finished(1.2)
    t.round_finished(None)
    t.responded(200)
    t.responded(200)
    t.responded(404)
    assert t.lag.counts[0] == 1 and t.lag.count == 2
    assert t.rounds.count == 1 and t.last_round_at > 0
    assert t.responses == {200: 2, 404: 1}


def test_default_series_bounded_and_promtool_clean(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "prometheus")
    cfg, port = metrics_config(tmp_path, peers=3)
    with AgentProc(cfg) as agent:
        text = wait_metrics(
            agent, port, lambda t: 'healthmesh_nodes{cluster="default",state="reachable"} 4.0' in t
        )
        for family in DEFAULT_FAMILIES:
            assert f"\n{family}" in text, family
        # Bounded by default: nothing per peer, nothing Cilium.
        assert "healthmesh_peer_" not in text and "cilium_" not in text
        assert "peer-1" not in text
        assert samples(text, "healthmesh_agent_info") == {
            frozenset({("version", "0.1.0"), ("node", "self"), ("cluster", "default")}): 1.0
        }
        assert samples(text, "healthmesh_peers") == {frozenset({("source", "static")}): 3.0}
        paths = samples(text, "healthmesh_paths")
        assert paths[frozenset({("kind", "http"), ("role", "host"), ("state", "reachable")})] == 4
        codes = samples(text, "healthmesh_responder_requests_total")
        assert codes[frozenset({("code", "200")})] >= 4
        buckets = [
            dict(k)["le"]
            for k in samples(text, "healthmesh_probe_duration_seconds_bucket")
            if dict(k)["kind"] == "http" and dict(k)["role"] == "host"
        ]
        assert [float(b) for b in buckets[:-1]] == list(RTT_BUCKETS) and buckets[-1] == "+Inf"
        status, headers, body = get(port)
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        assert len(body) <= 64 * 1024
        checked = promtool_check_metrics(body)
        assert checked.returncode == 0, (promtool, checked.stdout, checked.stderr)
        # OpenMetrics by content negotiation, gzip when asked.
        status, headers, body = get(
            port,
            headers={
                "Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
                "Accept-Encoding": "gzip",
            },
        )
        assert status == 200 and headers["content-encoding"] == "gzip"
        assert headers["content-type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n") and b"healthmesh_probes_total" in body
        for path in ("/", "/metrics/x", "/favicon.ico", "/v1/status"):
            assert get(port, path)[0] == 404, path
        assert get(port, "/metrics?x=1")[0] == 200


def test_per_peer_cap_warning_and_cilium_series(tmp_path: Path) -> None:
    # peer-9 has a secondary host address nobody answers HTTP on: its failures are what
    # Cilium's histogram sees as the probe timeout.
    cfg, port = metrics_config(
        tmp_path,
        peers=5,
        extra_nodes='{name = "peer-9", addresses = ["127.0.0.7", "127.0.0.99"]}',
        extra_listen=("127.0.0.7",),
        metrics="per_peer = true\nmax_peers = 3\ncilium_compat = true",
        timeout="300ms",
    )
    with AgentProc(cfg) as agent:
        text = wait_metrics(
            agent,
            port,
            lambda t: 'status="unreachable",type="node"} 1.0' in t
            and 'status="reachable",type="node"} 6.0' in t,
        )
        peers = {dict(k)["peer"] for k in samples(text, "healthmesh_peer_reachable")}
        assert peers == {"self", "peer-1", "peer-2"}  # the first max_peers of 7 nodes
        rtts = samples(text, "healthmesh_peer_rtt_seconds")
        assert {dict(k)["kind"] for k in rtts} >= {"http"} and all(v < 1 for v in rtts.values())
        assert "first 3 of 7 nodes" in agent.stderr()
        status = samples(text, "cilium_node_health_connectivity_status")
        src = {("source_cluster", "default"), ("source_node_name", "self")}
        want = {
            frozenset(src | {("type", t), ("status", s)})
            for t in ("node", "endpoint")
            for s in ("reachable", "unreachable", "unknown")
        }
        assert set(status) == want
        # 6 nodes have reachable host paths; peer-9 is unreachable (its secondary fails HTTP).
        assert status[frozenset(src | {("type", "node"), ("status", "reachable")})] == 6
        assert status[frozenset(src | {("type", "node"), ("status", "unreachable")})] == 1
        latency = samples(text, "cilium_node_health_connectivity_latency_seconds_bucket")
        labels = {tuple(sorted(k - {("le", dict(k)["le"])})) for k in latency}
        assert all(
            {n for n, _ in lab} == {"source_cluster", "source_node_name", "type", "address_type",
                                    "protocol"}
            for lab in labels
        )
        sec = {
            dict(k)["le"]: v
            for k, v in latency.items()
            if dict(k)["address_type"] == "secondary" and dict(k)["protocol"] == "http"
        }
        assert [float(le) for le in sec if le != "+Inf"] == list(CILIUM_BUCKETS)
        # Every failure counted at the timeout (300 ms): nothing at or below 250 ms.
        assert sec["0.25"] == 0 and sec["0.5"] == sec["+Inf"] > 0


def test_bad_metrics_settings_name_the_key(tmp_path: Path) -> None:
    for bad, needle in (
        ('listen = "localhost:9967"', "outputs.metrics.listen"),
        ('listen = "127.0.0.1:99999"', "outputs.metrics.listen"),
        ("max_peers = 0", "outputs.metrics.max_peers"),
        ("colour = 1", "colour"),
        ('tls_cert_file = "/nonexistent.pem"\ntls_key_file = "/nonexistent.key"',
         "cannot load '/nonexistent.pem'"),
    ):
        cfg, port = metrics_config(tmp_path)
        good = f'listen = "127.0.0.1:{port}"'
        replacement = bad if bad.startswith("listen") else f"{good}\n{bad}"
        cfg.write_text(cfg.read_text().replace(good, replacement))
        proc = run_cli("config", "check", "-c", str(cfg))
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (bad, proc.stderr)


def test_metrics_port_in_use_is_a_one_line_startup_error(tmp_path: Path) -> None:
    import socket

    cfg, port = metrics_config(tmp_path)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        proc = run_cli("run", "-c", str(cfg), "--once", timeout=60)
        # --once runs no outputs: the one round succeeds without the metrics listener.
        assert proc.returncode in (0, 1), proc.stderr
        with AgentProc(cfg) as agent:
            code = agent.proc.wait(30)
            err = agent.stderr()
    assert code == 2, err
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 6, err


def test_basic_auth_when_configured(tmp_path: Path) -> None:
    import base64

    secret = tmp_path / "password"
    secret.write_text("s3cret pass\n")
    cfg, port = metrics_config(
        tmp_path,
        metrics=f'basic_auth_user = "prom"\nbasic_auth_password_file = "{secret}"',
    )
    good = "Basic " + base64.b64encode(b"prom:s3cret pass").decode()
    bad = "Basic " + base64.b64encode(b"prom:wrong").decode()
    with AgentProc(cfg) as agent:
        for _ in range(100):  # until it listens: at most 20 s
            assert agent.proc.poll() is None, agent.stderr()
            try:
                get(port)
                break
            except OSError:
                time.sleep(0.2)
        status, headers, _ = get(port)
        assert status == 401 and headers["www-authenticate"].startswith("Basic")
        assert get(port, headers={"Authorization": bad})[0] == 401
        assert get(port, "/nope", headers={"Authorization": bad})[0] == 401
        status, _, body = get(port, headers={"Authorization": good})
        assert status == 200 and b"healthmesh_nodes" in body
    # Half a configuration, or an unreadable file, is a config error naming the key.
    cfg.write_text(cfg.read_text().replace(f'basic_auth_password_file = "{secret}"', ""))
    proc = run_cli("config", "check", "-c", str(cfg))
    assert proc.returncode == 2 and "basic_auth_password_file" in proc.stderr, proc.stderr
