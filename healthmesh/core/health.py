"""Component states of a running agent: ok, degraded or failed, since when, how many restarts.

The agent records the state of every component it runs (services, outputs, sources, probe
kinds) here; a component may report its own state too (``AgentContext.report``). The API
serves the list (``AgentContext.components()``) and every snapshot carries it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from loguru import logger

from healthmesh.core.state import rfc3339

State = Literal["ok", "degraded", "failed"]
STATES: tuple[State, ...] = ("ok", "degraded", "failed")
#: A reported message is cut to this many characters: it ends up in every snapshot.
MAX_MESSAGE = 300


@dataclass
class ComponentState:
    """The current state of one component."""

    name: str
    state: State
    message: str
    since: float  # wall clock of the last change of ``state``
    restarts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "message": self.message,
            "since": rfc3339(self.since),
            "restarts": self.restarts,
        }


class ComponentHealth:
    """The registry of component states, keyed by component name (its config section)."""

    def __init__(self, on_change: Callable[[str, str, str, str], None] | None = None) -> None:
        self._states: dict[str, ComponentState] = {}
        #: Called as ``on_change(name, old, new, message)`` on every change of a state, and
        #: with ``old = "absent"`` when a component is first recorded (the agent turns these
        #: into ``component`` events).
        self.on_change = on_change

    def set(self, name: str, state: str, message: str = "") -> None:
        """Record ``name``'s state; ``since`` moves only when the state changes."""
        if state not in STATES:
            raise ValueError(f"component state must be one of {', '.join(STATES)}, not {state!r}")
        message = str(message)[:MAX_MESSAGE]
        cur = self._states.get(name)
        if cur is None:
            self._states[name] = ComponentState(name, state, message, time.time())  # type: ignore[arg-type]
            self._changed(name, "absent", state, message)
            return
        if cur.state != state:
            level = "INFO" if state == "ok" else "WARNING"
            logger.log(level, "component {}: {} -> {}{}", name, cur.state, state,
                       f": {message}" if message else "")
            old = cur.state
            cur.state = state  # type: ignore[assignment]
            cur.since = time.time()
            self._changed(name, old, state, message)
        cur.message = message

    def _changed(self, name: str, old: str, new: str, message: str) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(name, old, new, message)
        except Exception as exc:  # reporting a state must never fail the component
            logger.error("component {}: state change not recorded: {}", name, exc)

    def restarted(self, name: str) -> None:
        """Count one restart of ``name``."""
        cur = self._states.get(name)
        if cur is None:
            cur = self._states[name] = ComponentState(name, "ok", "", time.time())
        cur.restarts += 1

    def get(self, name: str) -> ComponentState | None:
        return self._states.get(name)

    def remove(self, name: str) -> None:
        self._states.pop(name, None)

    def listing(self) -> list[dict[str, Any]]:
        """Every component as ``{name, state, message, since, restarts}``, sorted by name."""
        return [self._states[n].as_dict() for n in sorted(self._states)]
