"""Deferred imports: a module object that imports its library on first attribute use.

Plugins are all imported at start-up, configured or not; a library only a few of them use
(httpx for the kubernetes and etcd sources and the webhook, dnspython for the dns check,
rich for the table) is loaded when that code first runs instead, which keeps those
megabytes out of every agent that does not use them (docs/benchmarks.md, "Whole agent").
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for module ``name``; the first attribute read imports it (once, thread-safe)."""

    __slots__ = ("_module", "_name", "_submodules")

    def __init__(self, name: str, submodules: tuple[str, ...] = ()) -> None:
        self._name = name
        self._submodules = submodules
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            # import_module holds the import lock: two threads importing at once get one module.
            for sub in self._submodules:  # a package's submodules become its attributes
                importlib.import_module(f"{self._name}.{sub}")
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r}, {state}>"


def lazy_import(name: str, *submodules: str) -> Any:
    """``name`` imported when first used; a library that is not installed fails here, now.

    ``submodules`` of a package are imported along with it (``lazy_import("dns", "message")``
    stands for ``import dns.message``).

    The check is the import system's own lookup (no code of the library runs), so a missing
    dependency still stops the plugin at load time with ``ModuleNotFoundError`` naming it,
    as a plain ``import`` would, rather than later in the middle of a probe round.
    """
    top = name.partition(".")[0]
    if importlib.util.find_spec(top) is None:
        raise ModuleNotFoundError(f"No module named {top!r}", name=top)
    return LazyModule(name, submodules)
