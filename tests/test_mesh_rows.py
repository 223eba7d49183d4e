"""Mesh rows in etcd: the compact encoding, its size at 5,000 peers, strict decoding of
untrusted rows, and two real agents sharing rows through a real etcd (bad rows ignored,
writes bounded)."""

from __future__ import annotations

import json
import random
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from healthmesh.plugins.clustermesh.records import BadValue
from healthmesh.plugins.clustermesh.rows import (
    RowPublisher,
    decode_row,
    encode_row,
    row_key,
    signature,
)
from tests.conftest import ROOT, run_cli
from tests.etcd_fixtures import EtcdServer
from tests.etcd_fixtures import etcd_fixture as etcd  # noqa: F401
from tests.test_api_support import AgentProcess, free_port

SCHEMA = json.loads((ROOT / "docs" / "mesh.schema.json").read_text())
#: etcd's default request limit (--max-request-bytes): a value must stay well under it.
ETCD_LIMIT = 1_572_864


def make_row(n: int, seed: int = 1) -> dict[str, Any]:
    """A realistic row of ``n`` peers: sub-ms RTTs, mostly no loss, a few failing."""
    rng = random.Random(seed)
    cells = {}
    for i in range(n):
        bad = rng.random() < 0.01
        kinds = {"http": "unreachable" if bad else "reachable", "icmp": "reachable"}
        cells[f"default/node-{i:05d}"] = {
            "state": "degraded" if bad else "reachable",
            "kinds": kinds,
            "rtt_ms": round(rng.uniform(0.1, 2.0), 3),
            "loss_pct": 0.0 if rng.random() < 0.9 else round(rng.uniform(0, 10), 2),
            "since": float(1_796_000_000 + rng.randrange(100_000)),
        }
    return {"observer": "default/node-00000", "timestamp": 1_796_119_200.5, "cells": cells}


def test_a_row_round_trips() -> None:
    row = make_row(50)
    back = decode_row("default", "node-00000", encode_row(row), max_bytes=ETCD_LIMIT)
    assert back["observer"] == row["observer"] and back["timestamp"] == 1_796_119_200.0
    for target, cell in row["cells"].items():
        got = back["cells"][target]
        assert got["kinds"] == cell["kinds"] and got["state"] == cell["state"]
        assert got["rtt_ms"] == pytest.approx(cell["rtt_ms"], abs=0.001)
        assert got["loss_pct"] == pytest.approx(cell["loss_pct"], abs=0.01)
        assert got["since"] == cell["since"]


def test_a_5000_peer_row_is_well_under_etcds_value_limit() -> None:
    row = make_row(5000)
    t0 = time.perf_counter()
    value = encode_row(row)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode_row("default", "node-00000", value, max_bytes=ETCD_LIMIT)
    decode_s = time.perf_counter() - t0
    raw = len(zlib.decompress(value))
    print(f"5000-peer row: {len(value)} bytes compressed ({raw} raw JSON), "
          f"encode {encode_s * 1000:.0f} ms, decode {decode_s * 1000:.0f} ms")
    assert len(value) < ETCD_LIMIT / 10  # well under: docs/mesh.md quotes the figure


def corrupt(obj: Any) -> bytes:
    return zlib.compress(json.dumps(obj).encode())


GOOD = {"v": 1, "o": "default/a", "ts": 1, "k": ["http", "icmp"],
        "c": [["default/b", "rr", 100, 0, 5]]}  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not zlib at all", "not zlib data"),
        (zlib.compress(b"\0" * (17 * 1024 * 1024)), "inflates to more than"),
        (corrupt(GOOD)[:-6], "truncated"),
        (zlib.compress(b"{nope"), "not JSON"),
        (corrupt({**GOOD, "c": "x"}), "wrong schema"),
        (corrupt({**GOOD, "v": 2}), "version 2"),
        (corrupt({**GOOD, "o": "default/b"}), "does not match the key"),
        (corrupt({**GOOD, "c": [["../etc", "rr", 1, 0, 1]]}), "bad target"),
        (corrupt({**GOOD, "c": [["default/b", "r", 1, 0, 1]]}), "bad states"),
        (corrupt({**GOOD, "c": [["default/b", "rx", 1, 0, 1]]}), "bad states"),
        (corrupt({**GOOD, "c": [["default/b", "rr", -1, 0, 1]]}), "out of range"),
        (corrupt({**GOOD, "c": [["default/b", "rr", 1, 10001, 1]]}), "out of range"),
        (corrupt({**GOOD, "k": ["HTTP!", "icmp"]}), "bad kind"),
        (corrupt({**GOOD, "k": ["icmp", "icmp"]}), "a kind twice"),
        (b"x" * 70000, "larger than rows_max_bytes"),
    ],
)
def test_bad_rows_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(BadValue, match=reason):
        decode_row("default", "a", raw, max_bytes=65536)


def test_the_signature_ignores_small_rtt_and_loss_changes_but_not_a_loss_band() -> None:
    row = make_row(3)
    same = json.loads(json.dumps(row))
    cell = next(iter(same["cells"].values()))
    cell["rtt_ms"] += 0.5
    cell["loss_pct"] = 1.0
    assert signature(same) == signature(row)
    cell["loss_pct"] = 20.0
    assert signature(same) != signature(row)
    cell["loss_pct"], cell["kinds"] = 1.0, {"http": "unreachable", "icmp": "unreachable"}
    assert signature(same) != signature(row)


def test_the_write_gap_keeps_the_mesh_under_100_writes_per_second() -> None:
    pub = RowPublisher.__new__(RowPublisher)
    pub.min_gap = 2.0
    for n in (10, 100, 1000, 5000, 20000):
        assert n / pub.gap(n) <= 100.0
    assert pub.gap(10) == 2.0 and pub.gap(5000) == 50.0


# -- two real agents and a real etcd -------------------------------------------------------


def agent_toml(name: str, addr: str, port: int, sock: Path, etcd_url: str) -> str:
    return f"""
[node]
name = "{name}"
addresses = ["{addr}"]
[probing]
interval = "500ms"
timeout = "250ms"
[probes.icmp]
enabled = false
[responder]
listen = ["{addr}:{port}"]
[probes.http]
port = {port}
[sources.etcd]
endpoints = ["{etcd_url}"]
lease_ttl = "3s"
timeout = "500ms"
retry_max = "1s"
rows_min_gap = "300ms"
[outputs.api]
socket = "{sock}"
"""


@pytest.fixture
def pair(tmp_path: Path, etcd: EtcdServer) -> Iterator[tuple[AgentProcess, AgentProcess]]:  # noqa: F811
    port = free_port()
    agents = []
    for name, addr in (("a", "127.0.0.1"), ("b", "127.0.0.2")):
        sock = tmp_path / f"{name}.sock"
        agents.append(AgentProcess(tmp_path, agent_toml(name, addr, port, sock, etcd.url),
                                   socket_path=sock, name=name).start())
    try:
        for a in agents:
            a.wait_serving()
        yield agents[0], agents[1]
    finally:
        for a in agents:
            a.stop()


def wait_matrix(agent: AgentProcess, pred: Any, within: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        with agent.client() as c:
            last = c.get("/v1/mesh").json()
        if pred(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"not within {within}s: {last}")


def test_two_agents_share_rows_ignore_a_bad_one_and_write_little(
    pair: tuple[AgentProcess, AgentProcess], etcd: EtcdServer,  # noqa: F811
) -> None:
    a, b = pair

    def full(m: dict[str, Any]) -> bool:
        return m["observers"] == ["default/a", "default/b"] and not m["local_only"] and all(
            c["state"] == "reachable" for row in m["cells"].values() for c in row.values()
        ) and all(len(row) == 2 for row in m["cells"].values())

    m = wait_matrix(a, full)
    jsonschema.validate(m, SCHEMA)
    assert m["verdicts"] == [] and m["heartbeats"] == {"default/a": "alive", "default/b": "alive"}
    wait_matrix(b, full)

    # Rows live under the agent's lease, next to its registration.
    kvs = etcd.call("/v3/kv/range", {"key": _b64(row_key("healthmesh", "default", "b"))})["kvs"]
    assert int(kvs[0]["lease"]) != 0
    # A steady mesh writes nothing until the refresh (60 s): no write in 5 s.
    version = int(kvs[0]["version"])
    time.sleep(5)
    again = etcd.call("/v3/kv/range", {"key": _b64(row_key("healthmesh", "default", "b"))})
    assert int(again["kvs"][0]["version"]) == version

    # Bad rows (a hostile writer) are logged once each, never crash, never show.
    etcd.put("healthmesh/rows/v1/default/evil", b"\x78\x9c garbage")
    etcd.put("healthmesh/rows/v1/default/liar", corrupt({**GOOD, "o": "default/a"}))
    etcd.put("healthmesh/rows/v1/other-cluster/x", corrupt(GOOD))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "rows/v1/default/liar" not in a.log():
        with a.client() as c:  # rows are decoded when the matrix is asked for
            c.get("/v1/mesh")
        time.sleep(0.1)
    log = a.log()
    assert "skipping healthmesh/rows/v1/default/evil: row is not zlib data" in log
    assert "skipping healthmesh/rows/v1/default/liar: observer 'default/a' does not match" in log
    assert "skipping healthmesh/rows/v1/other-cluster/x: not a row of a known cluster" in log
    m = wait_matrix(a, full)
    assert "Traceback" not in log

    # The agent b stops cleanly: its heartbeat is revoked and its row goes with it; its
    # address answers nothing more (the only kind here is http): node down. (For the moment
    # between the heartbeat's end and the first failed probe, it is "agent-down".)
    b.stop()

    def down(m: dict[str, Any]) -> bool:
        got = [(v["kind"], v["subject"]) for v in m["verdicts"]]
        return m["observers"] == ["default/a"] and got == [("node-down", "default/b")]

    m = wait_matrix(a, down, 15)
    assert m["heartbeats"]["default/b"] == "expired"
    out = run_cli("mesh", "-H", f"unix://{a.socket_path}")
    assert out.returncode == 1 and "node b is down" in out.stdout, out.stdout


def test_without_etcd_the_matrix_is_the_local_row_and_says_so(tmp_path: Path) -> None:
    sock = tmp_path / "solo.sock"
    port = free_port()
    config = f"""
[node]
name = "solo"
addresses = ["127.0.0.1"]
[probing]
interval = "500ms"
timeout = "250ms"
[probes.icmp]
enabled = false
[responder]
listen = ["127.0.0.1:{port}"]
[probes.http]
port = {port}
[sources.static]
nodes = [{{name = "gone", addresses = ["127.0.0.9"]}}]
[outputs.api]
socket = "{sock}"
"""
    with AgentProcess(tmp_path, config, socket_path=sock, name="solo") as agent:
        agent.wait_serving()
        m = wait_matrix(agent, lambda m: m["verdicts"] != [])
        jsonschema.validate(m, SCHEMA)
        assert m["local_only"] is True and m["observers"] == ["default/solo"]
        assert [(v["kind"], v["subject"]) for v in m["verdicts"]] == [("node-down", "default/gone")]
        out = run_cli("mesh", "-H", f"unix://{sock}")
        assert out.returncode == 1
        assert "local only" in out.stdout and "node gone is down" in out.stdout
        st = run_cli("status", "-H", f"unix://{sock}")
        assert "Mesh verdicts about this node:" not in st.stdout  # it names "gone", not solo
    missing = run_cli("mesh", "-H", f"unix://{tmp_path}/nobody.sock")
    assert missing.returncode == 3 and "no agent" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def test_an_agent_that_does_not_read_rows_leaves_them_out_of_its_watch() -> None:
    from healthmesh.plugins.clustermesh.tables import HealthmeshTable

    reading = HealthmeshTable("t", "healthmesh", {"default"}, max_bytes=65536,
                              rows_max_bytes=1 << 20)
    assert reading.watch_end is None
    table = HealthmeshTable("t", "healthmesh", {"default"}, max_bytes=65536)
    end = table.watch_end
    assert end is not None
    for key in ("healthmesh/alive/v1/default/a", "healthmesh/nodes/v1/default/a",
                "healthmesh/nodes/v1/c/" + "z" * 200):
        assert table.watch_prefix <= key < end
    assert not "healthmesh/rows/v1/default/a" < end
    # And a row under the prefix is ignored, whatever it holds.
    table.apply("healthmesh/rows/v1/default/a", b"junk")
    assert table.rows() == {}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('rows_min_gap = "10ms"', "sources.etcd.rows_min_gap: must be between 100ms and 1h"),
        ('rows_refresh = "1s"', "sources.etcd.rows_refresh: must be between rows_min_gap"),
        ("rows_max_bytes = 10", "sources.etcd.rows_max_bytes: must be between 1024"),
        ("indirect_k = 2", "sources.etcd.indirect_secret_file: required when indirect_k"),
        ('indirect_k = 2\nindirect_secret_file = "nope"', "nope: No such file or directory"),
        ('indirect_k = 2\nindirect_secret_file = "short"', "the secret must be at least 16"),
        ("indirect_k = 99", "sources.etcd.indirect_k: must be between 0 (off) and 16"),
        ("indirect_k = 2\nrows = false", "indirect_k: needs register = true and rows = true"),
    ],
)
def test_row_settings_are_checked(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "short").write_text("tiny\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nname = "a"\naddresses = ["127.0.0.1"]\n[sources.etcd]\n'
                   f'endpoints = ["http://127.0.0.1:2379"]\n{line}\n')
    out = run_cli("config", "check", "-c", str(cfg))
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
