"""The core never imports a plugin; a plugin imports only the public API and its own modules."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PKG = ROOT / "healthmesh"


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def test_the_core_never_imports_a_plugin() -> None:
    for path in (PKG / "core").rglob("*.py"):
        bad = [m for m in imported_modules(path) if m.startswith("healthmesh.plugins")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_plugins_import_only_the_public_api() -> None:
    checked = 0
    for path in (PKG / "plugins").rglob("*.py"):
        rel = path.relative_to(PKG / "plugins").parts
        own = "healthmesh.plugins." + ".".join(rel[:-1] or [rel[0].removesuffix(".py")])
        if rel[0] in ("sources", "outputs"):  # one module, or one package, per plugin here
            own = "healthmesh.plugins." + rel[0] + "." + rel[1].removesuffix(".py")
        for mod in imported_modules(path):
            if mod == "healthmesh" or not mod.startswith("healthmesh"):
                continue
            assert mod.startswith(own), f"{path.relative_to(ROOT)} imports {mod}"
        checked += 1
    assert checked >= 10
