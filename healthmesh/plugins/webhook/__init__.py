"""Output plugin ``webhook``: POSTs state-change events as JSON to HTTP endpoints."""

from __future__ import annotations

from collections.abc import Callable

from healthmesh import Output, hookimpl
from healthmesh.plugins.webhook.output import WebhookOutput
from healthmesh.plugins.webhook.settings import WebhookSettings

__all__ = ["WebhookOutput", "WebhookSettings"]


@hookimpl
def register_outputs(register: Callable[[type[Output]], None]) -> None:
    register(WebhookOutput)
