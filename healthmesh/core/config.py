"""Load a TOML config and validate it into typed settings; plugins validate their own sections."""

from __future__ import annotations

import contextvars
import errno
import ipaddress
import os
import re
import socket
import stat
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

#: A config file larger than this is refused before it is read (a real one is a few KB).
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: No duration in a config may be longer: past a day a value is a typo, and huge ones
#: ("99999999999999999999h") overflow the timers they feed.
MAX_DURATION = 86_400.0
#: Lower bounds of the probing cadence: below them probes cannot even be started in time.
MIN_INTERVAL = 0.1
MIN_TIMEOUT = 0.001
MAX_RATE = 1_000_000.0
MAX_FAILURE_THRESHOLD = 10_000
NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")


class ConfigError(ValueError):
    """A config problem, already worded for the operator: ``file: key: problem``."""


class Duration(float):
    """Seconds, written in config as a duration string such as "30s" or "250ms"."""

    def __repr__(self) -> str:
        return f"Duration({format_duration(self)!r})"


def check_ranges(settings: Any, bounds: dict[str, tuple[float, float]]) -> None:
    """Raise ValueError ``KEY: VALUE is out of range (LOW to HIGH)`` for the first of
    ``bounds``' keys whose value in ``settings`` lies outside its inclusive range."""
    for key, (low, high) in bounds.items():
        value = getattr(settings, key)
        if not low <= value <= high:
            if isinstance(value, Duration):
                shown = f"{format_duration(value)!r}"
                span = f"{format_duration(low)} to {format_duration(high)}"
            else:
                shown, span = str(value), f"{int(low)} to {int(high)}"
            raise ValueError(f"{key}: {shown} is out of range ({span})")


class IPAddress(str):
    """An IPv4 or IPv6 address in canonical text form."""


class Name(str):
    """A node or cluster name: letters, digits, '.', '_' and '-', at most 253 characters."""


class ConfigPath(str):
    """A filesystem path in a config; a relative one is taken relative to the config file's
    directory (not the agent's working directory), e.g. ``sources.file.path``."""


#: The directory relative ConfigPath values are resolved against while a section is converted.
_BASE_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar("base_dir", default=None)


def config_relative(path: str | os.PathLike[str], config_path: str | os.PathLike[str]) -> str:
    """``path`` made absolute against the directory of the config file ``config_path``
    (the directory of the file a symlinked config points to), as ``ConfigPath`` fields are."""
    text = os.fspath(path)
    if os.path.isabs(text):
        return text
    return os.path.normpath(os.path.join(FsPath(config_path).resolve().parent, text))


def _dec_hook(typ: type, value: Any) -> Any:
    if typ is Duration:
        if not isinstance(value, str):
            raise ValueError(f'expected a duration string such as "30s", got {value!r}')
        seconds = parse_duration(value)
        if not seconds <= MAX_DURATION:
            raise ValueError(f"{value!r} is longer than the limit of 24h")
        return Duration(seconds)
    if typ is ConfigPath:
        if not isinstance(value, str):
            raise ValueError(f"expected a path string, got {value!r}")
        if not value or "\0" in value:
            raise ValueError("must be a non-empty path without NUL")
        base = _BASE_DIR.get()
        if base is not None and not os.path.isabs(value):
            value = os.path.normpath(os.path.join(base, value))
        return ConfigPath(value)
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


def convert(data: Any, typ: type, where: str, *, config_path: str | None = None) -> Any:
    """Validate ``data`` into ``typ``; ValidationError text is reworded to name ``where``.

    With ``config_path``, relative ``ConfigPath`` values become relative to its directory.
    """
    base = None if config_path is None else str(FsPath(config_path).resolve().parent)
    token = _BASE_DIR.set(base)
    try:
        return msgspec.convert(data, typ, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(_reword(str(exc), where)) from None
    finally:
        _BASE_DIR.reset(token)


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
    #: Agent-wide bounds on confirmation re-probes: in flight at once, and started per round.
    #: Past them a failed path waits for its next scheduled probe (docs/detection.md).
    confirm_max_inflight: int = 1000
    confirm_max_per_round: int = 5000
    jitter: float = 0.1
    #: Probes of batched kinds due within one tick are handed over together, from one wake-up.
    tick: Duration = Duration(0.05)
    max_rate: float = 1000.0
    window: int = 100
    host: bool = True
    endpoint: bool = True
    #: Sampled mesh: each node is probed by this many observers (0: every agent probes
    #: every node). core/sampling.py, docs/architecture.md "Sampled mesh".
    observers: int = 0
    #: With ``observers``: nodes (name or cluster/name) this agent probes in any case.
    always: list[str] = msgspec.field(default_factory=list)


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
    return parse_raw(read_config_file(name), name)


def read_config_file(name: str, limit: int = MAX_CONFIG_BYTES) -> str:
    """The text of the regular file ``name``, at most ``limit`` bytes; ConfigError otherwise.

    Opened non-blocking and checked with fstat before reading, so a FIFO, a device such as
    /dev/zero or a directory is refused at once instead of hanging or filling memory.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{name}: {_os_problem(exc)}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{name}: is a directory, not a config file")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{name}: not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > limit:
            raise ConfigError(f"{name}: file is {st.st_size} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # the file may grow between fstat and read
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ConfigError(f"{name}: file is larger than the limit of {limit} bytes")
        return b"".join(chunks).decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: {_os_problem(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    finally:
        os.close(fd)


def _os_problem(exc: OSError) -> str:
    words = {
        errno.ENOENT: "no such file",
        errno.EISDIR: "is a directory, not a config file",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ELOOP: "too many levels of symbolic links (a symlink loop?)",
        errno.ENOTDIR: "not a directory: a component of the path is a file",
    }
    return words.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


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
    # Written as "not low <= x <= high" so that NaN fails too.
    checks = [
        (not p.interval >= MIN_INTERVAL, "probing.interval: must be at least 100ms"),
        (not p.timeout >= MIN_TIMEOUT, "probing.timeout: must be at least 1ms"),
        (p.timeout > p.interval, "probing.timeout: must not exceed probing.interval"),
        # Before failure_threshold, whose default derives from it.
        (not 0 <= p.confirm_probes <= 100, "probing.confirm_probes: must be between 0 and 100"),
        (
            not 1 <= p.failure_threshold <= MAX_FAILURE_THRESHOLD,
            f"probing.failure_threshold: must be between 1 and {MAX_FAILURE_THRESHOLD}",
        ),
        (
            not 0 <= p.confirm_spacing <= p.interval,
            "probing.confirm_spacing: must be between 0s and probing.interval",
        ),
        (not 1 <= p.confirm_max_inflight <= 1_000_000,
         "probing.confirm_max_inflight: must be between 1 and 1000000"),
        (not 1 <= p.confirm_max_per_round <= 10_000_000,
         "probing.confirm_max_per_round: must be between 1 and 10000000"),
        (not 0 <= p.jitter <= 0.5, "probing.jitter: must be between 0 and 0.5"),
        (not 0 <= p.tick <= 1.0, "probing.tick: must be between 0s and 1s"),
        (
            not 1 <= p.max_rate <= MAX_RATE,
            f"probing.max_rate: must be between 1 and {MAX_RATE:g} probes per second",
        ),
        (not 2 <= p.window <= 100_000, "probing.window: must be between 2 and 100000"),
        (not 0 <= p.observers <= 1000, "probing.observers: must be between 0 and 1000"),
        (len(p.always) > 10_000, "probing.always: at most 10000 names"),
        (any(not 1 <= len(a) <= 512 for a in p.always),
         "probing.always: names must be 1 to 512 characters long"),
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

    Duplicate names (within a cluster), nodes without addresses and an address listed twice
    (within a node or across nodes) are errors.
    """
    from healthmesh.core.model import Node

    specs = convert(data, list[NodeSpec], where)
    seen: dict[tuple[str, str], int] = {}
    owner: dict[str, int] = {}  # address -> index of the node that lists it first
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
        for field_name in ("addresses", "health_addresses"):
            for j, address in enumerate(getattr(spec, field_name)):
                first = owner.setdefault(str(address), i)
                if first != i:
                    raise ConfigError(
                        f"{where}[{i}].{field_name}[{j}]: address {address} is also listed "
                        f"by {where}[{first}] ({specs[first].name!r})"
                    )
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


def check_against_local(
    nodes: list[Any], local: NodeSettings, where: str, *, allow_self: bool = False
) -> None:
    """Refuse peers that are this node in disguise: its name, or one of its addresses.

    For node lists of the config itself (``sources.static``, a file source at start-up);
    ``where[i]`` indexes ``nodes``. With ``allow_self``, an entry that is exactly this node
    (its name and its addresses: a node list shared by every agent) is accepted. Sources
    read at run time warn instead (core/membership.py).
    """
    own = {str(a) for a in (*local.addresses, *local.health_addresses)}
    for i, node in enumerate(nodes):
        if node.name == local.name and node.cluster == local.cluster:
            if allow_self and set(node.addresses) == {str(a) for a in local.addresses}:
                continue
            raise ConfigError(
                f"{where}[{i}].name: {node.name!r} is this node's own name ([node] name); "
                "a node does not list itself as a peer"
            )
        for field_name in ("addresses", "health_addresses"):
            for j, address in enumerate(getattr(node, field_name)):
                if address in own:
                    raise ConfigError(
                        f"{where}[{i}].{field_name}[{j}]: {address} is an address of this "
                        f"node ([node] addresses), not of peer {node.name!r}"
                    )
