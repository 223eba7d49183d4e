"""The 4240 responder for probe and responder tests: in the test process, or as its own process."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from healthmesh.plugins.http import Responder, ResponderSettings
from tests.conftest import ROOT, healthmesh_cmd


@asynccontextmanager
async def responder(*listen: str, **limits: object) -> AsyncIterator[Responder]:
    """Our responder on ``listen`` (port 0: a free port), with optional limits."""
    r = Responder(ResponderSettings(listen=list(listen), **limits))  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(5):
            await tg.start(r.run)
        yield r
        tg.cancel_scope.cancel()


def port_of(r: Responder, i: int = 0) -> int:
    """The port of the responder's ``i``-th listen address."""
    return int(r.addresses[i].rsplit(":", 1)[1])


class ResponderProcess:
    """``healthmesh responder`` in its own process on 127.0.0.1 and a free port.

    Its stderr goes to a file (read with ``log()``), so a chatty responder can never block
    on a full pipe and the whole log can be checked for tracebacks afterwards.
    """

    def __init__(self, log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [*healthmesh_cmd(), "responder", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.DEVNULL, stderr=self._log, cwd=ROOT,
        )
        deadline = time.monotonic() + 20
        while (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log())) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"responder did not start: {self.log()}")
            time.sleep(0.05)
        self.port = int(m.group(1))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, wait (bounded) and return the exit code."""
        self.proc.terminate()
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()
