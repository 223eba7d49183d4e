"""Helpers for the service-check tests: configs resolved through the real plugin registry."""

from __future__ import annotations

from typing import Any

from healthmesh.core.config import Config, parse_raw
from healthmesh.core.plugins import PluginRegistry, load_plugins
from healthmesh.core.resolve import resolve

BASE = """
[node]
name = "me"
addresses = ["127.0.0.1"]
[probing]
interval = "2s"
timeout = "1s"
[sources.static]
nodes = [{name = "peer", addresses = ["127.0.0.2"]}]
"""

_REGISTRY: PluginRegistry | None = None


def registry() -> PluginRegistry:
    """The installed plugins (loaded once per test session)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_plugins()
    return _REGISTRY


def resolve_text(extra: str, reg: PluginRegistry | None = None) -> Config:
    """BASE plus ``extra``, parsed and resolved (ConfigError on a problem)."""
    return resolve(parse_raw(BASE + extra, "test.toml"), reg or registry())


def build_check(extra: str, name: str | None = None) -> Any:
    """The check instance of the (only, or named) ``[checks.<name>]`` section in ``extra``."""
    config = resolve_text(extra)
    name = name or next(iter(config.checks))
    settings = config.checks[name]
    cls = registry().check_kinds[settings.kind].cls
    return cls(settings, None, name)
