"""Docs stay true: every hook is documented with its exact arguments."""

from __future__ import annotations

import inspect
import re

from healthmesh.core import hookspecs
from tests.conftest import ROOT


def hook_specs() -> dict[str, str]:
    specs = {}
    for name, fn in vars(hookspecs).items():
        if callable(fn) and hasattr(fn, "healthmesh_spec"):
            params = ", ".join(inspect.signature(fn).parameters)
            specs[name] = f"{name}({params})"
    return specs


def test_every_hook_is_documented_with_its_exact_signature() -> None:
    doc = (ROOT / "docs" / "plugin-hooks.md").read_text()
    documented = re.findall(r"^## `(\w+\([^)]*\))`", doc, flags=re.M)
    specs = hook_specs()
    assert specs, "no hook specs found"
    assert sorted(documented) == sorted(specs.values())


def test_every_hook_spec_has_a_full_docstring() -> None:
    for name, fn in vars(hookspecs).items():
        if callable(fn) and hasattr(fn, "healthmesh_spec"):
            doc = inspect.getdoc(fn) or ""
            assert "Called" in doc and ":param" in doc and ":return:" in doc, name
