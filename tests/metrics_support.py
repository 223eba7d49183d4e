"""Helpers of the metrics tests: a loopback agent config with ``[outputs.metrics]``, scraping."""

from __future__ import annotations

import gzip
import http.client
import shutil
import subprocess
import time
from pathlib import Path

from tests.agentproc import AgentProc, free_port


def metrics_config(
    tmp: Path,
    *,
    peers: int = 3,
    extra_nodes: str = "",
    extra_listen: tuple[str, ...] = (),
    metrics: str = "",
    interval: str = "500ms",
    timeout: str = "300ms",
) -> tuple[Path, int]:
    """A loopback agent (self on 127.0.0.1, peers on 127.0.0.2..) serving metrics; (path, port)."""
    port, mport = free_port(), free_port()
    addrs = [f"127.0.0.{i}" for i in range(1, peers + 2)] + list(extra_listen)
    listen = ", ".join(f'"{a}:{port}"' for a in addrs)
    nodes = [f'{{name = "peer-{i}", addresses = ["127.0.0.{i + 1}"]}}' for i in range(1, peers + 1)]
    if extra_nodes:
        nodes.append(extra_nodes)
    cfg = tmp / "agent.toml"
    cfg.write_text(
        f"""
[node]
name = "self"
addresses = ["127.0.0.1"]
[probing]
interval = "{interval}"
timeout = "{timeout}"
confirm_probes = 2
[responder]
listen = [{listen}]
[probes.http]
port = {port}
[outputs.api]
socket = "{tmp / "health.sock"}"
[sources.static]
nodes = [{", ".join(nodes)}]
[outputs.metrics]
listen = "127.0.0.1:{mport}"
{metrics}
"""
    )
    return cfg, mport


def get(
    port: int, path: str = "/metrics", headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """``GET`` on the loopback metrics port: (status, lower-case headers, decoded body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        if hdrs.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        return resp.status, hdrs, body
    finally:
        conn.close()


def wait_metrics(agent: AgentProc, port: int, predicate, timeout: float = 15.0) -> str:  # type: ignore[no-untyped-def]
    """The first scraped body for which ``predicate(text)`` holds."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        assert agent.proc.poll() is None, agent.stderr()
        try:
            status, _, body = get(port)
        except OSError:
            time.sleep(0.1)
            continue
        last = body.decode()
        if status == 200 and predicate(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"metrics condition not reached; last body:\n{last[-3000:]}")


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample of ``name`` in a text exposition: {frozenset of label pairs: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[frozenset[tuple[str, str]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[frozenset(s.labels.items())] = s.value
    return out


def promtool_check_metrics(body: bytes) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on an exposition (the text format)."""
    promtool = shutil.which("promtool")
    assert promtool is not None
    return subprocess.run(
        [promtool, "check", "metrics"], input=body.decode(), capture_output=True, text=True,
        timeout=30,
    )
