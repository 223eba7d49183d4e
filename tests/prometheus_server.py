"""A real Prometheus (Debian's package) for tests: generated config, loopback or netns, PromQL.

``PrometheusServer`` starts ``prometheus`` with a fast scrape interval on a free port, inside
a network namespace when asked (so it can scrape agents that live in test namespaces), and
answers PromQL queries through Prometheus' HTTP API. A socket into the namespace is opened
by a short-lived thread that joins it (``setns`` changes only the calling thread).
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.agentproc import free_port

CLONE_NEWNET = 0x40000000


def connect(
    host: str, port: int, *, netns: str | None = None, timeout: float = 5.0
) -> socket.socket:
    """A TCP connection to ``host:port``, made from inside ``netns`` when given."""
    if netns is None:
        return socket.create_connection((host, port), timeout=timeout)
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["sock"] = socket.create_connection((host, port), timeout=timeout)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout + 5)
    if "error" in box:
        raise box["error"]
    if "sock" not in box:
        raise TimeoutError(f"no connection to {host}:{port} in {netns}")
    return box["sock"]


def http_get(
    host: str, port: int, target: str, *, netns: str | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """``GET target`` on ``host:port`` (from inside ``netns``): (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = connect(host, port, netns=netns, timeout=timeout)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class PrometheusServer:
    """``prometheus`` scraping ``targets`` every ``interval`` seconds; a context manager."""

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        *,
        netns: str | None = None,
        interval: float = 1.0,
        rule_files: Sequence[Path] = (),
        job: str = "healthmesh",
    ) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus (apt-get install prometheus)")
        self.binary = binary
        self.dir = workdir
        self.netns = netns
        self.port = free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "prometheus.yml"
        config = {
            "global": {
                # Prometheus durations are whole units: milliseconds.
                "scrape_interval": f"{round(interval * 1000)}ms",
                "scrape_timeout": f"{round(interval * 800)}ms",
                "evaluation_interval": f"{round(interval * 1000)}ms",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        self.config.write_text(json.dumps(config, indent=1))  # JSON is YAML
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "prometheus.log"

    def __enter__(self) -> PrometheusServer:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    *prefix,
                    self.binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_ready(30.0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def _get(self, target: str) -> tuple[int, bytes]:
        return http_get("127.0.0.1", self.port, target, netns=self.netns)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.logs()}")
            try:
                if self._get("/-/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready in {timeout}s:\n{self.logs()}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector of ``promql`` now: ``[{"metric": {...}, "value": [t, "v"]}]``."""
        status, body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        doc = json.loads(body)
        if status != 200 or doc.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed ({status}): {body[:500]!r}")
        return doc["data"]["result"]

    def values(self, promql: str, by: str) -> dict[str, float]:
        """``{label value of by: sample value}`` of an instant query."""
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(promql)}

    def wait_values(
        self, promql: str, by: str, want: dict[str, float], timeout: float = 30.0
    ) -> dict[str, float]:
        """Poll until ``values(promql, by) == want``; AssertionError with the last value."""
        deadline = time.monotonic() + timeout
        got: dict[str, float] = {}
        while time.monotonic() < deadline:
            got = self.values(promql, by)
            if got == want:
                return got
            time.sleep(0.3)
        raise AssertionError(f"{promql}: wanted {want}, last {got}\n{self.logs()}")
