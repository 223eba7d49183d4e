"""The HTTP plugin: the ``http`` probe kind, the 4240 responder and ``healthmesh responder``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from healthmesh import Probe, Service, hookimpl
from healthmesh.plugins.http.probe import HttpProbe, HttpSettings, http_get
from healthmesh.plugins.http.responder import Responder, ResponderSettings

__all__ = [
    "HttpProbe",
    "HttpSettings",
    "Responder",
    "ResponderSettings",
    "http_get",
]


@hookimpl
def register_probe_kinds(register: Callable[[type[Probe]], None]) -> None:
    register(HttpProbe)


@hookimpl
def register_services(register: Callable[[type[Service]], None]) -> None:
    register(Responder)


@hookimpl
def register_commands(cli: Any) -> None:
    from healthmesh.plugins.http.command import responder_command

    cli.add_command(responder_command)
