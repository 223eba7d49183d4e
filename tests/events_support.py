"""Helpers for the event tests: a peer responder to stop and start, an event stream reader.

Holds no tests itself.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from tests.conftest import ROOT, healthmesh_cmd

EVENT_SCHEMA = ROOT / "docs" / "event.schema.json"


def event_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(EVENT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


class Responder:
    """``healthmesh responder`` on one loopback address: a peer that can go down and up."""

    def __init__(self, address: str, port: int, log: Path) -> None:
        self.address, self.port, self.log_path = address, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, within: float = 15.0) -> Responder:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*healthmesh_cmd(), "responder", "-l", f"{self.address}:{self.port}"],
                stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
            )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{self.address}:{self.port}/hello",
                             timeout=0.5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"responder exited: {self.log_path.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"responder did not answer within {within}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class StreamReader:
    """Reads an NDJSON stream of /v1/events in a thread; lines land in a queue."""

    def __init__(self, socket_path: str, url: str) -> None:
        self.items: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.status: int | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(socket_path, url), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the stream did not start within 10s"

    def _run(self, socket_path: str, url: str) -> None:
        transport = httpx.HTTPTransport(uds=socket_path)
        try:
            with httpx.Client(transport=transport, base_url="http://localhost",
                              timeout=httpx.Timeout(10.0, read=60.0)) as c, \
                    c.stream("GET", url) as resp:
                self.status = resp.status_code
                self._ready.set()
                for line in resp.iter_lines():
                    if self._stop.is_set():
                        break
                    if line:
                        self.items.put(json.loads(line))
        except httpx.HTTPError:
            pass
        finally:
            self._ready.set()
            self.items.put(None)

    def next(self, timeout: float) -> dict[str, Any]:
        try:
            item = self.items.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s") from None
        if item is None:
            raise AssertionError("the stream ended")
        return item

    def wait_for(self, predicate: Any, timeout: float) -> list[dict[str, Any]]:
        """Lines read until one satisfies ``predicate`` (included); AssertionError on timeout."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"condition not met within {timeout}s; saw {seen}")
            item = self.next(left)
            seen.append(item)
            if predicate(item):
                return seen

    def close(self) -> None:
        self._stop.set()


def ring(socket_path: str, query: str = "since=0&follow=false") -> list[dict[str, Any]]:
    """Every line of a non-following /v1/events request."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path),
                      base_url="http://localhost", timeout=10.0) as c:
        resp = c.get(f"/v1/events?{query}")
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in resp.text.splitlines() if line]


def wait_ring(socket_path: str, predicate: Any, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The ring once some event in it satisfies ``predicate``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = ring(socket_path)
        if any(predicate(e) for e in events):
            return events
        time.sleep(0.1)
    raise AssertionError(f"no such event within {timeout}s: {ring(socket_path)}")


def is_change(ev: dict[str, Any], node: str, to: str, *, path: str | None = None,
              frm: str | None = None) -> bool:
    """``ev`` is a change of ``node`` (its ``path``, or the node itself) to ``to``."""
    return (ev.get("node") == node and ev.get("to") == to and ev.get("path") == path
            and (frm is None or ev.get("from") == frm))


def fast_agent_config(sock: Path | str, port: int, rest: str) -> str:
    """An HTTP-only agent on loopback probing every 500 ms (confirmed within ~40 ms) with an
    API socket, so state changes come fast; ``rest`` adds its peer source and outputs."""
    return f"""
[node]
name = "me"
addresses = ["127.0.0.1"]
[probing]
interval = "500ms"
timeout = "300ms"
confirm_probes = 2
confirm_spacing = "20ms"
[plugins]
disable = ["icmp"]
[responder]
listen = ["127.0.0.1:{port}"]
[probes.http]
port = {port}
[outputs.api]
socket = "{sock}"
{rest}"""

