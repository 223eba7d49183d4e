"""Validate a config's plugin sections against the components that plugins registered."""

from __future__ import annotations

import re
from typing import Any

from healthmesh.core.components import PeerSource
from healthmesh.core.config import (
    CONTAINER_SECTIONS,
    CORE_SECTIONS,
    NAME_RE,
    Config,
    ConfigError,
    Duration,
    RawConfig,
    convert,
)
from healthmesh.core.plugins import PluginRegistry

_LABELS = {"probes": "probe kind", "sources": "peer source", "outputs": "output"}


def resolve(raw: RawConfig, registry: PluginRegistry, *, need_peers: bool = True) -> Config:
    """Validate every plugin section; return the config with the enabled components' settings."""
    _check_unknown_sections(raw, registry)
    # The parsed TOML is not kept: at 5,000 peers it is megabytes that nothing reads once
    # every section is converted (docs/benchmarks.md, "Memory census").
    config = Config(path=raw.path, core=raw.core)
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
        _validate(raw, section, reg.cls, settings, config)
        if getattr(settings, "enabled", True):
            config.components[section] = settings
    config.checks = resolve_checks(raw, registry, config)
    if need_peers and not any(
        issubclass(registry.components[s].cls, PeerSource) for s in config.components
    ):
        raise raw.error(
            "no peer source is configured (empty peer set): add [sources.static] "
            "nodes = [...], [sources.file] or [sources.etcd]"
        )
    return config


CHECKS_SECTION = "checks"
MAX_CHECKS = 256
#: Bounds of the keys every check has: (low, high) in seconds or counts.
CHECK_INTERVAL = (0.1, 86400.0)
CHECK_TIMEOUT_MAX = 60.0
CHECK_CONFIRM_MAX = 20
CHECK_SPACING_MAX = 10.0
CHECK_THRESHOLD_MAX = 100


def resolve_checks(raw: RawConfig, registry: PluginRegistry, config: Config) -> dict[str, Any]:
    """Validate every ``[checks.<name>]`` section with its kind's settings; name -> settings.

    ``interval``, ``timeout`` and ``failure_threshold`` left out are filled in from
    ``[probing]`` (the timeout capped at the check's interval).
    """
    table = raw.data.get(CHECKS_SECTION)
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise raw.error(f"{CHECKS_SECTION}: must be a table of checks, got {type(table).__name__}")
    if len(table) > MAX_CHECKS:
        raise raw.error(f"{CHECKS_SECTION}: {len(table)} checks; at most {MAX_CHECKS}")
    out: dict[str, Any] = {}
    for name, data in table.items():
        where = f"{CHECKS_SECTION}.{name}"
        if not NAME_RE.match(name):
            raise raw.error(f"{where}: invalid check name (letters, digits, '.', '_', '-')")
        if not isinstance(data, dict):
            raise raw.error(f"{where}: must be a table, got {type(data).__name__}")
        kind = data.get("kind")
        if not isinstance(kind, str):
            raise raw.error(f"{where}.kind: required key is missing (the check kind, e.g. \"dns\")"
                            if kind is None else f"{where}.kind: expected a string, got {kind!r}")
        reg = registry.check_kinds.get(kind)
        if reg is None:
            known = ", ".join(sorted(registry.check_kinds)) or "none"
            raise raw.error(
                f"{where}.kind: unknown check kind {kind!r} (known: {known})"
                + _why_missing(registry)
            )
        try:
            settings = convert(data, reg.cls.Settings, where)
        except ConfigError as exc:
            raise raw.error(str(exc)) from None
        _check_common(raw, where, settings, config)
        _validate(raw, where, reg.cls, settings, config)
        if getattr(settings, "enabled", True):
            out[name] = settings
    return out


def _check_common(raw: RawConfig, where: str, s: Any, config: Config) -> None:
    p = config.probing
    if s.interval is None:
        s.interval = Duration(p.interval)
    if s.timeout is None:
        s.timeout = Duration(min(p.timeout, s.interval, CHECK_TIMEOUT_MAX))
    if s.failure_threshold is None:
        s.failure_threshold = s.confirm_checks + 1
    lo, hi = CHECK_INTERVAL
    problems = [
        (not lo <= s.interval <= hi, "interval: must be between 100ms and 24h"),
        (not 0 < s.timeout <= CHECK_TIMEOUT_MAX, "timeout: must be between 0s and 60s"),
        (s.timeout > s.interval, "timeout: must not exceed the check's interval"),
        (not 0 <= s.confirm_checks <= CHECK_CONFIRM_MAX,
         f"confirm_checks: must be between 0 and {CHECK_CONFIRM_MAX}"),
        (not 1 <= s.failure_threshold <= CHECK_THRESHOLD_MAX,
         f"failure_threshold: must be between 1 and {CHECK_THRESHOLD_MAX}"),
        (not 0 <= s.confirm_spacing <= CHECK_SPACING_MAX,
         "confirm_spacing: must be between 0s and 10s"),
    ]
    for bad, message in problems:
        if bad:
            raise raw.error(f"{where}.{message}")


def _check_unknown_sections(raw: RawConfig, registry: PluginRegistry) -> None:
    known_top = (
        {s.split(".")[0] for s in registry.components} | set(CORE_SECTIONS) | {CHECKS_SECTION}
    )
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
    if config.checks:
        out[CHECKS_SECTION] = {n: to_builtins(s) for n, s in sorted(config.checks.items())}
    return _drop_none(out)


def _drop_none(value: Any) -> Any:
    """TOML has no null: an unset optional key (None) is left out of the shown config."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _validate(raw: RawConfig, where: str, cls: type, settings: Any, config: Config) -> None:
    """The plugin's ``validate_settings``; its ValueError as one config error under ``where``."""
    validate = getattr(cls, "validate_settings", None)
    if validate is None:
        return
    try:
        validate(settings, config)
    except ValueError as exc:
        text = str(exc)
        # "key: ..." and "key[0]: ..." hang off the section with a dot; prose with ": ".
        sep = "." if re.match(r"^[A-Za-z_][A-Za-z0-9_]*[.\[:]", text) else ": "
        raise raw.error(f"{where}{sep}{text}") from None
