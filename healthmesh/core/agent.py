"""Wire one agent: probes, sources, services, outputs and the scheduler in one task group."""

from __future__ import annotations

import asyncio
import functools
import gc
import signal
import time
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
from anyio.abc import TaskStatus
from loguru import logger

from healthmesh.core.checks import CheckRunner, build_entries
from healthmesh.core.components import (
    Component,
    Output,
    PeerSource,
    Probe,
    ProbeUnavailable,
    Service,
)
from healthmesh.core.config import Config
from healthmesh.core.events import EventLog, StateEvents, feed_output
from healthmesh.core.health import ComponentHealth
from healthmesh.core.isolation import ENTER_DEADLINE, IsolatedProbe, LoopWatchdog
from healthmesh.core.membership import Membership
from healthmesh.core.memory import release_free_memory
from healthmesh.core.mesh import assemble, row_from_snapshot
from healthmesh.core.model import Node, Snapshot
from healthmesh.core.plugins import PluginRegistry
from healthmesh.core.sampling import Ring
from healthmesh.core.scheduler import RoundInfo, Scheduler
from healthmesh.core.snapshot import SnapshotBuilder
from healthmesh.core.state import StateStore
from healthmesh.core.telemetry import Telemetry
from healthmesh.core.units import format_duration

#: Bound on clean-up work at shutdown, so SIGTERM ends the agent within 2 s.
SHUTDOWN_BOUND = 1.5
#: After a shutdown starts, the process ends within this many seconds whatever a plugin does
#: (the watchdog thread exits it when the clean shutdown has not finished by then).
HARD_EXIT_AFTER = 4.0
#: Signals that stop the agent cleanly. SIGHUP too: the agent does not reload its config,
#: and a SIGHUP's default action would leave the API socket and its lock behind.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Exit code of an agent that stops because a component keeps crashing (docs/architecture.md).
EXIT_COMPONENT_FAILED = 4
#: A crashed component is restarted after RESTART_FIRST s, doubling up to RESTART_MAX s; one
#: that crashes RESTART_LIMIT times within RESTART_WINDOW s stops the agent.
RESTART_FIRST = 0.25
RESTART_MAX = 5.0
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
#: Changes of path state are handed to outputs at most this often (or interval / 10), each
#: batch after this much settling time.
CHANGE_GAP = 0.1
CHANGE_SETTLE = 0.02


#: Probes starting later than this (p99 since the last check) make the scheduler ``degraded``.
SCHEDULER_LAG_LIMIT = 0.1
#: The scheduler's health is judged this often (or once per interval when that is longer).
SCHEDULER_CHECK_EVERY = 2.0


def _bound_text(bound: float | None) -> str:
    if bound is None:
        return "-"
    if bound == float("inf"):
        return "> 5s"
    return f"≤ {bound * 1000:g}ms" if bound < 1 else f"≤ {bound:g}s"


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
        # Sampled mesh (probing.observers > 0): the ring and the ids of the nodes probed.
        self._ring = Ring()
        self._probed: set[str] | None = None
        self.probes: dict[str, Probe] = {}
        self.sources: list[PeerSource] = []
        self.outputs: list[Output] = []
        self.services: list[Service] = []
        self.console: Output | None = None
        ev = config.core.events
        self.events = EventLog(self.local_node.id, ring=ev.ring, buffer=ev.buffer)
        self.health = ComponentHealth(on_change=self._component_changed)
        self.watchdog = LoopWatchdog()
        self._exit_code = 0
        self._stopping = False
        #: What a stop cancels: the whole run until the task group exists, then the group
        #: (so that outputs are still closed after it).
        self._scope: anyio.CancelScope | None = None
        self._build(console)
        self._transitions = StateEvents(
            self.events,
            self.probed_nodes,
            lambda node: self.membership.paths_of(node, host=p.host, endpoint=p.endpoint),
            self.store,
            lambda: self.probes,
        )
        self.scheduler = Scheduler(
            p,
            self.probes,
            self.store,
            seed=self.local_node.id,
            on_round=self._round_completed,
            on_change=self._state_changed,
            on_transition=self._transitions.path_changed,
        )
        self.checks = CheckRunner(
            build_entries(config.checks, registry.check_kinds, self, p.window),
            on_change=self._state_changed,
        )
        self.health.set("scheduler", "ok", "starting")
        self._lag_seen: list[int] | None = None
        self._skipped_seen = (0, 0)
        self._changed: anyio.Event | None = None
        #: Readers of other observers' rows, by the source that gave them (docs/mesh.md).
        self._rows: dict[str, Callable[[], dict[str, dict[str, Any]]]] = {}
        self._mesh_limiter: anyio.CapacityLimiter | None = None  # made on the loop
        self._indirect: dict[str, dict[str, Any]] = {}
        self._last_round: RoundInfo | None = None
        self._round_snapshot: Snapshot | None = None
        self._gc_frozen = False
        #: Re-renders only the nodes whose paths changed since the previous snapshot.
        self._snapshots = SnapshotBuilder()

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
                info = self.registry.infos.get(reg.plugin)
                # Kinds that do not come with healthmesh run on a loop of their own.
                self.probes[cls.name] = (
                    obj if info is not None and info.builtin
                    else IsolatedProbe(obj, self._probe_fault)
                )
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

    def _component_changed(self, name: str, old: str, new: str, message: str) -> None:
        """A component's state changed: a ``component`` event (docs/events.md)."""
        n = self.local_node
        self.events.emit(
            "component", node=n.name, cluster=n.cluster, from_=old, to=new,
            reason=message or ("started" if old == "absent" else new), component=name,
        )

    # -- AgentContext -------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The current state of every node, timestamped with the last completed round."""
        rnd = self._last_round
        return self._build_snapshot(None if rnd is None else rnd.started_wall)

    async def _snapshot_async(self) -> Snapshot:
        """``snapshot()``, yielding to other tasks while many nodes are re-rendered."""
        rnd = self._last_round
        args, kwargs = self._snapshot_inputs(None if rnd is None else rnd.started_wall)
        return await self._snapshots.build_async(*args, **kwargs)

    def _build_snapshot(self, timestamp: float | None) -> Snapshot:
        args, kwargs = self._snapshot_inputs(timestamp)
        return self._snapshots.build(*args, **kwargs)

    def _snapshot_inputs(
        self, timestamp: float | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """What ``SnapshotBuilder.build`` is called with, now."""
        rnd = self._last_round
        extra: dict[str, Any] = {
            "round": {
                "completed": self.scheduler.completed_rounds,
                "duration_s": None
                if rnd is None or rnd.duration is None
                else round(rnd.duration, 3),
            },
            "scheduler": self.scheduler.lateness(),
            "probe_kinds": sorted(self.probes),
            # Service checks, apart from nodes: they never change a node's state.
            "checks": self.checks.views(),
        }
        # Layer 1 (component states) when this agent reports them.
        components = getattr(self, "components", None)
        if callable(components):
            extra.setdefault("components", components())
        stats = {o.name: st for o in self.outputs if (st := o.stats()) is not None}
        if stats:
            extra["outputs"] = stats
        if self._probed is not None:
            extra["sampling"] = {
                "observers": self.config.probing.observers,
                "members": len(self._ring),
                "probed": len(self._probed),
                "always": list(self.config.probing.always),
            }
        return (
            (self.membership, self.store, sorted(self.probes), self.config.probing),
            {
                "timestamp": timestamp,
                "components": self.health.listing(),
                "extra": extra,
                "probed": self._probed,
            },
        )

    async def probe_round(self) -> Snapshot:
        """Probe every path now and return the fresh snapshot (timestamped now)."""
        await self.scheduler.probe_all()
        return self._build_snapshot(time.time())

    def plugins(self) -> list[dict[str, Any]]:
        return self.registry.listing()

    def components(self) -> list[dict[str, Any]]:
        """Every component's state: ``{name, state, message, since, restarts}``."""
        return self.health.listing()

    def local_row(self) -> dict[str, Any]:
        """This agent's row of the mesh matrix (core/mesh.py)."""
        return row_from_snapshot(self.snapshot().data)

    def publish_rows(
        self, source: str, rows: Callable[[], dict[str, dict[str, Any]]] | None
    ) -> None:
        """How to read other observers' rows from ``source`` (replacing; None: none)."""
        if rows is None:
            self._rows.pop(source, None)
        else:
            self._rows[source] = rows

    def mesh(self) -> dict[str, Any]:
        """The mesh matrix with its verdicts (docs/mesh.schema.json)."""
        return self._assemble(*self._mesh_inputs(), self._indirect)

    async def mesh_async(self) -> dict[str, Any]:
        """``mesh()``, with the heavy part (decoding rows, the N×N matrix, the verdicts)
        in a worker thread, one at a time: a large mesh never blocks the agent's loop (the
        responder, the probes). The local row and heartbeats are read on the loop."""
        inputs = self._mesh_inputs()
        if self._mesh_limiter is None:
            self._mesh_limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(
            self._assemble, *inputs, self._indirect, limiter=self._mesh_limiter
        )

    def publish_indirect(self, results: dict[str, dict[str, Any]]) -> None:
        """Indirect probe results by target (shown in the matrix and the evidence)."""
        self._indirect = dict(results)

    async def probe_node(self, node_id: str, timeout: float) -> dict[str, bool]:
        """Probe a member's host paths now with every kind (for indirect probes)."""
        node = next((n for n in self.membership.nodes() if n.id == node_id), None)
        if node is None:
            raise KeyError(node_id)
        paths = node.paths(host=True, endpoint=False)
        out: dict[str, bool] = {}

        async def one(kind: str, probe: Probe, path: Any) -> None:
            ok = False
            with anyio.move_on_after(timeout + 0.5):
                try:
                    ok = (await probe.probe(path, timeout)).ok
                except Exception:
                    ok = False
            out[kind] = out.get(kind, False) or ok

        async with anyio.create_task_group() as tg:
            for kind, probe in list(self.probes.items()):
                for path in paths:
                    if probe.supports(path):
                        tg.start_soon(one, kind, probe, path)
        return out

    def _mesh_inputs(self) -> tuple[dict[str, Any], dict[str, str], list[Any]]:
        heartbeats = {
            node.id: str(node.info.get("heartbeat", "unknown"))
            for node in self.membership.nodes()
        }
        if self._rows:
            # The local agent's heartbeat is its own: it is running.
            heartbeats[self.local_node.id] = "alive"
        return self.local_row(), heartbeats, list(self._rows.items())

    @staticmethod
    def _assemble(
        local: dict[str, Any],
        heartbeats: dict[str, str],
        readers: list[Any],
        indirect: dict[str, dict[str, Any]],
    ) -> dict[str, Any]:
        rows: dict[str, dict[str, Any]] = {}
        for source, read in readers:
            try:
                rows.update(read())
            except Exception as exc:  # a source's bug costs its rows, not the API
                logger.error("{}: reading mesh rows failed: {}", source, _describe(exc))
        return assemble(local, rows, heartbeats, local_only=not readers, indirect=indirect)

    def report(self, component: Component | str, state: str, message: str = "") -> None:
        """A component reports its own state ("ok", "degraded" or "failed")."""
        name = component if isinstance(component, str) else component.section_for()
        self.health.set(name, state, message)

    # -- faults -------------------------------------------------------------------------

    def _probe_fault(self, kind: str, reason: str) -> None:
        """An isolated kind misbehaves: switch it off (soon, on the loop), go on without it."""
        try:
            # Not now: the fault may be reported from inside the scheduler's set_paths.
            asyncio.get_running_loop().call_soon(self._disable_kind, kind, reason)
        except RuntimeError:  # no loop (not running yet): nothing is probing it
            self._disable_kind(kind, reason)

    def _disable_kind(self, kind: str, reason: str) -> None:
        if kind not in self.probes:
            return
        logger.error("probe kind {!r} is switched off: {}", kind, reason)
        self.health.set(f"probes.{kind}", "failed", f"switched off: {reason}")
        self.scheduler.disable_kind(kind)
        self._membership_changed()

    # -- wiring -------------------------------------------------------------------------

    def probed_nodes(self) -> list[Node]:
        """The nodes this agent probes: all of them, or in a sampled mesh its assignment."""
        nodes = self.membership.nodes()
        if self._probed is None:
            return nodes
        return [n for n in nodes if n.id in self._probed]

    def _assign(self) -> None:
        """Sampled mesh: this node, its ring targets and the ``always`` list (core/sampling.py)."""
        p = self.config.probing
        if p.observers <= 0:
            self._probed = None
            return
        nodes = self.membership.nodes()
        self._ring.rebuild(n.id for n in nodes)
        local = self.local_node.id
        probed = {local, *self._ring.targets(local, p.observers)}
        if p.always:
            always = set(p.always)
            probed.update(n.id for n in nodes if n.name in always or n.id in always)
        self._probed = probed

    def _membership_changed(self) -> None:
        p = self.config.probing
        self._assign()
        paths = [
            path
            for node in self.probed_nodes()
            for path in self.membership.paths_of(node, host=p.host, endpoint=p.endpoint)
        ]
        self.scheduler.set_paths(paths)
        self._transitions.membership_changed()
        # Live outputs (the API) show added and removed nodes now, not at the end of a round.
        self._state_changed()

    async def _round_completed(self, rnd: RoundInfo) -> None:
        self._last_round = rnd
        if not self._gc_frozen:
            self._gc_frozen = True
            _freeze_long_lived()
        self.telemetry.round_finished(rnd.duration)
        logger.debug("round {} finished in {:.3f}s", rnd.number, rnd.duration or 0.0)
        await self._hand_to_outputs("round_completed", await self._snapshot_async())
        # The round's renderings are done and the previous ones freed: hand the C heap's
        # free pages back (≈ 1 ms, in a thread; docs/benchmarks.md, issue 17 second pass).
        await anyio.to_thread.run_sync(release_free_memory)

    async def _watch_scheduler(self) -> None:
        """Judge the scheduler's own health every few seconds (not per round: a scheduler
        that cannot keep up finishes no rounds)."""
        every = max(SCHEDULER_CHECK_EVERY, self.config.probing.interval)
        while True:
            await anyio.sleep(every)
            self._check_scheduler()

    def _check_scheduler(self) -> None:
        """How late probes started since the last check (p99), whether rounds keep the
        interval, whether work was skipped: the ``scheduler`` component's state."""
        lag = self.telemetry.lag
        p99 = lag.quantile_bound(0.99, self._lag_seen)
        self._lag_seen = list(lag.counts)
        sched = self.scheduler
        skipped = sched.skipped - self._skipped_seen[0]
        skipped_rounds = sched.skipped_rounds - self._skipped_seen[1]
        self._skipped_seen = (sched.skipped, sched.skipped_rounds)
        p = self.config.probing
        rnd = sched.last_round
        parts = [f"lag p99 {_bound_text(p99)}"]
        if rnd is not None and rnd.duration is not None:
            parts.append(f"round {format_duration(round(rnd.duration, 3))}")
        problems = []
        if p99 is not None and p99 > SCHEDULER_LAG_LIMIT:
            problems.append(f"probes start late (p99 {_bound_text(p99)})")
        bound = sched.round_duration_bound + 1.0
        if rnd is not None and rnd.duration is not None and rnd.duration > bound:
            problems.append(
                f"a round took {rnd.duration:.1f}s for a {format_duration(p.interval)} interval"
            )
        if skipped or skipped_rounds:
            problems.append(f"{skipped} probes and {skipped_rounds} rounds skipped: the "
                            "interval cannot be kept (too many peers, or the loop is blocked)")
        if problems:
            self.health.set("scheduler", "degraded", "; ".join(problems))
        else:
            self.health.set("scheduler", "ok", ", ".join(parts))

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
            await self._hand_to_outputs("state_changed", await self._snapshot_async())
            await anyio.sleep(gap - CHANGE_SETTLE)

    async def run(self) -> int:
        """Run until SIGINT/SIGTERM/SIGHUP (or one round with ``once``); return the exit code.

        The code is 0, or with ``once`` 1 when a node is unreachable, or
        ``EXIT_COMPONENT_FAILED`` when a component kept crashing.
        """
        self.watchdog.start()
        self._scope = anyio.CancelScope()
        previous = self._install_signals()
        code = 0
        try:
            with self._scope:
                code = await self._run()
            return self._exit_code or code
        finally:
            _restore_signals(previous)
            if not self._stopping:
                self.watchdog.stop()

    async def _enter_probes(self, stack: AsyncExitStack) -> None:
        """Enter every probe kind; one that cannot start is switched off with the reason."""
        loop = asyncio.get_running_loop()
        for kind, probe in list(self.probes.items()):
            name = f"probes.{kind}"
            try:
                with anyio.fail_after(ENTER_DEADLINE + 1.0):
                    await stack.enter_async_context(probe)
            except ProbeUnavailable as exc:
                logger.warning("probe kind {!r} is switched off: {}", kind, exc)
                self.health.set(name, "degraded", f"switched off: {exc}")
                del self.probes[kind]
                continue
            except Exception as exc:  # a plugin's bug must not stop the agent
                text = _describe(exc)
                logger.error("probe kind {!r} failed to start and is switched off: {}", kind,
                             text)
                self.health.set(name, "failed", f"failed to start: {text}")
                del self.probes[kind]
                continue
            self.health.set(name, "ok")
            if isinstance(probe, IsolatedProbe):
                self.watchdog.watch(probe, loop)

    async def _run(self) -> int:
        self.membership.on_change = lambda: None
        async with AsyncExitStack() as stack:
            await self._enter_probes(stack)
            if not self.probes:
                raise StartupError("no probe kind is available; see the warnings above")
            code = 0
            async with anyio.create_task_group() as tg:
                if self._stopping:
                    tg.cancel_scope.cancel()
                self._scope = tg.cancel_scope
                tg.start_soon(self.watchdog.heartbeat)
                for svc in self.services:
                    await tg.start(self._start, svc.section_for(), svc.run)
                if not self.once:
                    for out in self.outputs:
                        await tg.start(self._start, out.section_for(), out.run)
                    tg.start_soon(self._publish_changes)
                    tg.start_soon(self._watch_scheduler)
                    # Checks run in their own tasks: started, never waited for.
                    await tg.start(self.checks.run)
                    for out in self.outputs:
                        if type(out).events is not Output.events:  # only outputs that want them
                            tg.start_soon(functools.partial(
                                feed_output, self.events, out, timeout=self.config.probing.interval
                            ))
                for src in self.sources:
                    feed = self.membership.feed(src.name)
                    await tg.start(self._start_source, src, feed)
                self.membership.on_change = self._membership_changed
                self._membership_changed()
                await tg.start(functools.partial(self.scheduler.run, rounds=not self.once))
                if self.once:
                    # One pass of the checks alongside the round (their results go in the
                    # snapshot; the exit code is the nodes' alone).
                    async with anyio.create_task_group() as once_tg:
                        await once_tg.start(functools.partial(self.checks.run, once=True))
                        await self.probe_round()
                    snap = self._build_snapshot(time.time())
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

    def _install_signals(self) -> dict[int, Any]:
        """Stop cleanly on STOP_SIGNALS; arm the watchdog so the process ends in any case.

        Plain ``signal.signal`` handlers, not the loop's: Python runs them in the main
        thread even while a plugin blocks the loop, so the hard-exit deadline is armed
        whatever the loop is doing.
        """
        loop = asyncio.get_running_loop()

        def handler(signum: int, frame: object) -> None:
            if self._stopping:  # a second signal: the operator insists
                self.watchdog.arm(0.0, self._exit_code)
                return
            self._stopping = True
            self.watchdog.arm(HARD_EXIT_AFTER, self._exit_code)
            try:
                loop.call_soon_threadsafe(self._stop, signal.Signals(signum).name)
            except RuntimeError:  # the loop has closed: the process is ending anyway
                pass

        previous: dict[int, Any] = {}
        try:
            for sig in STOP_SIGNALS:
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (an agent run inside a test): no handlers
            _restore_signals(previous)
            return {}
        return previous

    def _stop(self, why: str) -> None:
        logger.info("received {}, shutting down", why)
        if self._scope is not None:
            self._scope.cancel()

    def _give_up(self, name: str) -> None:
        """A component cannot be restarted: stop the agent with EXIT_COMPONENT_FAILED."""
        self._exit_code = EXIT_COMPONENT_FAILED
        self._stopping = True
        self.watchdog.arm(HARD_EXIT_AFTER, EXIT_COMPONENT_FAILED)
        if self._scope is not None:
            self._scope.cancel()

    async def _start(self, name: str, fn: Any, *, task_status: TaskStatus[None]) -> None:
        """Run ``fn`` (a component's ``run``), restarting it with backoff when it crashes.

        A failure before its first ``started()`` is a start-up error (exit 2). After that,
        a crash is logged and the component restarted after RESTART_FIRST s, doubling up
        to RESTART_MAX s; RESTART_LIMIT crashes within RESTART_WINDOW s stop the agent with
        EXIT_COMPONENT_FAILED, so that systemd or Kubernetes restart it.
        """
        first = True
        crashes: deque[float] = deque()
        delay = RESTART_FIRST

        def on_started() -> None:
            nonlocal first
            # Keep what the component said about itself while starting ("listening on ...").
            cur = self.health.get(name)
            keep = cur is not None and cur.state == "ok"
            self.health.set(name, "ok", cur.message if keep and cur is not None else "")
            if first:
                first = False
                task_status.started()

        while True:
            status = _Started(on_started)
            try:
                await fn(task_status=status)
                if first:
                    first = False
                    task_status.started()
                logger.debug("{} finished", name)
                return
            except (StartupError, OSError) as exc:
                error = str(exc)
            except Exception as exc:
                error = _describe(exc)
                if not first:
                    logger.opt(exception=exc).debug("{} crashed", name)
            if first:
                raise StartupError(f"{name}: {error}") from None
            now = time.monotonic()
            if status.up_at is not None and now - status.up_at > RESTART_WINDOW:
                delay = RESTART_FIRST  # it ran well for a while: start the backoff afresh
            crashes.append(now)
            while crashes and now - crashes[0] > RESTART_WINDOW:
                crashes.popleft()
            if len(crashes) >= RESTART_LIMIT:
                msg = (f"crashed {len(crashes)} times within {RESTART_WINDOW:g}s, "
                       f"last: {error}")
                self.health.set(name, "failed", msg)
                logger.error("{} {}; stopping the agent (exit code {})", name, msg,
                             EXIT_COMPONENT_FAILED)
                self._give_up(name)
                return
            self.health.set(name, "degraded", f"crashed: {error}; restarting in {delay:g}s")
            logger.error("{} crashed: {}; restarting in {:g}s", name, error, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)
            self.health.restarted(name)

    async def _start_source(
        self, src: PeerSource, feed: Any, *, task_status: TaskStatus[None]
    ) -> None:
        async def run(*, task_status: TaskStatus[None]) -> None:
            await src.run(feed, task_status=task_status)

        await self._start(src.section_for(), run, task_status=task_status)


class _Started:
    """The ``task_status`` a component gets: its first ``started()`` runs ``on_started``."""

    def __init__(self, on_started: Any) -> None:
        self.up_at: float | None = None
        self._on_started = on_started

    def started(self, value: object = None) -> None:
        if self.up_at is None:
            self.up_at = time.monotonic()
            self._on_started()


def _freeze_long_lived() -> None:
    """Move every object alive now out of the cyclic collector's reach (``gc.freeze``).

    Called once, after the first round: the slots, path states, nodes and plugins are built
    and live as long as the agent. A full collection would otherwise walk all of them —
    260,000 objects and 150–300 ms of held event loop at 5,000 peers, seconds on a loaded
    machine, long enough for every probe in flight to time out. Frozen objects that go are
    still freed by reference counting (a path's state, a node: no cycles); only a cycle
    among them would stay, and what the agent builds at start lives as long as it does.
    Objects made later are collected as usual.
    """
    gc.collect()
    gc.freeze()


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message``, for one-line logs and component states."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        try:
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        except (ValueError, TypeError):
            pass
