"""Runs the service checks (``[checks.<name>]``): each on its own interval, apart from probing.

Every check target is checked by its own task under its own timeout; an exception becomes a
failed result with its text, a hang becomes ``timeout after …``. A failure starts
``confirm_checks`` re-checks ``confirm_spacing`` apart (the no-flap rule of probes), and a
target counts as failing after ``failure_threshold`` consecutive failures; one success makes it
ok. Results are kept with rolling statistics like paths (``KindState``), but in their own
store: a check never changes a node's state.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from loguru import logger

from healthmesh.core.components import Check, CheckUnavailable
from healthmesh.core.model import PathState, ProbeResult
from healthmesh.core.state import KindState
from healthmesh.core.units import format_duration

#: Extra time a check gets past its timeout before the runner cancels it.
GRACE = 0.1
#: Bound on a check kind's ``__aenter__`` and ``__aexit__``.
ENTER_BOUND = 5.0
EXIT_BOUND = 1.0
#: Target states as the snapshot names them: checks are ok or failing, not (un)reachable,
#: so that they are never mistaken for nodes.
STATE_NAMES = {
    PathState.REACHABLE: "ok",
    PathState.UNREACHABLE: "failing",
    PathState.UNKNOWN: "unknown",
}
CHECK_STATES = ("ok", "failing", "unknown")


def overall(states: list[str]) -> str:
    """A check's state from its targets': failing when any is, ok when all are."""
    if any(s == "failing" for s in states):
        return "failing"
    if states and all(s == "ok" for s in states):
        return "ok"
    return "unknown"


@dataclasses.dataclass(eq=False)
class CheckEntry:
    """One configured check: its instance (or why it has none) and its targets' states."""

    name: str
    kind: str
    settings: Any
    check: Check | None
    window: int
    #: Set when the check cannot run (its kind raised while being built or entered).
    unavailable: str | None = None
    targets: list[str] = dataclasses.field(default_factory=list)
    states: dict[str, KindState] = dataclasses.field(default_factory=dict)
    confirming: set[str] = dataclasses.field(default_factory=set)
    describe: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.check is None:
            return
        try:
            self.targets = [str(t) for t in self.check.targets()]
            self.describe = dict(self.check.describe())
        except Exception as exc:
            self.unavailable = f"{type(exc).__name__}: {exc}"
            self.targets = []
        for target in self.targets:
            self.states[target] = KindState(self.settings.failure_threshold, self.window)

    def view(self) -> dict[str, Any]:
        """The JSON form of the check, as the snapshot's ``checks`` list carries it."""
        targets = []
        for target in self.targets:
            entry = self.states[target].as_dict()
            entry["state"] = STATE_NAMES[self.states[target].state]
            targets.append({"target": target, **entry})
        states = [t["state"] for t in targets]
        state = "failing" if self.unavailable else overall(states)
        return {
            "name": self.name,
            "kind": self.kind,
            "state": state,
            "error": self.unavailable,
            "interval_s": float(self.settings.interval),
            "timeout_s": float(self.settings.timeout),
            **({"details": self.describe} if self.describe else {}),
            "summary": {
                "targets": len(states),
                "ok": states.count("ok"),
                "failing": states.count("failing"),
                "unknown": states.count("unknown"),
            },
            "targets": targets,
        }


class CheckRunner:
    """Runs every configured check; ``views()`` is the snapshot's ``checks`` list."""

    def __init__(
        self, entries: list[CheckEntry], on_change: Callable[[], None] | None = None
    ) -> None:
        self.entries = entries
        self.on_change = on_change or (lambda: None)

    def views(self) -> list[dict[str, Any]]:
        """Every check's current results, in config order."""
        return [e.view() for e in self.entries]

    async def run(self, *, once: bool = False, task_status: TaskStatus[None]) -> None:
        """Run every check (each in its own task) until cancelled, or one pass with ``once``."""
        async with anyio.create_task_group() as tg:
            for entry in self.entries:
                if entry.check is not None and entry.unavailable is None:
                    tg.start_soon(self._run_check, entry, once, name=f"check {entry.name}")
            task_status.started()

    async def _run_check(self, entry: CheckEntry, once: bool) -> None:
        check = entry.check
        assert check is not None
        try:
            with anyio.fail_after(ENTER_BOUND):
                await check.__aenter__()
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                text = f"did not start within {format_duration(ENTER_BOUND)}"
            elif isinstance(exc, CheckUnavailable):
                text = str(exc)
            else:
                text = f"{type(exc).__name__}: {exc}"
            entry.unavailable = text
            logger.warning("check {!r} ({}) cannot run: {}", entry.name, entry.kind, text)
            self.on_change()
            return
        try:
            async with anyio.create_task_group() as tg:
                if once:
                    for target in entry.targets:
                        tg.start_soon(self._check_target, entry, target, tg)
                    return
                interval = float(entry.settings.interval)
                # Spread the first runs of many checks a little, as probes are spread.
                await anyio.sleep(random.uniform(0.0, min(interval, 1.0) * 0.1))
                while True:
                    start = anyio.current_time()
                    for target in entry.targets:
                        if target not in entry.confirming:
                            tg.start_soon(self._check_target, entry, target, tg)
                    await anyio.sleep_until(start + interval)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(EXIT_BOUND):
                try:
                    await check.__aexit__(None, None, None)
                except Exception as exc:
                    logger.warning("check {!r} failed to close: {}", entry.name, exc)

    async def _check_target(self, entry: CheckEntry, target: str, tg: TaskGroup) -> ProbeResult:
        result = await self.check_once(entry, target)
        st = entry.states[target]
        self._record(entry, target, result)
        if (
            not result.ok
            and target not in entry.confirming
            and st.state is not PathState.UNREACHABLE
            and entry.settings.confirm_checks > 0
        ):
            entry.confirming.add(target)
            tg.start_soon(self._confirm, entry, target)
        return result

    async def _confirm(self, entry: CheckEntry, target: str) -> None:
        """Re-check ``target`` after a failure, overlapping, until it is decided either way."""
        st = entry.states[target]
        spacing = float(entry.settings.confirm_spacing)
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(entry.settings.confirm_checks):
                    await anyio.sleep(spacing)
                    if st.consecutive_failures == 0 or st.state is PathState.UNREACHABLE:
                        break
                    tg.start_soon(self._recheck, entry, target)
        finally:
            entry.confirming.discard(target)

    async def _recheck(self, entry: CheckEntry, target: str) -> None:
        st = entry.states[target]
        if st.consecutive_failures == 0 or st.state is PathState.UNREACHABLE:
            return
        self._record(entry, target, await self.check_once(entry, target))

    def _record(self, entry: CheckEntry, target: str, result: ProbeResult) -> None:
        st = entry.states[target]
        before = st.state
        if st.record(result):
            self.on_change()
            if st.state is PathState.UNREACHABLE:
                logger.warning("check {!r}: {} is failing: {}", entry.name, target, result.error)
            elif before is PathState.UNREACHABLE:
                logger.info("check {!r}: {} is ok again", entry.name, target)

    async def check_once(self, entry: CheckEntry, target: str) -> ProbeResult:
        """One call of the kind's ``check``: exceptions and hangs become failed results."""
        check = entry.check
        assert check is not None
        timeout = float(entry.settings.timeout)
        started = time.time()
        result: Any = None
        with anyio.move_on_after(timeout + GRACE):
            try:
                result = await check.check(target, timeout)
            except Exception as exc:
                result = ProbeResult.failure(f"{type(exc).__name__}: {exc}"[:500])
        if result is None:
            result = ProbeResult.failure(f"timeout after {format_duration(timeout)}")
        elif not isinstance(result, ProbeResult):
            result = ProbeResult.failure(
                f"check kind {entry.kind!r} returned {type(result).__name__}, not a ProbeResult"
            )
        return dataclasses.replace(result, started_at=started, finished_at=time.time())


def build_entries(
    checks: dict[str, Any], kinds: dict[str, Any], context: Any, window: int
) -> list[CheckEntry]:
    """One entry per configured check; a kind whose constructor raises is unavailable."""
    entries: list[CheckEntry] = []
    for name, settings in checks.items():
        cls = kinds[settings.kind].cls
        try:
            obj: Check | None = cls(settings, context, name)
            error = None
        except Exception as exc:
            obj, error = None, f"{type(exc).__name__}: {exc}"
        entry = CheckEntry(name, settings.kind, settings, obj, window)
        if error is not None:
            entry.unavailable = error
        entries.append(entry)
    return entries
