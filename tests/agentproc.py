"""Run a real ``healthmesh run`` agent in a subprocess and read its NDJSON snapshots."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, healthmesh_cmd


def free_port() -> int:
    """A TCP port free on every loopback address right now."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


class AgentProc:
    """``healthmesh run -c CONFIG -o json`` as a child process (optionally in a netns)."""

    def __init__(
        self,
        config: Path,
        *extra: str,
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.stderr_path = config.with_suffix(".stderr")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [*prefix, *healthmesh_cmd(), "run", "-c", str(config), "-o", "json", *extra],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self.docs: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.docs.put(json.loads(line))
            except ValueError:
                continue
        self.docs.put(None)

    def next_doc(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next snapshot document; AssertionError when none comes in time."""
        try:
            doc = self.docs.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no snapshot within {timeout}s; stderr:\n{self.stderr()}"
            ) from None
        if doc is None:
            raise AssertionError(f"agent exited ({self.proc.poll()}); stderr:\n{self.stderr()}")
        return doc

    def wait_for(self, predicate: Any, timeout: float = 15.0) -> dict[str, Any]:
        """The first snapshot for which ``predicate(doc)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("condition not reached in time; stderr:\n" + self.stderr())
            doc = self.next_doc(left)
            if predicate(doc):
                return doc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> tuple[int, float]:
        """Send ``sig``; return (exit code, seconds until exit)."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._stderr.close()
        return code, time.monotonic() - start

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def __enter__(self) -> AgentProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def node(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The node called ``name`` in a snapshot."""
    for n in doc["nodes"]:
        if n["name"] == name:
            return n
    raise KeyError(name)
