"""Base classes of what plugins register: probe kinds, peer sources, outputs and services."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import anyio
from anyio.abc import TaskStatus

from healthmesh.core.config import Duration, Settings
from healthmesh.core.model import Node, Path, ProbeResult, Snapshot

if TYPE_CHECKING:
    from healthmesh.core.config import Config
    from healthmesh.core.events import Event, EventLog
    from healthmesh.core.telemetry import Telemetry


class ComponentSettings(Settings):
    """Settings every component section has: ``enabled``."""

    enabled: bool = True


class AgentContext(Protocol):
    """What a component may ask of the agent that runs it."""

    config: Config
    local_node: Node
    started_at: float  # wall clock
    once: bool  # True under ``run --once``: one round, no long-running services
    events: EventLog  # state-change events: ``events.follow(after_seq)``, ``events.seq``
    telemetry: Telemetry  # counters of results, state changes, lag, rounds, responses

    def snapshot(self) -> Snapshot:
        """The current state of every node, as a snapshot."""
        ...

    async def probe_round(self) -> Snapshot:
        """Probe every path now, wait for the results (bounded by the timeout), return them."""
        ...

    def plugins(self) -> list[dict[str, Any]]:
        """The plugin listing, as ``healthmesh plugins --json`` prints it."""
        ...

    def components(self) -> list[dict[str, Any]]:
        """Every component's state, sorted by name: dicts of exactly ``name`` (the config
        section, e.g. ``"responder"``, ``"outputs.api"``, ``"probes.icmp"``), ``state``
        (``"ok"``, ``"degraded"`` or ``"failed"``), ``message``, ``since`` (RFC 3339, the
        last change of state) and ``restarts``."""
        ...

    def mesh(self) -> dict[str, Any]:
        """The mesh matrix and its verdicts (docs/mesh.schema.json): this agent's row and the
        rows handed in with ``publish_rows``; ``local_only`` when no source shares rows."""
        ...

    def local_row(self) -> dict[str, Any]:
        """This agent's own row: ``{"observer": "c/n", "timestamp": epoch, "cells":
        {"c/t": {"state", "kinds": {kind: state}, "rtt_ms", "loss_pct", "since"}}}``
        (``since`` in epoch seconds or None); what a rows source publishes for others."""
        ...

    def publish_rows(
        self, source: str, rows: Callable[[], dict[str, dict[str, Any]]] | None
    ) -> None:
        """Give the agent a way to read other observers' rows: ``rows()`` returns them by
        observer id, each shaped as ``local_row()`` returns it and already validated; the
        agent calls it each time the matrix is built (so a source may decode lazily).
        Replaces what ``source`` gave before; None withdraws it. From then on the matrix
        is no longer local-only."""
        ...

    async def probe_node(self, node_id: str, timeout: float) -> dict[str, bool]:
        """Probe a member's host paths now with every kind: ``{kind: reached by some path}``;
        KeyError when ``node_id`` is not a member. (For indirect probes, docs/mesh.md.)"""
        ...

    def publish_indirect(self, results: dict[str, dict[str, Any]]) -> None:
        """Indirect probe results, by target: ``{"asked": [ids], "reached": [ids],
        "failed": [ids]}``; shown in the matrix and in the verdicts' evidence."""
        ...

    def report(self, component: Component | str, state: str, message: str = "") -> None:
        """Report a component's own state: ``context.report(self, "degraded", "why")``.

        ``state`` is ``"ok"``, ``"degraded"`` or ``"failed"`` (ValueError otherwise); the
        agent also sets it: ``ok`` when the component has started, ``degraded`` while it is
        being restarted after a crash, ``failed`` when it cannot be restarted.
        """
        ...


class Component:
    """Common shape: a name, a config section, a Settings class and a constructor."""

    name: ClassVar[str]
    section: ClassVar[str]
    Settings: ClassVar[type[ComponentSettings]] = ComponentSettings
    #: Used when the config has no section for this component.
    default_enabled: ClassVar[bool] = False

    def __init__(self, settings: Any, context: AgentContext) -> None:
        self.settings = settings
        self.context = context

    @classmethod
    def section_for(cls) -> str:
        """The dotted config section of this component."""
        return getattr(cls, "section", None) or f"{cls.category}.{cls.name}"

    category: ClassVar[str] = ""


class ProbeUnavailable(Exception):
    """Raised by ``Probe.__aenter__`` when the kind cannot run here; the agent goes on without it.

    The message should say why and how to fix it.
    """


class Probe(Component):
    """A probe kind. One instance per agent; ``probe`` is called concurrently for many paths.

    Use ``async with`` for what the kind owns (a socket, a client); raise ``ProbeUnavailable``
    from ``__aenter__`` when it cannot work here.
    """

    category: ClassVar[str] = "probes"

    async def __aenter__(self) -> Probe:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def supports(self, path: Path) -> bool:
        """Whether this kind probes ``path`` (all paths by default)."""
        return True

    async def probe(self, path: Path, timeout: float) -> ProbeResult:
        """Probe one path once and return the result; ``timeout`` is in seconds.

        The scheduler also cancels the call shortly after ``timeout``; an exception is
        turned into a failed result with the exception's text.
        """
        raise NotImplementedError

    #: True when ``probe_many`` is cheaper than one ``probe`` task per path: the scheduler
    #: then hands the kind every path that falls due in one tick in a single call.
    batched: ClassVar[bool] = False

    async def probe_many(self, paths: Sequence[Path], timeout: float) -> list[ProbeResult]:
        """Probe many paths at once; results in the order of ``paths``.

        Used only when ``batched`` is true. The default runs ``probe`` concurrently.
        """
        results: list[ProbeResult] = [ProbeResult.failure("not probed")] * len(paths)

        async def one(i: int, path: Path) -> None:
            results[i] = await self.probe(path, timeout)

        async with anyio.create_task_group() as tg:
            for i, path in enumerate(paths):
                tg.start_soon(one, i, path)
        return results


class SourceFeed(Protocol):
    """How a peer source hands its nodes to the agent."""

    def replace(self, nodes: Iterable[Node]) -> None:
        """This source's complete node set from now on (added, changed and removed at once)."""
        ...

    def mark_stale(self, reason: str) -> None:
        """The source cannot refresh; its last nodes are kept and shown as stale."""
        ...

    def mark_fresh(self) -> None:
        """The source is refreshing again."""
        ...


class PeerSource(Component):
    """A source of peer nodes; ``run`` feeds node sets until cancelled."""

    category: ClassVar[str] = "sources"

    async def run(self, feed: SourceFeed, *, task_status: TaskStatus[None]) -> None:
        """Publish the first node set, call ``task_status.started()``, then keep it current."""
        raise NotImplementedError


class Output(Component):
    """A sink for results: a console view, a file, an API, metrics."""

    category: ClassVar[str] = "outputs"
    #: True when the output can be chosen with ``run -o NAME`` to render on stdout.
    console: ClassVar[bool] = False
    #: Set by the agent on the instance chosen with ``-o``: render to stdout.
    to_console: bool = False

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Long-running part (a server, a live view); call ``task_status.started()`` when ready."""
        task_status.started()
        await anyio.sleep_forever()

    async def round_completed(self, snapshot: Snapshot) -> None:
        """Called after each completed round with the fresh snapshot."""
        return None

    async def state_changed(self, snapshot: Snapshot) -> None:
        """Called soon after a path changed reachability, between rounds, with a new snapshot.

        At most every ``max(100 ms, interval / 10)``. Outputs that render once per round (the
        NDJSON and table consoles) ignore it; live views (the API, metrics) should serve it,
        so that a failure is reported when it is decided rather than at the end of the round.
        """
        return None

    async def events(self, batch: list[Event]) -> None:
        """Called with every state-change event, in order, in batches (a burst at once).

        Only for outputs that override it, each from its own task: a slow output delays
        only its own events. A call is cut off after ``[probing] interval`` (that batch is
        then lost to this output); an exception is logged and the next batch still comes.
        Queue the events and return; deliver them from ``run``.
        """
        return None

    def stats(self) -> dict[str, Any] | None:
        """Counters shown in the snapshot under ``outputs.<name>`` (None: nothing to show)."""
        return None

    async def close(self, snapshot: Snapshot) -> None:
        """Called once at shutdown, and after the single round of ``run --once``."""
        return None


class Service(Component):
    """A long-running service the agent starts before probing (the 4240 responder)."""

    category: ClassVar[str] = ""
    #: Also run under ``run --once`` (the responder is: the local node probes itself).
    run_once: ClassVar[bool] = True

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Serve until cancelled; call ``task_status.started()`` once listening."""
        raise NotImplementedError


class CheckSettings(ComponentSettings, kw_only=True):
    """Keys every ``[checks.<name>]`` section has, whatever its kind.

    A kind's own ``Settings`` subclasses this and adds its keys (``names``, ``targets``...).
    ``interval``, ``timeout`` and ``failure_threshold`` default to ``[probing]``'s values
    (the timeout capped at the check's interval); the resolved values are filled in before
    the check is built.
    """

    kind: str
    interval: Duration | None = None
    timeout: Duration | None = None
    #: Consecutive failures that make a target failing; default 1 + confirm_checks.
    failure_threshold: int | None = None
    #: Re-checks of a target started after a failure, ``confirm_spacing`` apart.
    confirm_checks: int = 2
    confirm_spacing: Duration = Duration(0.2)


class CheckUnavailable(Exception):
    """Raised by ``Check.__aenter__`` when the check cannot run here (a CA file unreadable).

    The check is then reported as failing with this message; the agent goes on.
    """


class Check(Component):
    """A service-check kind: targets that are not mesh peers (a DNS server, an API server).

    One instance per ``[checks.<name>]`` section whose ``kind`` is this class's ``name``;
    ``self.check_name`` is the section's name. The runner calls ``check(target, timeout)``
    for every target of ``targets()`` on the check's own interval, each call its own task
    under its own timeout; exceptions and hangs become failed results, and a failure is
    confirmed by re-checks before the target counts as failing. Results never touch a
    node's state.
    """

    category: ClassVar[str] = "checks"
    Settings: ClassVar[type[ComponentSettings]] = CheckSettings

    def __init__(self, settings: Any, context: AgentContext, check_name: str = "") -> None:
        super().__init__(settings, context)
        self.check_name = check_name or self.name

    async def __aenter__(self) -> Check:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def targets(self) -> list[str]:
        """The targets of this check, as shown in results (``"10.96.0.1:443"``, a DNS name)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Facts about the check shown with its results (``{"server": "10.96.0.10:53"}``)."""
        return {}

    async def check(self, target: str, timeout: float) -> ProbeResult:
        """Check one target once; ``ProbeResult.success(seconds, **details)`` or ``.failure``.

        ``timeout`` is in seconds; the runner also cancels the call shortly after it.
        """
        raise NotImplementedError
