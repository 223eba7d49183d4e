"""Plugin manager: loads the "healthmesh" entry points, blocks by name, collects components.

Every plugin's code (its import and each of its hooks) runs in a helper thread under a
deadline: a plugin that raises or hangs is reported in one line, listed as ``failed`` and
skipped, and never takes the command line or the agent down. Hooks are called through
pluggy's hook caller (so hook wrappers, tracing and implementations that take fewer
arguments than the spec all work), one plugin at a time, so that what a plugin registers is
attributed to it and a duplicate name can be reported with both plugins' names.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any, TypeVar

import pluggy
from loguru import logger

from healthmesh.core import hookspecs
from healthmesh.core.components import Check, Component, Output, PeerSource, Probe, Service

ENTRY_POINT_GROUP = "healthmesh"
DISABLE_ENV = "HEALTHMESH_DISABLE_PLUGINS"
CORE_DISTRIBUTION = "healthmesh"
#: Seconds a plugin's import, and each of its hooks, may take before it is skipped.
IMPORT_DEADLINE = 5.0
HOOK_DEADLINE = 3.0

_CATEGORIES: dict[str, tuple[str, type[Component]]] = {
    "register_probe_kinds": ("probe kind", Probe),
    "register_peer_sources": ("peer source", PeerSource),
    "register_outputs": ("output", Output),
    "register_services": ("service", Service),
    "register_check_kinds": ("check kind", Check),
}

#: Plugins that hung in this process (their import or a hook never returned), with the
#: reason: a later load in the same process skips them at once instead of waiting again
#: (a second import would block on the first one's module lock).
_HUNG: dict[str, str] = {}
#: Failures already logged in this process (the CLI loads the plugins more than once).
_REPORTED: set[tuple[str, str]] = set()

T = TypeVar("T")


class PluginError(Exception):
    """A plugin problem that stops start-up (duplicate kind, hook with no spec)."""


class PluginFailed(Exception):
    """A plugin's import or hook raised or overran its deadline: the plugin is skipped."""


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


def call_with_deadline(fn: Callable[[], T], deadline: float, what: str) -> T:
    """``fn()`` in a daemon thread; its exception re-raised, PluginFailed when it overruns.

    A thread cannot be killed: one that overruns is abandoned (it is a daemon, so it does
    not keep the process alive) and the caller goes on without its result.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # SystemExit from a plugin is a failure too
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name=f"healthmesh-plugin {what}", daemon=True).start()
    if not done.wait(deadline):
        raise PluginFailed(f"{what} did not return within {deadline:g}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")  # type: ignore[return-value]


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


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
                if ep.name in _HUNG:
                    raise PluginFailed(_HUNG[ep.name])
                module = call_with_deadline(ep.load, IMPORT_DEADLINE, "import")
            except PluginFailed as exc:  # hung: never try this plugin again in this process
                _HUNG.setdefault(ep.name, str(exc))
                self._fail(ep.name, str(exc), "failed to load and is skipped")
                continue
            except BaseException as exc:  # a broken third-party plugin must not stop the agent
                self._fail(ep.name, _describe(exc), "failed to load and is skipped")
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

    def _fail(self, name: str, error: str, what: str = "failed and is skipped") -> None:
        """Mark ``name`` failed, drop it from the hooks, say so once per process."""
        info = self.infos[name]
        info.status = "failed"
        info.error = error
        info.provides = {}
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        if (name, error) not in _REPORTED:
            _REPORTED.add((name, error))
            logger.warning(
                "plugin {!r} ({} {}) {}: {}",
                name,
                info.distribution or "not installed",
                info.version or "-",
                what,
                error,
            )

    def _caller_for(self, hook_name: str, plugin: object) -> Any:
        """A hook caller that reaches ``plugin``'s implementation and every wrapper only."""
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        if not any(i.plugin is plugin and not _is_wrapper(i) for i in impls):
            return None
        others = {i.plugin for i in impls if i.plugin is not plugin and not _is_wrapper(i)}
        if not others:
            return getattr(self.pm.hook, hook_name)
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)

    def _collect(self) -> None:
        for name in list(self.infos):
            plugin = self.pm.get_plugin(name)
            if plugin is None or self.infos[name].status != "loaded":
                continue
            found: list[tuple[str, type[Component]]] = []
            try:
                for hook_name, (label, base) in _CATEGORIES.items():
                    caller = self._caller_for(hook_name, plugin)
                    if caller is not None:
                        found += [
                            (label, cls)
                            for cls in self._call_register(name, hook_name, caller, label, base)
                        ]
            except PluginFailed as exc:
                self._fail(name, str(exc))
                continue
            for label, cls in found:
                # Check kinds are keyed by kind: many [checks.<name>] sections share one.
                is_check = issubclass(cls, Check)
                table = self.check_kinds if is_check else self.components
                section = cls.name if is_check else cls.section_for()
                other = table.get(section)
                if other is not None:
                    raise PluginError(
                        f"{label} {cls.name!r} is registered twice: by plugin {other.plugin!r} "
                        f"and by plugin {name!r}"
                    )
                table[section] = Registered(cls, name, label)
                self.infos[name].provides.setdefault(label, []).append(cls.name)

    def _call_register(
        self, plugin: str, hook_name: str, caller: Any, label: str, base: type[Component]
    ) -> list[type[Component]]:
        """Call one plugin's ``register_*`` hook; its classes, checked."""
        found: list[type[Component]] = []
        errors: list[PluginError] = []
        open_ = [True]

        def register(cls: type[Component]) -> None:
            if not open_[0]:  # a hook thread that overran and woke up later
                raise PluginError(f"plugin {plugin!r}: {hook_name} has already returned")
            if not (isinstance(cls, type) and issubclass(cls, base)):
                errors.append(PluginError(
                    f"plugin {plugin!r} registered {cls!r} as a {label}; "
                    f"it must be a subclass of healthmesh.{base.__name__}"
                ))
                raise errors[-1]
            if not getattr(cls, "name", None):
                errors.append(PluginError(f"plugin {plugin!r}: {label} {cls.__name__} has no name"))
                raise errors[-1]
            found.append(cls)

        if plugin in _HUNG:
            raise PluginFailed(_HUNG[plugin])
        try:
            call_with_deadline(lambda: caller(register=register), HOOK_DEADLINE, hook_name)
        except PluginFailed as exc:
            _HUNG[plugin] = str(exc)
            raise
        except BaseException as exc:
            if errors:
                raise errors[0] from None
            raise PluginFailed(f"{hook_name} raised {_describe(exc)}") from None
        finally:
            open_[0] = False
        if errors:  # the plugin caught our error and went on: still a broken registration
            raise errors[0]
        return found

    def add_commands(self, cli: Any) -> None:
        """Let every plugin add its sub-commands; one that raises or hangs is reported."""
        for name in list(self.infos):
            plugin = self.pm.get_plugin(name)
            if plugin is None or self.infos[name].status != "loaded":
                continue
            caller = self._caller_for("register_commands", plugin)
            if caller is None:
                continue
            try:
                if name in _HUNG:
                    raise PluginFailed(_HUNG[name])
                call_with_deadline(lambda c=caller: c(cli=cli), HOOK_DEADLINE, "register_commands")
            except PluginFailed as exc:
                _HUNG[name] = str(exc)
                self._fail(name, str(exc))
            except BaseException as exc:
                key = (name, f"commands: {_describe(exc)}")
                if key not in _REPORTED:
                    _REPORTED.add(key)
                    logger.warning(
                        "plugin {!r} failed to add its commands: {}", name, _describe(exc)
                    )

    # -- queries ------------------------------------------------------------------------

    def of(self, base: type[Component]) -> dict[str, Registered]:
        """Registered components of one category, by section."""
        return {s: r for s, r in self.components.items() if issubclass(r.cls, base)}

    def console_outputs(self) -> list[str]:
        """Names of the outputs that ``run -o NAME`` can render on stdout."""
        return sorted(r.cls.name for r in self.of(Output).values() if r.cls.console)

    def listing(self) -> list[dict[str, Any]]:
        """Every plugin, loaded or not, as plain dicts."""
        return [info.as_dict() for info in sorted(self.infos.values(), key=lambda i: i.name)]

    def failed(self) -> list[PluginInfo]:
        """Plugins whose import or hooks failed."""
        return [i for i in self.infos.values() if i.status == "failed"]

    def blocked(self) -> list[PluginInfo]:
        """Plugins blocked by name."""
        return [i for i in self.infos.values() if i.status == "blocked"]


def _is_wrapper(impl: pluggy.HookImpl) -> bool:
    return bool(impl.hookwrapper or getattr(impl, "wrapper", False))


def load_plugins(
    disabled: set[str] | None = None, extra: dict[str, ModuleType] | None = None
) -> PluginRegistry:
    """A registry with every installed plugin loaded, minus the blocked ones."""
    blocked = disabled_from_env() | (disabled or set())
    return PluginRegistry().load(blocked, extra)
