"""The local API plugin: a unix-socket HTTP API (Cilium's /v1beta plus /v1) and ``status``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from healthmesh import Output, hookimpl
from healthmesh.plugins.api.output import ApiOutput
from healthmesh.plugins.api.settings import DEFAULT_SOCKET, SOCKET_ENV, ApiSettings

__all__ = ["DEFAULT_SOCKET", "SOCKET_ENV", "ApiOutput", "ApiSettings"]


@hookimpl
def register_outputs(register: Callable[[type[Output]], None]) -> None:
    register(ApiOutput)


@hookimpl
def register_commands(cli: Any) -> None:
    from healthmesh.plugins.api.command import mesh_command, status_command
    from healthmesh.plugins.api.events_command import events_command

    cli.add_command(status_command)
    cli.add_command(events_command)
    cli.add_command(mesh_command)
