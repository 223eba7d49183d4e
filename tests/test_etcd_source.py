"""The etcd peer source in-process with a real etcd: registration, heartbeat, watch, bad values."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from loguru import logger

from healthmesh import Node
from healthmesh.core.config import convert
from healthmesh.plugins.clustermesh.client import EtcdClient, EtcdUnavailable
from healthmesh.plugins.clustermesh.connection import connection_from
from healthmesh.plugins.clustermesh.etcd_source import EtcdSettings, EtcdSource
from tests.etcd_fixtures import EtcdServer, etcd_fixture  # noqa: F401

pytestmark = pytest.mark.anyio

LOCAL = Node("n1", "c1", addresses=("127.0.0.1",))


class RecordingFeed:
    """A SourceFeed that remembers the current node set and every stale/fresh mark."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.replaced = 0
        self.stale: str | None = None
        self.marks: list[str | None] = []

    def replace(self, nodes: Any) -> None:
        self.nodes = {n.id: n for n in nodes}
        self.replaced += 1

    def mark_stale(self, reason: str) -> None:
        self.stale = reason
        self.marks.append(reason)

    def mark_fresh(self) -> None:
        self.stale = None
        self.marks.append(None)


def source(server: EtcdServer, tmp_path: Path, **settings: Any) -> EtcdSource:
    data = {"endpoints": [server.url], "lease_ttl": "3s", "timeout": "500ms", **settings}
    config = SimpleNamespace(path=str(tmp_path / "agent.toml"))
    return EtcdSource(convert(data, EtcdSettings, "sources.etcd"),
                      SimpleNamespace(config=config, local_node=LOCAL))


def registration(name: str, cluster: str = "c1", addr: str = "127.0.0.2") -> dict[str, Any]:
    return {"name": name, "cluster": cluster, "addresses": [addr], "health_addresses": [],
            "labels": {}, "version": "test"}  # fmt: skip


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.05)


async def test_agent_registers_with_a_leased_heartbeat_and_revokes_it_on_shutdown(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    feed = RecordingFeed()
    src = source(etcd, tmp_path)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(src.run, feed)
        record = json.loads(etcd.get("healthmesh/nodes/v1/c1/n1") or b"null")
        assert record["name"] == "n1" and record["addresses"] == ["127.0.0.1"]
        assert etcd.get("healthmesh/alive/v1/c1/n1") is not None
        # The lease is kept alive well past its 3 s TTL.
        await anyio.sleep(4.5)
        assert etcd.get("healthmesh/alive/v1/c1/n1") is not None
        assert feed.stale is None
        tg.cancel_scope.cancel()
    # Clean shutdown: heartbeat gone at once, registration durable.
    assert etcd.get("healthmesh/alive/v1/c1/n1") is None
    assert etcd.get("healthmesh/nodes/v1/c1/n1") is not None


async def test_watch_feeds_added_changed_and_removed_nodes_with_their_heartbeat(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    etcd.put("healthmesh/nodes/v1/c1/n2", registration("n2"))
    feed = RecordingFeed()
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(source(etcd, tmp_path).run, feed)
        # Present at start; no heartbeat key: its agent is down.
        assert set(feed.nodes) == {"c1/n2"}
        assert feed.nodes["c1/n2"].info == {"heartbeat": "expired"}
        etcd.put("healthmesh/alive/v1/c1/n2", {"name": "n2"})
        await wait_until(lambda: feed.nodes["c1/n2"].info["heartbeat"] == "alive")
        etcd.put("healthmesh/nodes/v1/c1/n3", registration("n3", addr="127.0.0.3"))
        await wait_until(lambda: "c1/n3" in feed.nodes)
        etcd.put("healthmesh/nodes/v1/c1/n3", registration("n3", addr="127.0.0.33"))
        await wait_until(lambda: feed.nodes["c1/n3"].addresses == ("127.0.0.33",))
        etcd.delete("healthmesh/nodes/v1/c1/n2")
        await wait_until(lambda: "c1/n2" not in feed.nodes)
        assert "c1/n1" not in feed.nodes  # the local node is the agent's own, not the source's
        tg.cancel_scope.cancel()


def malformed_values() -> list[tuple[str, bytes]]:
    """A few hundred bad keys and values of every kind the source must refuse."""
    bad: list[tuple[str, bytes]] = []
    p = "healthmesh/nodes/v1"
    good = registration("x")
    for i in range(40):
        bad.append((f"{p}/c1/json{i}", b"{not json" + bytes([i])))
        bad.append((f"{p}/c1/type{i}", json.dumps({**good, "name": f"type{i}",
                                                   "addresses": i}).encode()))  # fmt: skip
        bad.append((f"{p}/c1/name{i}", json.dumps({**good, "name": f"other{i}"}).encode()))
        bad.append((f"{p}/c1/cl{i}", json.dumps({**good, "name": f"cl{i}",
                                                 "cluster": "c9"}).encode()))  # fmt: skip
        big = {**good, "name": f"big{i}", "labels": {"x": "y" * 70000}}
        bad.append((f"{p}/c1/big{i}", json.dumps(big).encode()))
        bad.append((f"{p}/c9/n{i}", json.dumps(registration(f"n{i}", "c9")).encode()))
        badip = {**good, "name": f"ip{i}", "addresses": ["10.0.0.300"]}
        bad.append((f"{p}/c1/ip{i}", json.dumps(badip).encode()))
        bad.append((f"{p}/c1/deep/n{i}", json.dumps(good).encode()))
    bad.append((f"{p}/c1/nested", b"[" * 5000 + b"]" * 5000))
    bad.append((f"{p}/c1/empty", b""))
    bad.append((f"{p}/c1/noaddr", json.dumps({**good, "name": "noaddr",
                                              "addresses": []}).encode()))  # fmt: skip
    bad.append((f"{p}/c1/many", json.dumps({**good, "name": "many", "addresses": [
        f"10.0.{i // 250}.{i % 250 + 1}" for i in range(100)]}).encode()))  # fmt: skip
    bad.append((f"{p}/c1/bad name!", json.dumps({**good, "name": "bad name!"}).encode()))
    bad.append((f"{p}/c1/utf", b"\xff\xfe\x00garbage"))
    return bad


async def test_hundreds_of_malformed_values_are_skipped_with_warnings_naming_the_key(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    etcd.put("healthmesh/nodes/v1/c1/n2", registration("n2"))
    bad = malformed_values()
    assert len(bad) >= 300
    half = len(bad) // 2
    etcd.put_many(bad[:half])  # some there at start-up, the rest arrive through the watch
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(str(m)), level="WARNING", format="{message}")
    try:
        feed = RecordingFeed()
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(10):
                await tg.start(source(etcd, tmp_path).run, feed)
            etcd.put_many(bad[half:])
            # A bad value over a good one keeps the good one.
            etcd.put("healthmesh/nodes/v1/c1/n2", b"oops")
            etcd.put("healthmesh/nodes/v1/c1/n4", registration("n4", addr="127.0.0.4"))
            await wait_until(lambda: "c1/n4" in feed.nodes)
            tg.cancel_scope.cancel()
    finally:
        logger.remove(sink)
    assert set(feed.nodes) == {"c1/n2", "c1/n4"}
    assert feed.nodes["c1/n2"].addresses == ("127.0.0.2",)
    text = "\n".join(warnings)
    for key, _value in bad:
        assert f"skipping {key}:" in text, key
    assert "skipping healthmesh/nodes/v1/c1/n2: invalid JSON" in text
    assert "keeping its last good value" in text
    assert "unknown cluster 'c9'" in text
    assert "does not match the key" in text
    assert "larger than max_value_bytes" in text
    assert feed.stale is None


async def test_client_reports_a_dead_endpoint_in_one_line_and_fails_over(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    from tests.agentproc import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    settings = SimpleNamespace(
        endpoints=[dead], timeout=0.5, username=None, password=None, password_file=None,
        tls=SimpleNamespace(ca=None, cert=None, key=None),
    )  # fmt: skip
    async with EtcdClient(connection_from(settings, str(tmp_path / "x.toml"))) as client:
        with pytest.raises(EtcdUnavailable) as info:
            await client.count("healthmesh/")
    assert dead in str(info.value) and "\n" not in str(info.value)
    settings.endpoints = [dead, etcd.url]
    async with EtcdClient(connection_from(settings, str(tmp_path / "x.toml"))) as client:
        await client.put("healthmesh/t", b"1")
        assert await client.count("healthmesh/") == 1
        assert client.endpoint == etcd.url


def test_leave_removes_a_registration_and_errors_are_one_line(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    from tests.agentproc import free_port
    from tests.conftest import run_cli

    def config(endpoint: str, extra: str = "") -> str:
        path = tmp_path / f"leave{free_port()}.toml"
        path.write_text(
            '[node]\nname = "n1"\ncluster = "c1"\naddresses = ["127.0.0.1"]\n'
            f'[sources.etcd]\nendpoints = ["{endpoint}"]\ntimeout = "500ms"\n{extra}'
        )
        return str(path)

    etcd.put("healthmesh/nodes/v1/c1/n1", registration("n1"))
    etcd.put("healthmesh/nodes/v1/c1/gone", registration("gone"))
    cfg = config(etcd.url)
    out = run_cli("leave", "-c", cfg)
    assert out.returncode == 0 and "node c1/n1 left the mesh" in out.stdout, out.stderr
    assert etcd.get("healthmesh/nodes/v1/c1/n1") is None
    out = run_cli("leave", "-c", cfg)
    assert out.returncode == 0 and "was not registered" in out.stdout
    out = run_cli("leave", "-c", cfg, "--node", "gone")  # a node that will not come back
    assert out.returncode == 0 and etcd.get("healthmesh/nodes/v1/c1/gone") is None
    for args, expected in [
        (("-c", config(f"http://127.0.0.1:{free_port()}")), "etcd: "),
        (("-c", config(etcd.url, 'lease_ttl = "1s"\n')), "sources.etcd.lease_ttl"),
        (("-c", str(tmp_path / "missing.toml")), "missing.toml"),
    ]:
        out = run_cli("leave", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert expected in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr
