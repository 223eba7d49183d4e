"""The annotated example config shows every key of the core and of every built-in plugin."""

from __future__ import annotations

import re

import msgspec

from healthmesh.core.config import CoreSettings
from healthmesh.core.plugins import load_plugins
from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "healthmesh.toml"
SECTION = re.compile(r"^\[{1,2}([A-Za-z0-9_.]+)\]{1,2}")
KEY = re.compile(r"^([A-Za-z0-9_]+)\s*=")


def documented_keys() -> dict[str, set[str]]:
    """Keys per section, counting commented-out lines (``# key = value``) too."""
    keys: dict[str, set[str]] = {}
    section = ""
    for raw in EXAMPLE.read_text().splitlines():
        line = raw.lstrip("# ").strip() if raw.startswith("#") else raw.strip()
        if m := SECTION.match(line):
            section = m.group(1)
            keys.setdefault(section, set())
            parent, _, last = section.rpartition(".")
            if line.startswith("[[") and parent:  # an array of tables is a key of its parent
                keys.setdefault(parent, set()).add(last)
        elif (m := KEY.match(line)) and section:
            keys[section].add(m.group(1))
    return keys


def fields(struct: type) -> set[str]:
    return {f.name for f in msgspec.structs.fields(struct)}


def test_example_shows_every_core_key() -> None:
    keys = documented_keys()
    for f in msgspec.structs.fields(CoreSettings):
        missing = fields(f.type) - keys.get(f.name, set())
        assert not missing, f"[{f.name}] lacks {sorted(missing)} in {EXAMPLE.name}"


def test_example_shows_every_key_of_every_builtin_plugin() -> None:
    keys = documented_keys()
    registry = load_plugins()
    builtin = {i.name for i in registry.infos.values() if i.builtin}
    checked = 0
    for section, reg in registry.components.items():
        if reg.plugin not in builtin:
            continue
        missing = fields(reg.cls.Settings) - keys.get(section, set())
        assert not missing, f"[{section}] lacks {sorted(missing)} in {EXAMPLE.name}"
        checked += 1
    assert checked >= 6
