"""Plugin manager: loads the "healthmesh" entry points, blocks by name, collects components."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy
from loguru import logger

from healthmesh.core import hookspecs
from healthmesh.core.components import Check, Component, Output, PeerSource, Probe, Service

ENTRY_POINT_GROUP = "healthmesh"
DISABLE_ENV = "HEALTHMESH_DISABLE_PLUGINS"
CORE_DISTRIBUTION = "healthmesh"

_CATEGORIES: dict[str, tuple[str, type[Component]]] = {
    "register_probe_kinds": ("probe kind", Probe),
    "register_peer_sources": ("peer source", PeerSource),
    "register_outputs": ("output", Output),
    "register_services": ("service", Service),
    "register_check_kinds": ("check kind", Check),
}


class PluginError(Exception):
    """A plugin problem that stops start-up (duplicate kind, hook with no spec)."""


@dataclass
class PluginInfo:
    """One plugin as ``healthmesh plugins`` lists it."""

    name: str
    distribution: str | None
    version: str | None
    builtin: bool
    status: str  # loaded | blocked | failed
    hooks: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "status": self.status,
            "hooks": self.hooks,
            "provides": self.provides,
            "error": self.error,
        }


def disabled_from_env() -> set[str]:
    """Plugin names listed in HEALTHMESH_DISABLE_PLUGINS (comma or space separated)."""
    raw = os.environ.get(DISABLE_ENV, "")
    return {p for p in raw.replace(",", " ").split() if p}


@dataclass
class Registered:
    """A component class and the plugin that registered it."""

    cls: type[Component]
    plugin: str
    category: str


class PluginRegistry:
    """Discovers, loads and lists plugins; collects the components they register."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("healthmesh")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.components: dict[str, Registered] = {}  # section -> registered component
        #: Check kinds by kind name: many ``[checks.<name>]`` sections may use one kind.
        self.check_kinds: dict[str, Registered] = {}

    # -- loading ------------------------------------------------------------------------

    def load(
        self,
        disabled: set[str] | frozenset[str] = frozenset(),
        extra: dict[str, object] | None = None,
    ) -> PluginRegistry:
        """Load every entry point of the group (and ``extra`` plugin objects, for tests)."""
        seen: dict[str, str] = {}
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if ep.name in seen and seen[ep.name] != dist:
                raise PluginError(
                    f"plugin name {ep.name!r} is declared by two distributions: "
                    f"{seen[ep.name]} and {dist}"
                )
            if ep.name in seen:
                continue  # the same distribution found twice on sys.path
            seen[ep.name] = dist or ""
            info = PluginInfo(
                ep.name, dist, version, builtin=(dist == CORE_DISTRIBUTION), status="loaded"
            )
            self.infos[ep.name] = info
            if ep.name in disabled:
                info.status = "blocked"
                self.pm.set_blocked(ep.name)
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must not stop the agent
                info.status = "failed"
                info.error = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "plugin {!r} ({} {}) failed to load and is skipped: {}",
                    ep.name,
                    dist,
                    version,
                    info.error,
                )
                continue
            self._register(ep.name, module)
        for name, obj in (extra or {}).items():
            self.infos[name] = PluginInfo(name, None, None, builtin=False, status="loaded")
            if name in disabled:
                self.infos[name].status = "blocked"
                continue
            self._register(name, obj)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
            raise PluginError(f"plugin {name!r}: {exc}") from None
        self._collect()
        return self

    def _register(self, name: str, obj: object) -> None:
        try:
            self.pm.register(obj, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r}: {exc}") from None
        except ValueError as exc:
            raise PluginError(f"plugin {name!r}: {exc}") from None
        info = self.infos[name]
        info.hooks = sorted(hook.name for hook in self.pm.get_hookcallers(obj) or () if hook.name)

    def _collect(self) -> None:
        for hook_name, (label, base) in _CATEGORIES.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                self._collect_one(impl, label, base)

    def _collect_one(self, impl: pluggy.HookImpl, label: str, base: type[Component]) -> None:
        plugin = impl.plugin_name
        found: list[type[Component]] = []

        def register(cls: type[Component]) -> None:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PluginError(
                    f"plugin {plugin!r} registered {cls!r} as a {label}; "
                    f"it must be a subclass of healthmesh.{base.__name__}"
                )
            if not getattr(cls, "name", None):
                raise PluginError(f"plugin {plugin!r}: {label} {cls.__name__} has no name")
            found.append(cls)

        impl.function(register=register)
        for cls in found:
            section = cls.section_for()
            table = self.check_kinds if base is Check else self.components
            if base is Check:
                section = cls.name
            other = table.get(section)
            if other is not None:
                raise PluginError(
                    f"{label} {cls.name!r} is registered twice: by plugin {other.plugin!r} "
                    f"and by plugin {plugin!r}"
                )
            table[section] = Registered(cls, plugin, label)
            info = self.infos.get(plugin)
            if info is not None:
                info.provides.setdefault(label, []).append(cls.name)

    def add_commands(self, cli: Any) -> None:
        """Let every plugin add its sub-commands; one that raises is reported and skipped."""
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(cli=cli)
            except Exception as exc:
                logger.warning(
                    "plugin {!r} failed to add its commands: {}: {}",
                    impl.plugin_name,
                    type(exc).__name__,
                    exc,
                )

    # -- queries ------------------------------------------------------------------------

    def of(self, base: type[Component]) -> dict[str, Registered]:
        """Registered components of one category, by section."""
        return {s: r for s, r in self.components.items() if issubclass(r.cls, base)}

    def listing(self) -> list[dict[str, Any]]:
        """Every plugin, loaded or not, as plain dicts."""
        return [info.as_dict() for info in sorted(self.infos.values(), key=lambda i: i.name)]

    def failed(self) -> list[PluginInfo]:
        """Plugins whose import failed."""
        return [i for i in self.infos.values() if i.status == "failed"]

    def blocked(self) -> list[PluginInfo]:
        """Plugins blocked by name."""
        return [i for i in self.infos.values() if i.status == "blocked"]


def load_plugins(
    disabled: set[str] | None = None, extra: dict[str, ModuleType] | None = None
) -> PluginRegistry:
    """A registry with every installed plugin loaded, minus the blocked ones."""
    blocked = disabled_from_env() | (disabled or set())
    return PluginRegistry().load(blocked, extra)
