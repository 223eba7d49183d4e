"""Deferred imports (healthmesh.lazy_import): libraries a plugin seldom needs load on first use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from healthmesh import lazy_import
from tests.conftest import ROOT
from tests.test_plugins import fake_distribution, plugins_json

#: What a fresh agent process has imported once every installed plugin is loaded.
LOADED = """
import json, sys
from healthmesh.core.plugins import load_plugins
import healthmesh.cli
registry = load_plugins()
NAMES = ("httpx", "dns.message", "rich.table", "yaml", "prometheus_client")
before = {m: m in sys.modules for m in NAMES}
import healthmesh.plugins.webhook.output as webhook
import healthmesh.plugins.checks.dns as dns_check
import healthmesh.core.render as render
webhook.httpx.AsyncClient, dns_check.dns.message.make_query, render._rich.table.Table
after = {m: m in sys.modules for m in before}
print(json.dumps({"before": before, "after": after}))
"""


def test_an_agent_does_not_load_the_libraries_of_unused_plugins_until_they_run() -> None:
    proc = subprocess.run([sys.executable, "-c", LOADED], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert not any(got["before"].values()), got["before"]
    # The first use loads the library (with the submodules the plugin named) as before.
    assert got["after"] == {"httpx": True, "dns.message": True, "rich.table": True,
                            "yaml": False, "prometheus_client": False}


def test_a_missing_library_fails_at_lazy_import_naming_it() -> None:
    with pytest.raises(ModuleNotFoundError, match="'no_such_lib_hm'") as exc:
        lazy_import("no_such_lib_hm.sub")
    assert exc.value.name == "no_such_lib_hm"


def test_the_first_attribute_read_imports_once_and_reads_through() -> None:
    mod = lazy_import("json", "decoder")
    assert "not loaded" in repr(mod)
    assert mod.dumps([1]) == "[1]"
    assert mod.decoder.JSONDecodeError is json.decoder.JSONDecodeError
    assert "loaded" in repr(mod) and "not" not in repr(mod)
    with pytest.raises(AttributeError):
        _ = mod.no_such_function


LAZY_MISSING_PLUGIN = """
from healthmesh import lazy_import
frob = lazy_import("libfrobnicate_hm")
"""


def test_a_plugin_whose_lazy_library_is_missing_is_reported_at_load(tmp_path: Path) -> None:
    site = tmp_path / "site"
    fake_distribution(site, "healthmesh-frob", "frob", "hm_frob", LAZY_MISSING_PLUGIN)
    frob = plugins_json({"PYTHONPATH": str(site)})["frob"]
    assert frob["status"] == "failed" and "libfrobnicate_hm" in frob["error"]
