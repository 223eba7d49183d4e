"""Plugin discovery, listing, blocking, failures and the third-party example plugin."""

from __future__ import annotations

import json
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from healthmesh import ComponentSettings, Probe, hookimpl
from healthmesh.core.plugins import PluginError, PluginRegistry
from tests.conftest import run_cli

CONFIG = """
[node]
name = "me"
addresses = ["127.0.0.1"]
[probing]
interval = "1s"
timeout = "500ms"
[plugins]
disable = ["icmp", "http"]
[sources.static]
nodes = [{{name = "peer", addresses = ["127.0.0.2"]}}]
{extra}
"""


def fake_distribution(site: Path, dist: str, entry: str, module: str, code: str) -> None:
    """A real installed distribution (dist-info + module) on a directory for PYTHONPATH."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[healthmesh]\n{entry} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(code))


@pytest.fixture
def listener() -> Iterator[int]:
    """A real TCP listener on every loopback address; yields its port."""
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen(64)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def plugins_json(env: dict[str, str] | None = None) -> dict[str, dict]:
    proc = run_cli("plugins", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return {p["name"]: p for p in json.loads(proc.stdout)}


def test_builtin_plugins_load_through_entry_points() -> None:
    listing = plugins_json()
    for name, provides in {
        "static": "peer source", "file": "peer source", "table": "output", "json": "output",
    }.items():
        p = listing[name]
        assert p["builtin"] and p["distribution"] == "healthmesh" and p["status"] == "loaded"
        assert provides in p["provides"], p
        assert p["hooks"], p


def test_third_party_tcp_plugin_is_listed() -> None:
    tcp = plugins_json()["tcp"]
    assert tcp["distribution"] == "healthmesh-tcp"
    assert tcp["builtin"] is False
    assert tcp["provides"] == {"probe kind": ["tcp"]}
    assert tcp["hooks"] == ["register_probe_kinds"]


def test_plugins_table_lists_the_tcp_plugin() -> None:
    proc = run_cli("plugins", env={"COLUMNS": "200"})
    assert proc.returncode == 0
    assert "healthmesh-tcp" in proc.stdout


def test_config_using_tcp_probes_with_it(tmp_path: Path, listener: int) -> None:
    cfg = tmp_path / "tcp.toml"
    cfg.write_text(CONFIG.format(extra=f"[probes.tcp]\nport = {listener}\n"))
    proc = run_cli("run", "-c", str(cfg), "--once", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    snap = json.loads(proc.stdout)
    assert snap["probe_kinds"] == ["tcp"]
    peer = snap["nodes"][1]
    result = peer["paths"][0]["probes"]["tcp"]
    assert result["state"] == "reachable" and 0 < result["rtt_ms"] < 100


def test_blocking_the_tcp_plugin_removes_it(tmp_path: Path, listener: int) -> None:
    env = {"HEALTHMESH_DISABLE_PLUGINS": "tcp"}
    tcp = plugins_json(env)["tcp"]
    assert tcp["status"] == "blocked" and tcp["provides"] == {}
    cfg = tmp_path / "tcp.toml"
    cfg.write_text(CONFIG.format(extra=f"[probes.tcp]\nport = {listener}\n"))
    proc = run_cli("run", "-c", str(cfg), "--once", "-o", "json", env=env)
    assert proc.returncode == 2
    assert "probes.tcp" in proc.stderr and "blocked" in proc.stderr


def test_blocking_by_config_key(tmp_path: Path, listener: int) -> None:
    cfg = tmp_path / "tcp.toml"
    cfg.write_text(
        CONFIG.replace('disable = ["icmp", "http"]', 'disable = ["icmp", "http", "tcp"]')
        .format(extra=f"[probes.tcp]\nport = {listener}\n")
    )
    proc = run_cli("config", "check", "-c", str(cfg))
    assert proc.returncode == 2 and "blocked" in proc.stderr


BROKEN_PLUGIN = """
raise ImportError("needs libfrobnicate")
"""


def test_a_plugin_that_fails_to_import_is_reported_and_skipped(
    tmp_path: Path, listener: int
) -> None:
    site = tmp_path / "site"
    fake_distribution(site, "healthmesh-frob", "frob", "hm_frob", BROKEN_PLUGIN)
    env = {"PYTHONPATH": str(site)}
    frob = plugins_json(env)["frob"]
    assert frob["status"] == "failed" and "libfrobnicate" in frob["error"]
    assert frob["distribution"] == "healthmesh-frob"

    cfg = tmp_path / "ok.toml"
    cfg.write_text(CONFIG.format(extra=f"[probes.tcp]\nport = {listener}\n"))
    proc = run_cli("run", "-c", str(cfg), "--once", "-o", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "frob" in proc.stderr and "failed to load" in proc.stderr

    cfg.write_text(CONFIG.format(extra="[probes.frob]\nlevel = 3\n"))
    proc = run_cli("run", "-c", str(cfg), "--once", env=env)
    assert proc.returncode == 2
    assert "probes.frob" in proc.stderr and "libfrobnicate" in proc.stderr
    assert "Traceback" not in proc.stderr


DUPLICATE_TCP = """
from healthmesh import Probe, hookimpl

class OtherTcp(Probe):
    name = "tcp"

@hookimpl
def register_probe_kinds(register):
    register(OtherTcp)
"""


def test_a_duplicate_kind_is_a_startup_error_naming_both_plugins(tmp_path: Path) -> None:
    site = tmp_path / "site"
    fake_distribution(site, "healthmesh-tcp2", "tcp2", "hm_tcp2", DUPLICATE_TCP)
    proc = run_cli("plugins", env={"PYTHONPATH": str(site)})
    assert proc.returncode == 2
    assert "'tcp'" in proc.stderr and "'tcp2'" in proc.stderr
    assert "Traceback" not in proc.stderr


class Misspelled:
    @hookimpl
    def register_probe_kind(self, register):  # type: ignore[no-untyped-def]
        """Not a hook: the spec is register_probe_kinds."""


def test_a_hook_implementation_without_spec_is_an_error() -> None:
    with pytest.raises(PluginError, match=r"misspelled.*register_probe_kind"):
        PluginRegistry().load(extra={"misspelled": Misspelled()})


class NotAProbe:
    @hookimpl
    def register_probe_kinds(self, register):  # type: ignore[no-untyped-def]
        register(dict)


def test_registering_something_that_is_not_a_probe_is_an_error() -> None:
    with pytest.raises(PluginError, match=r"must be a subclass of healthmesh\.Probe"):
        PluginRegistry().load(extra={"notaprobe": NotAProbe()})


class Settings2(ComponentSettings):
    depth: int = 1


class Inline:
    class Deep(Probe):
        name = "deep"
        Settings = Settings2

    @hookimpl
    def register_probe_kinds(self, register):  # type: ignore[no-untyped-def]
        register(self.Deep)


def test_inline_plugins_register_like_installed_ones() -> None:
    reg = PluginRegistry().load(extra={"inline": Inline()})
    assert reg.components["probes.deep"].plugin == "inline"
    assert {p["name"] for p in reg.listing()} >= {"inline", "static", "tcp"}
