"""Validate a config's plugin sections against the components that plugins registered."""

from __future__ import annotations

import re
from typing import Any

from healthmesh.core.components import PeerSource
from healthmesh.core.config import (
    CONTAINER_SECTIONS,
    CORE_SECTIONS,
    Config,
    ConfigError,
    RawConfig,
    convert,
)
from healthmesh.core.plugins import PluginRegistry

_LABELS = {"probes": "probe kind", "sources": "peer source", "outputs": "output"}


def resolve(raw: RawConfig, registry: PluginRegistry, *, need_peers: bool = True) -> Config:
    """Validate every plugin section; return the config with the enabled components' settings."""
    _check_unknown_sections(raw, registry)
    config = Config(path=raw.path, core=raw.core, raw=raw.data)
    for section, reg in sorted(registry.components.items()):
        data = raw.section(section)
        if data is None and not reg.cls.default_enabled:
            continue
        if data is not None and not isinstance(data, dict):
            raise raw.error(f"{section}: must be a table, got {type(data).__name__}")
        try:
            settings = convert(data or {}, reg.cls.Settings, section, config_path=raw.path)
        except ConfigError as exc:
            raise raw.error(str(exc)) from None
        validate = getattr(reg.cls, "validate_settings", None)
        if validate is not None:
            try:
                validate(settings, config)
            except ValueError as exc:
                text = str(exc)
                sep = "." if re.match(r"^[A-Za-z_][A-Za-z0-9_]*[.\[:]", text) else ": "
                raise raw.error(f"{section}{sep}{text}") from None
        if getattr(settings, "enabled", True):
            config.components[section] = settings
    if need_peers and not any(
        issubclass(registry.components[s].cls, PeerSource) for s in config.components
    ):
        raise raw.error(
            "no peer source is configured (empty peer set): add [sources.static] "
            "nodes = [...], [sources.file] or [sources.etcd]"
        )
    return config


def _check_unknown_sections(raw: RawConfig, registry: PluginRegistry) -> None:
    known_top = {s.split(".")[0] for s in registry.components} | set(CORE_SECTIONS)
    for key, value in raw.data.items():
        if key in CONTAINER_SECTIONS:
            if not isinstance(value, dict):
                raise raw.error(f"{key}: must be a table of sections, got {type(value).__name__}")
            for sub in value:
                if f"{key}.{sub}" not in registry.components:
                    raise raw.error(_unknown(registry, key, sub))
        elif key not in known_top:
            raise raw.error(f"{key}: unknown key{_why_missing(registry)}")


def _unknown(registry: PluginRegistry, container: str, name: str) -> str:
    label = _LABELS[container]
    known = sorted(
        r.cls.name for s, r in registry.components.items() if s.startswith(container + ".")
    )
    for info in registry.blocked():
        if info.name == name:
            return (
                f"{container}.{name}: {label} {name!r} comes from plugin {name!r}, which is blocked"
            )
    msg = f"{container}.{name}: unknown {label} {name!r} (known: {', '.join(known) or 'none'})"
    return msg + _why_missing(registry)


def _why_missing(registry: PluginRegistry) -> str:
    failed = registry.failed()
    blocked = registry.blocked()
    notes: list[str] = []
    if failed:
        notes.append(
            "plugins that failed to load: " + "; ".join(f"{i.name} ({i.error})" for i in failed)
        )
    if blocked:
        notes.append("blocked plugins: " + ", ".join(i.name for i in blocked))
    return ("\n  " + "; ".join(notes)) if notes else ""


def effective(config: Config) -> dict[str, Any]:
    """The effective config as plain data, defaults filled in (for ``config check --show``)."""
    from healthmesh.core.config import to_builtins

    out: dict[str, Any] = to_builtins(config.core)
    for section, settings in sorted(config.components.items()):
        node = out
        parts = section.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = to_builtins(settings)
    return out
