"""The exec output: one process per event, bounded in time, concurrency and queue length."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import deque
from typing import Any, ClassVar

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from healthmesh import AgentContext, ComponentSettings, Duration, Event, Output

EVENT_TYPES = ("path", "node", "component")
#: Bytes of a failed command's stderr kept for the log.
STDERR_KEEP = 2048


class ExecSettings(ComponentSettings):
    """``[outputs.exec]``."""

    #: The command and its arguments (no shell); the event is its stdin, as one JSON line.
    command: list[str] = msgspec.field(default_factory=list)
    #: A run that takes longer is killed.
    timeout: Duration = Duration(10.0)
    #: Commands running at once at most.
    concurrency: int = 4
    #: Events waiting at most; when full the oldest is dropped (and counted).
    queue: int = 1000
    types: list[str] = msgspec.field(default_factory=lambda: list(EVENT_TYPES))
    #: Extra environment variables for the command.
    env: dict[str, str] = msgspec.field(default_factory=dict)


class ExecOutput(Output):
    """Runs ``command`` once per event."""

    name: ClassVar[str] = "exec"
    Settings: ClassVar[type[ComponentSettings]] = ExecSettings

    def __init__(self, settings: ExecSettings, context: AgentContext) -> None:
        super().__init__(settings, context)
        self.queue: deque[Event] = deque()
        self.types = frozenset(settings.types)
        self.counts = {"ran": 0, "failed": 0, "timed_out": 0, "dropped": 0}
        self._wake = anyio.Event()

    @classmethod
    def validate_settings(cls, s: ExecSettings, config: Any) -> None:
        if not s.command:
            raise ValueError("command: the command to run is required, e.g. [\"/usr/local/bin/x\"]")
        if shutil.which(s.command[0]) is None:
            raise ValueError(f"command: {s.command[0]!r} is not an executable file or on PATH")
        if not 0 < s.timeout <= 3600:
            raise ValueError("timeout: must be between 0s and 1h")
        if not 1 <= s.concurrency <= 64:
            raise ValueError("concurrency: must be between 1 and 64")
        if not 1 <= s.queue <= 100_000:
            raise ValueError("queue: must be between 1 and 100000")
        for t in s.types:
            if t not in EVENT_TYPES:
                raise ValueError(f"types: {t!r} is not one of {', '.join(EVENT_TYPES)}")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(self.settings.concurrency):
                tg.start_soon(self._worker)
            task_status.started()

    async def events(self, batch: list[Event]) -> None:
        for ev in batch:
            if ev.type not in self.types:
                continue
            if len(self.queue) >= self.settings.queue:
                self.queue.popleft()
                self.counts["dropped"] += 1
            self.queue.append(ev)
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        return {"queued": len(self.queue), **self.counts}

    async def _worker(self) -> None:
        while True:
            if not self.queue:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            await self._run_one(self.queue.popleft())

    async def _run_one(self, ev: Event) -> None:
        s: ExecSettings = self.settings
        data = msgspec.json.encode(ev) + b"\n"
        env = {**os.environ, **s.env, "HEALTHMESH_EVENT_TYPE": ev.type,
               "HEALTHMESH_EVENT_TO": ev.to}
        try:
            proc = await anyio.open_process(s.command, stdin=subprocess.PIPE,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            env=env, start_new_session=True)
        except OSError as exc:
            self.counts["failed"] += 1
            logger.error("exec {}: cannot start: {}", s.command[0], exc)
            return
        err = bytearray()
        async with proc:
            with anyio.move_on_after(s.timeout) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_feed, proc, data)
                    tg.start_soon(_drain, proc, err)
                await proc.wait()
            if scope.cancelled_caught:
                self.counts["timed_out"] += 1
                _kill(proc.pid)
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await proc.wait()
                logger.warning("exec {}: killed after {:g}s (event seq {})", s.command[0],
                               s.timeout, ev.seq)
                return
        self.counts["ran"] += 1
        if proc.returncode != 0:
            self.counts["failed"] += 1
            text = bytes(err[:STDERR_KEEP]).decode(errors="replace").strip().splitlines()
            logger.warning("exec {}: exit {} (event seq {}){}", s.command[0], proc.returncode,
                           ev.seq, f": {text[-1]}" if text else "")


async def _feed(proc: Any, data: bytes) -> None:
    try:
        await proc.stdin.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # the command did not read its stdin
    finally:
        await proc.stdin.aclose()


async def _drain(proc: Any, keep: bytearray) -> None:
    async for chunk in proc.stderr:
        if len(keep) < STDERR_KEEP:
            keep.extend(chunk[: STDERR_KEEP - len(keep)])


def _kill(pid: int) -> None:
    """Kill the command and whatever it started (its own session)."""
    try:
        os.killpg(pid, 9)
    except OSError:
        pass
