"""Load a TOML config and validate it into typed settings; plugins validate their own sections."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import msgspec

from healthmesh.core.envsubst import EnvSubstError, substitute_env
from healthmesh.core.units import format_duration, parse_duration

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

MAX_CONFIG_BYTES = 4 * 1024 * 1024
NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")


class ConfigError(ValueError):
    """A config problem, already worded for the operator: ``file: key: problem``."""


class Duration(float):
    """Seconds, written in config as a duration string such as "30s" or "250ms"."""

    def __repr__(self) -> str:
        return f"Duration({format_duration(self)!r})"


class IPAddress(str):
    """An IPv4 or IPv6 address in canonical text form."""


class Name(str):
    """A node or cluster name: letters, digits, '.', '_' and '-', at most 253 characters."""


def _dec_hook(typ: type, value: Any) -> Any:
    if typ is Duration:
        if not isinstance(value, str):
            raise ValueError(f'expected a duration string such as "30s", got {value!r}')
        seconds = parse_duration(value)
        return Duration(seconds)
    if typ is IPAddress:
        if not isinstance(value, str):
            raise ValueError(f"expected an IP address string, got {value!r}")
        try:
            return IPAddress(str(ipaddress.ip_address(value)))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None
    if typ is Name:
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a valid name (letters, digits, '.', '_', '-'; at most 253)"
            )
        return Name(value)
    raise NotImplementedError(typ)


def _enc_hook(value: Any) -> Any:
    if isinstance(value, Duration):
        return format_duration(value)
    if isinstance(value, str):
        return str(value)
    raise NotImplementedError(type(value))


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base class of every config section: unknown keys are an error."""


def convert(data: Any, typ: type, where: str) -> Any:
    """Validate ``data`` into ``typ``; ValidationError text is reworded to name ``where``."""
    try:
        return msgspec.convert(data, typ, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(_reword(str(exc), where)) from None


def to_builtins(settings: Any) -> Any:
    """Settings back to plain TOML-able values (durations as strings)."""
    return msgspec.to_builtins(settings, enc_hook=_enc_hook)


_AT = re.compile(r"^(.*) - at `\$(.*)`$", re.S)


def _reword(message: str, where: str) -> str:
    m = _AT.match(message)
    problem, sub = (m.group(1), m.group(2)) if m else (message, "")
    if sub.startswith("["):
        key = where + sub
    else:
        key = f"{where}{sub}" if where else sub.lstrip(".")
    prefix = f"{key}." if key else ""
    unknown = re.match(r"Object contains unknown field `(.*)`", problem)
    if unknown:
        return f"{prefix}{unknown.group(1)}: unknown key"
    missing = re.match(r"Object missing required field `(.*)`", problem)
    if missing:
        return f"{prefix}{missing.group(1)}: required key is missing"
    problem = problem[0].lower() + problem[1:] if problem else problem
    return f"{key}: {problem}" if key else problem


# --- core sections --------------------------------------------------------------------


class NodeSettings(Settings):
    """``[node]``: who this agent is."""

    name: Name = msgspec.field(default_factory=lambda: Name(socket.gethostname().split(".")[0]))
    cluster: Name = Name("default")
    addresses: list[IPAddress] = msgspec.field(default_factory=list)
    health_addresses: list[IPAddress] = msgspec.field(default_factory=list)
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class ProbingSettings(Settings):
    """``[probing]``: how often, how long, and when a path counts as unreachable."""

    interval: Duration = Duration(30.0)
    timeout: Duration = Duration(1.0)
    #: Consecutive failures that make a path unreachable; default 1 + confirm_probes.
    failure_threshold: int | None = None
    #: Re-probes sent after a failure, ``confirm_spacing`` apart (they may overlap).
    confirm_probes: int = 8
    confirm_spacing: Duration = Duration(0.025)
    jitter: float = 0.1
    #: Probes of batched kinds due within one tick are handed over together, from one wake-up.
    tick: Duration = Duration(0.05)
    max_rate: float = 1000.0
    window: int = 100
    host: bool = True
    endpoint: bool = True


class LogSettings(Settings):
    """``[log]``: loguru level for the agent's stderr log."""

    level: str = "INFO"


class PluginSettings(Settings):
    """``[plugins]``: plugins to block by name."""

    disable: list[str] = msgspec.field(default_factory=list)


class EventSettings(Settings):
    """``[events]``: the ring of state-change events kept for replay, and follower buffers."""

    #: Events kept in memory for ``/v1/events?since=`` replay.
    ring: int = 10_000
    #: Events a follower (an API stream, an output) may fall behind before it is cut from
    #: the live feed and has to catch up from the ring.
    buffer: int = 1_000


class CoreSettings(Settings):
    """The sections the core itself owns."""

    node: NodeSettings = msgspec.field(default_factory=NodeSettings)
    probing: ProbingSettings = msgspec.field(default_factory=ProbingSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    plugins: PluginSettings = msgspec.field(default_factory=PluginSettings)
    events: EventSettings = msgspec.field(default_factory=EventSettings)


CORE_SECTIONS = ("node", "probing", "log", "plugins", "events")
CONTAINER_SECTIONS = ("probes", "sources", "outputs")
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


@dataclass
class RawConfig:
    """A parsed TOML document, before plugin sections are validated."""

    path: str
    data: dict[str, Any]
    core: CoreSettings

    def section(self, dotted: str) -> Any:
        """The raw table at ``dotted`` (e.g. ``"probes.icmp"``), or None when absent."""
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def error(self, message: str) -> ConfigError:
        """A ConfigError prefixed with the file name."""
        return ConfigError(f"{self.path}: {message}")


@dataclass
class Config:
    """The validated config: core settings plus one settings object per enabled component."""

    path: str
    core: CoreSettings
    components: dict[str, Any] = field(default_factory=dict)  # section -> settings
    raw: dict[str, Any] = field(default_factory=dict)
    #: ``[checks.<name>]`` sections: name -> the check kind's validated settings.
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def node(self) -> NodeSettings:
        return self.core.node

    @property
    def probing(self) -> ProbingSettings:
        return self.core.probing


def load_raw(path: str | os.PathLike[str]) -> RawConfig:
    """Read and parse a TOML file and validate the core sections."""
    name = str(path)
    try:
        fs = FsPath(path)
        size = fs.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{name}: file is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
        text = fs.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{name}: permission denied") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_raw(text, name)


def parse_raw(text: str, name: str = "<config>") -> RawConfig:
    """Parse TOML text and validate the core sections."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: invalid TOML: {exc}") from None
    try:  # ${VAR} in string values (docs/kubernetes.md: one ConfigMap for every node)
        data = substitute_env(data)
    except EnvSubstError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    core_data = {k: data[k] for k in CORE_SECTIONS if k in data}
    try:
        core = convert(core_data, CoreSettings, "")
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    raw = RawConfig(name, data, core)
    _check_core(raw)
    return raw


def _check_core(raw: RawConfig) -> None:
    p = raw.core.probing
    n = raw.core.node
    if p.failure_threshold is None:
        p.failure_threshold = p.confirm_probes + 1
    checks = [
        (p.interval <= 0, "probing.interval: must be greater than zero"),
        (p.timeout <= 0, "probing.timeout: must be greater than zero"),
        (p.timeout > p.interval, "probing.timeout: must not exceed probing.interval"),
        (p.failure_threshold < 1, "probing.failure_threshold: must be at least 1"),
        (not 0 <= p.confirm_probes <= 100, "probing.confirm_probes: must be between 0 and 100"),
        (p.confirm_spacing < 0, "probing.confirm_spacing: must not be negative"),
        (not 0 <= p.jitter <= 0.5, "probing.jitter: must be between 0 and 0.5"),
        (not 0 <= p.tick <= 1.0, "probing.tick: must be between 0s and 1s"),
        (p.max_rate <= 0, "probing.max_rate: must be greater than zero"),
        (not 2 <= p.window <= 100_000, "probing.window: must be between 2 and 100000"),
        (not 10 <= raw.core.events.ring <= 1_000_000,
         "events.ring: must be between 10 and 1000000"),
        (not 10 <= raw.core.events.buffer <= 100_000,
         "events.buffer: must be between 10 and 100000"),
        (not n.addresses, "node.addresses: at least one address of this node is required"),
        (len(set(n.addresses)) != len(n.addresses), "node.addresses: duplicate address"),
        (
            raw.core.log.level.upper() not in LOG_LEVELS,
            f"log.level: must be one of {', '.join(LOG_LEVELS)}",
        ),
    ]
    for bad, message in checks:
        if bad:
            raise raw.error(message)


# --- node lists (static and file sources, and third-party sources) ----------------------


class NodeSpec(Settings, kw_only=True):
    """One peer as written in a config or node file."""

    name: Name
    cluster: Name = Name("default")
    addresses: list[IPAddress]
    health_addresses: list[IPAddress] = msgspec.field(default_factory=list)
    labels: dict[str, str] = msgspec.field(default_factory=dict)


def parse_nodes(data: Any, where: str) -> list[Any]:
    """Validate a list of node tables into ``Node`` objects; errors name ``where[i].key``.

    Duplicate names (within a cluster), nodes without addresses and duplicate addresses
    within a node are errors.
    """
    from healthmesh.core.model import Node

    specs = convert(data, list[NodeSpec], where)
    seen: dict[tuple[str, str], int] = {}
    nodes: list[Node] = []
    for i, spec in enumerate(specs):
        key = (spec.cluster, spec.name)
        if key in seen:
            raise ConfigError(
                f"{where}[{i}].name: duplicate node name {spec.name!r} (also {where}[{seen[key]}])"
            )
        seen[key] = i
        if not spec.addresses:
            raise ConfigError(f"{where}[{i}].addresses: at least one address is required")
        for field_name in ("addresses", "health_addresses"):
            values = getattr(spec, field_name)
            if len(set(values)) != len(values):
                raise ConfigError(f"{where}[{i}].{field_name}: duplicate address")
        nodes.append(
            Node(
                name=str(spec.name),
                cluster=str(spec.cluster),
                addresses=tuple(str(a) for a in spec.addresses),
                health_addresses=tuple(str(a) for a in spec.health_addresses),
                labels=dict(spec.labels),
            )
        )
    return nodes
