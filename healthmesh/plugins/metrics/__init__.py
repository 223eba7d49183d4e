"""The metrics plugin: ``[outputs.metrics]``, a Prometheus endpoint on the agent's state."""

from __future__ import annotations

from collections.abc import Callable

from healthmesh import Output, hookimpl
from healthmesh.plugins.metrics.output import MetricsOutput
from healthmesh.plugins.metrics.settings import MetricsSettings

__all__ = ["MetricsOutput", "MetricsSettings"]


@hookimpl
def register_outputs(register: Callable[[type[Output]], None]) -> None:
    register(MetricsOutput)
