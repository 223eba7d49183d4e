"""Wire one agent: probes, sources, services, outputs and the scheduler in one task group."""

from __future__ import annotations

import functools
import signal
import time
from contextlib import AsyncExitStack
from typing import Any

import anyio
from anyio.abc import TaskStatus
from loguru import logger

from healthmesh.core.components import Output, PeerSource, Probe, ProbeUnavailable, Service
from healthmesh.core.config import Config
from healthmesh.core.membership import Membership
from healthmesh.core.model import Node, Snapshot
from healthmesh.core.plugins import PluginRegistry
from healthmesh.core.scheduler import RoundInfo, Scheduler
from healthmesh.core.snapshot import build_snapshot
from healthmesh.core.state import StateStore
from healthmesh.core.telemetry import Telemetry

#: Bound on clean-up work at shutdown, so SIGTERM ends the agent within 2 s.
SHUTDOWN_BOUND = 1.5
#: Changes of path state are handed to outputs at most this often (or interval / 10), each
#: batch after this much settling time.
CHANGE_GAP = 0.1
CHANGE_SETTLE = 0.02


class StartupError(Exception):
    """The agent cannot start (a port in use, a socket path taken): one line for the operator."""


class Agent:
    """One healthmesh agent (implements ``AgentContext`` for its components)."""

    def __init__(
        self,
        config: Config,
        registry: PluginRegistry,
        *,
        once: bool = False,
        console: str | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.once = once
        self.started_at = time.time()
        n = config.node
        self.local_node = Node(
            name=n.name,
            cluster=n.cluster,
            addresses=tuple(n.addresses),
            health_addresses=tuple(n.health_addresses),
            labels=dict(n.labels),
        )
        p = config.probing
        self.telemetry = Telemetry(p.timeout)  # counters for the metrics output
        self.store = StateStore(p.failure_threshold, p.window, self.telemetry)
        self.membership = Membership(self.local_node, on_change=self._membership_changed)
        self.telemetry.primary_of = self.membership.is_primary
        self.probes: dict[str, Probe] = {}
        self.sources: list[PeerSource] = []
        self.outputs: list[Output] = []
        self.services: list[Service] = []
        self.console: Output | None = None
        self._build(console)
        self.scheduler = Scheduler(
            p,
            self.probes,
            self.store,
            seed=self.local_node.id,
            on_round=self._round_completed,
            on_change=self._state_changed,
        )
        self._changed: anyio.Event | None = None
        self._last_round: RoundInfo | None = None
        self._round_snapshot: Snapshot | None = None

    def _build(self, console: str | None) -> None:
        for section, settings in self.config.components.items():
            reg = self.registry.components[section]
            cls = reg.cls
            if issubclass(cls, Output) and (
                self.once or (cls.console and getattr(settings, "path", "-") == "-")
            ):
                # Console outputs render on stdout only when chosen with -o; a configured
                # one with a file path runs as well. --once runs no outputs but the console.
                continue
            obj = cls(settings, self)
            if isinstance(obj, Probe):
                self.probes[cls.name] = obj
            elif isinstance(obj, PeerSource):
                self.sources.append(obj)
            elif isinstance(obj, Output):
                self.outputs.append(obj)
            elif isinstance(obj, Service):
                if self.once and not cls.run_once:
                    continue
                self.services.append(obj)
        if console is not None:
            section = f"outputs.{console}"
            reg = self.registry.components.get(section)
            if reg is None or not issubclass(reg.cls, Output) or not reg.cls.console:
                raise StartupError(f"-o {console}: no console output named {console!r}")
            settings = self.config.components.get(section)
            if settings is None:
                from healthmesh.core.config import convert

                settings = convert({}, reg.cls.Settings, section)
            self.console = reg.cls(settings, self)
            self.console.to_console = True
            self.outputs.append(self.console)

    # -- AgentContext -------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The current state of every node, timestamped with the last completed round."""
        rnd = self._last_round
        return self._build_snapshot(None if rnd is None else rnd.started_wall)

    def _build_snapshot(self, timestamp: float | None) -> Snapshot:
        rnd = self._last_round
        extra: dict[str, Any] = {
            "round": {
                "completed": self.scheduler.completed_rounds,
                "duration_s": None
                if rnd is None or rnd.duration is None
                else round(rnd.duration, 3),
            },
            "probe_kinds": sorted(self.probes),
        }
        return build_snapshot(
            self.membership,
            self.store,
            sorted(self.probes),
            self.config.probing,
            timestamp=timestamp,
            extra=extra,
        )

    async def probe_round(self) -> Snapshot:
        """Probe every path now and return the fresh snapshot (timestamped now)."""
        await self.scheduler.probe_all()
        return self._build_snapshot(time.time())

    def plugins(self) -> list[dict[str, Any]]:
        return self.registry.listing()

    # -- wiring -------------------------------------------------------------------------

    def _membership_changed(self) -> None:
        p = self.config.probing
        paths = [
            path
            for node in self.membership.nodes()
            for path in self.membership.paths_of(node, host=p.host, endpoint=p.endpoint)
        ]
        self.scheduler.set_paths(paths)
        # Live outputs (the API) show added and removed nodes now, not at the end of a round.
        self._state_changed()

    async def _round_completed(self, rnd: RoundInfo) -> None:
        self._last_round = rnd
        self.telemetry.round_finished(rnd.duration)
        logger.debug("round {} finished in {:.3f}s", rnd.number, rnd.duration or 0.0)
        await self._hand_to_outputs("round_completed", self.snapshot())

    async def _hand_to_outputs(self, method: str, snap: Snapshot) -> None:
        """Call ``method(snap)`` on every output; a slow or failing one does not stop the rest."""
        for out in self.outputs:
            try:
                with anyio.move_on_after(self.config.probing.interval):
                    await getattr(out, method)(snap)
            except Exception as exc:
                logger.error("output {} failed: {}: {}", out.name, type(exc).__name__, exc)

    def _state_changed(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _publish_changes(self) -> None:
        """Hand the outputs a snapshot soon after paths change state (a burst at once)."""
        gap = max(CHANGE_GAP, self.config.probing.interval / 10)
        while True:
            self._changed = anyio.Event()
            await self._changed.wait()
            await anyio.sleep(CHANGE_SETTLE)  # one snapshot for a burst of changes
            await self._hand_to_outputs("state_changed", self.snapshot())
            await anyio.sleep(gap - CHANGE_SETTLE)

    async def run(self) -> int:
        """Run until SIGINT/SIGTERM (or one round with ``once``); return the exit code."""
        self.membership.on_change = lambda: None
        async with AsyncExitStack() as stack:
            for kind, probe in list(self.probes.items()):
                try:
                    await stack.enter_async_context(probe)
                except ProbeUnavailable as exc:
                    logger.warning("probe kind {!r} is switched off: {}", kind, exc)
                    del self.probes[kind]
            if not self.probes:
                raise StartupError("no probe kind is available; see the warnings above")
            code = 0
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_signals, tg.cancel_scope)
                for svc in self.services:
                    await tg.start(self._start, svc.name, svc.run)
                if not self.once:
                    for out in self.outputs:
                        await tg.start(self._start, out.name, out.run)
                    tg.start_soon(self._publish_changes)
                for src in self.sources:
                    feed = self.membership.feed(src.name)
                    await tg.start(self._start_source, src, feed)
                self.membership.on_change = self._membership_changed
                self._membership_changed()
                await tg.start(functools.partial(self.scheduler.run, rounds=not self.once))
                if self.once:
                    snap = await self.probe_round()
                    self._round_snapshot = snap
                    if self.console is not None:
                        await self.console.close(snap)
                    code = 0 if snap.all_reachable else 1
                    tg.cancel_scope.cancel()
            if not self.once:
                await self._close_outputs()
            return code

    async def _close_outputs(self) -> None:
        snap = self.snapshot()
        with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_BOUND):
            for out in self.outputs:
                try:
                    await out.close(snap)
                except Exception as exc:
                    logger.error("output {} failed to close: {}", out.name, exc)

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logger.info("received {}, shutting down", signal.Signals(signum).name)
                scope.cancel()
                return

    async def _start(self, name: str, fn: Any, *, task_status: TaskStatus[None]) -> None:
        started = False

        class _Status:
            def started(self, value: object = None) -> None:
                nonlocal started
                started = True
                task_status.started()

        try:
            await fn(task_status=_Status())
        except (StartupError, OSError) as exc:
            if not started:
                raise StartupError(f"{name}: {exc}") from None
            logger.error("{} stopped: {}", name, exc)
        except Exception as exc:
            if not started:
                raise StartupError(f"{name}: {type(exc).__name__}: {exc}") from None
            logger.opt(exception=exc).error("{} stopped: {}: {}", name, type(exc).__name__, exc)
        if not started:
            task_status.started()

    async def _start_source(
        self, src: PeerSource, feed: Any, *, task_status: TaskStatus[None]
    ) -> None:
        async def run(*, task_status: TaskStatus[None]) -> None:
            await src.run(feed, task_status=task_status)

        await self._start(f"sources.{src.name}", run, task_status=task_status)
