"""A real agent with ``[outputs.web]`` on loopback, its peers as loopback responder processes."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.agentproc import AgentProc, free_port
from tests.conftest import ROOT, healthmesh_cmd

#: Peers of the test mesh: name, cluster, loopback address (each its own responder process).
PEERS = [("n2", "default", "127.0.0.2"), ("n3", "default", "127.0.0.3"),
         ("n4", "east", "127.0.0.4")]


class LoopbackResponder:
    """``healthmesh responder --listen ADDR:PORT`` as its own process: a peer to stop."""

    def __init__(self, log_path: Path, listen: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [*healthmesh_cmd(), "responder", "--listen", listen],
            stdout=subprocess.DEVNULL, stderr=self._log, cwd=ROOT,
        )
        deadline = time.monotonic() + 20
        while "listening on" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"responder on {listen} did not start: "
                                     f"{self.log_path.read_text(errors='replace')}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@dataclass
class WebMesh:
    """The running agent, its page's URL and its peers' responders by name."""

    agent: AgentProc
    url: str
    responders: dict[str, LoopbackResponder] = field(default_factory=dict)

    @property
    def host_port(self) -> str:
        return self.url.split("//", 1)[1].rstrip("/")


def web_config(tmp: Path, port: int, web: str = "", probing: str = "") -> Path:
    """An agent config: http probes only (so a stopped responder makes a cell red)."""
    nodes = ",\n  ".join(
        f'{{name = "{n}", cluster = "{c}", addresses = ["{a}"]}}' for n, c, a in PEERS
    )
    path = tmp / "agent.toml"
    path.write_text(f"""
[node]
name = "n1"
addresses = ["127.0.0.1"]

[probing]
interval = "1s"
timeout = "300ms"
confirm_probes = 2
{probing}

[responder]
listen = ["127.0.0.1:{port}"]

[probes.http]
port = {port}

[probes.icmp]
enabled = false

[outputs.api]
socket = "{tmp}/health.sock"

[outputs.web]
listen = "127.0.0.1:0"
{web}

[sources.static]
nodes = [
  {nodes},
]
""")
    return path


def wait_for_url(agent: AgentProc, timeout: float = 20.0) -> str:
    """The page's URL from the agent's log line ``web page: URL``."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(r"web page: (http://\S+/)", agent.stderr())
        if m:
            return m.group(1)
        if agent.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no web page URL in the log:\n{agent.stderr()}")
        time.sleep(0.05)


@contextmanager
def web_mesh(tmp: Path, web: str = "", probing: str = "") -> Iterator[WebMesh]:
    """Start the peers' responders and the agent; stop everything afterwards."""
    port = free_port()
    responders: dict[str, LoopbackResponder] = {}
    agent: AgentProc | None = None
    try:
        for name, _cluster, address in PEERS:
            responders[name] = LoopbackResponder(tmp / f"{name}.log", f"{address}:{port}")
        agent = AgentProc(web_config(tmp, port, web, probing))
        yield WebMesh(agent, wait_for_url(agent), responders)
    finally:
        if agent is not None:
            agent.stop()
        for r in responders.values():
            r.stop()


#: Chromium's switches for the tests: headless, and nothing that reaches the network by
#: itself (component updates, sync, first-run pages, background fetches).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@contextmanager
def chromium(tmp: Path, netns: str | None = None) -> Iterator[object]:
    """A Playwright browser context on Debian's chromium, with a fresh user-data dir.

    With ``netns``, the browser runs inside that network namespace (Playwright talks to it
    over a pipe, so it needs no network to be driven). Skips on a laptop without chromium
    or Playwright (fails under CI=true); never downloads a browser.
    """
    from tests.conftest import require, require_binary

    path = require_binary("chromium", "chromium")
    if netns is not None:
        wrapper = tmp / "chromium-in-netns"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {path} "$@"\n')
        wrapper.chmod(0o755)
        path = str(wrapper)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require("needs Playwright for Python (pip install -e '.[test]')")
        raise
    profile = tmp / "chromium-profile"
    profile.mkdir()
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=path, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1200, "height": 900}, timeout=30_000,
        )
        try:
            yield context
        finally:
            context.close()
