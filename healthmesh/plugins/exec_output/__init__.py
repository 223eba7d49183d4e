"""Output plugin ``exec``: runs a command per state-change event, the event as JSON on stdin."""

from __future__ import annotations

from collections.abc import Callable

from healthmesh import Output, hookimpl
from healthmesh.plugins.exec_output.output import ExecOutput, ExecSettings

__all__ = ["ExecOutput", "ExecSettings"]


@hookimpl
def register_outputs(register: Callable[[type[Output]], None]) -> None:
    register(ExecOutput)
