"""The web page plugin: ``[outputs.web]`` serves the mesh heatmap, verdicts and history."""

from __future__ import annotations

from collections.abc import Callable

from healthmesh import Output, hookimpl
from healthmesh.plugins.web.output import WebOutput
from healthmesh.plugins.web.settings import WebSettings

__all__ = ["WebOutput", "WebSettings"]


@hookimpl
def register_outputs(register: Callable[[type[Output]], None]) -> None:
    register(WebOutput)
