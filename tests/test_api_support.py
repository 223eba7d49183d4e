"""Helpers for the API and status tests: a real agent subprocess and the API's schemas.

Holds no tests itself; tests/test_api*.py and tests/test_status*.py import from it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012 as _SPEC

from tests.conftest import ROOT, healthmesh_cmd

#: The project's own JSON Schema of Cilium's /v1beta model, as healthmesh serves it.
CILIUM_SCHEMA = ROOT / "healthmesh" / "plugins" / "api" / "cilium-health.schema.json"
OPENAPI = ROOT / "healthmesh" / "plugins" / "api" / "openapi.json"
SNAPSHOT_SCHEMA = ROOT / "docs" / "snapshot.schema.json"


def free_port() -> int:
    """A TCP port free on every loopback address right now."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def uds_client(path: str | os.PathLike[str], timeout: float = 10.0) -> httpx.Client:
    """An httpx client that talks HTTP over the unix socket at ``path``."""
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(path)), base_url="http://localhost", timeout=timeout
    )


def agent_config(
    socket_path: str | None,
    port: int,
    *,
    peers: str,
    listen: Sequence[str] = ("127.0.0.1", "127.0.0.2"),
    interval: str = "1s",
    timeout: str = "500ms",
    api_extra: str = "",
    disable: Sequence[str] = ("icmp",),
) -> str:
    """A config probing by HTTP against the agent's own responder on ``listen`` addresses."""
    listen_list = ", ".join(f'"{a}:{port}"' for a in listen)
    api = f'socket = "{socket_path}"\n' if socket_path else ""
    return f"""
[node]
name = "me"
addresses = ["127.0.0.1"]
[probing]
interval = "{interval}"
timeout = "{timeout}"
failure_threshold = 1
[plugins]
disable = {json.dumps(list(disable))}
[responder]
listen = [{listen_list}]
[probes.http]
port = {port}
[sources.static]
nodes = [{peers}]
[outputs.api]
{api}{api_extra}
"""


#: One live peer (127.0.0.2, answered by the agent's own responder), one dead cross-cluster
#: peer with a health endpoint (nothing listens on 127.0.0.3-5).
TWO_PEERS = (
    '{name = "peer", addresses = ["127.0.0.2"]}, '
    '{name = "dead", cluster = "c2", addresses = ["127.0.0.3"], '
    'health_addresses = ["127.0.0.4", "127.0.0.5"]}'
)
LIVE_PEER = '{name = "peer", addresses = ["127.0.0.2"]}'


class AgentProcess:
    """``healthmesh run`` in a subprocess, its log in a file; stopped with SIGTERM."""

    def __init__(
        self,
        tmp: Path,
        config: str,
        *,
        socket_path: str | os.PathLike[str],
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
        name: str = "agent",
    ) -> None:
        self.config_path = tmp / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = tmp / f"{name}.log"
        self.socket_path = str(socket_path)
        self.env = {**os.environ, **(env or {})}
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0

    def start(self) -> AgentProcess:
        # A second start would orphan the first agent (``with AgentProcess(...).start()``
        # once left one running after the suite).
        assert self.proc is None, "AgentProcess started twice (use it as a context manager)"
        argv = [*self.prefix, *healthmesh_cmd(), "run", "-c", str(self.config_path),
                "-o", "json", "--log-level", "INFO"]
        self.spawned_at = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=log, env=self.env, cwd=ROOT
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 10.0) -> httpx.Client:
        return uds_client(self.socket_path, timeout)

    def wait_serving(self, within: float = 20.0) -> None:
        """Wait (bounded) until ``GET /v1/healthz`` answers 200."""
        assert self.proc is not None
        deadline = time.monotonic() + within
        with self.client(timeout=2.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log()}")
                try:
                    if c.get("/v1/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        raise AssertionError(f"agent did not serve within {within}s:\n{self.log()}")

    def wait_rounds(self, n: int = 1, within: float = 20.0) -> None:
        """Wait (bounded) until ``n`` probe rounds have completed."""
        deadline = time.monotonic() + within
        with self.client() as c:
            while time.monotonic() < deadline:
                if c.get("/v1/healthz").json()["rounds_completed"] >= n:
                    return
                time.sleep(0.05)
        raise AssertionError(f"fewer than {n} rounds within {within}s:\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait (bounded), SIGKILL as a last resort; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- schemas ------------------------------------------------------------------------------


def cilium_validator(definition: str) -> jsonschema.Draft202012Validator:
    """A validator for one definition of our /v1beta schema (its objects reject extra keys)."""
    doc = json.loads(CILIUM_SCHEMA.read_text())
    registry: Registry = Registry().with_resource(
        doc["$id"], Resource.from_contents(doc, default_specification=_SPEC)
    )
    return jsonschema.Draft202012Validator(
        {"$ref": f"{doc['$id']}#/$defs/{definition}"}, registry=registry
    )


def openapi_document() -> dict[str, Any]:
    return json.loads(OPENAPI.read_text())


def openapi_validator(component: str) -> jsonschema.Draft202012Validator:
    """A validator for one component schema of our /v1 OpenAPI document."""
    doc = openapi_document()
    registry: Registry = Registry().with_resource(
        "urn:healthmesh-v1", Resource.from_contents(doc, default_specification=_SPEC)
    )
    return jsonschema.Draft202012Validator(
        {"$ref": f"urn:healthmesh-v1#/components/schemas/{component}"}, registry=registry
    )


def response_validator(path: str, method: str, status: int) -> jsonschema.Draft202012Validator:
    """A validator for the documented response of one /v1 operation."""
    doc = openapi_document()
    op = doc["paths"][path][method.lower()]
    schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
    ref = schema.get("$ref")
    if ref is None:
        return jsonschema.Draft202012Validator(schema)
    return openapi_validator(ref.rsplit("/", 1)[-1])


def snapshot_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SNAPSHOT_SCHEMA.read_text()))



def settled_agent(tmp: Path, peers: str) -> Iterator[AgentProcess]:
    """An agent on ``tmp/health.sock`` that has finished two rounds; stopped afterwards."""
    sock = tmp / "health.sock"
    proc = AgentProcess(tmp, agent_config(str(sock), free_port(), peers=peers), socket_path=sock)
    proc.start()
    try:
        proc.wait_serving()
        proc.wait_rounds(2)
        yield proc
    finally:
        proc.stop()
