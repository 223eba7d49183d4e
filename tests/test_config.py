"""Config validation: every broken config gives exit 2 and a short message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

VALID = """
[node]
name = "n1"
addresses = ["127.0.0.1"]

[probing]
interval = "2s"
timeout = "500ms"

[sources.static]
nodes = [{name = "n2", addresses = ["127.0.0.2"]}]
"""

BROKEN = [
    # (what is wrong, config text, text the message must contain)
    ("unknown top-level key", VALID + "\n[frobnicate]\nx = 1\n", "frobnicate: unknown key"),
    ("unknown key in a core section", VALID.replace('timeout = "500ms"',
     'timeout = "500ms"\ntimout = "1s"'), "probing.timout: unknown key"),
    ("wrong type", VALID.replace('interval = "2s"', "interval = 2"), "probing.interval"),
    ("bad duration", VALID.replace('"2s"', '"2 seconds"'), "probing.interval"),
    ("timeout longer than interval", VALID.replace('"500ms"', '"5s"'), "probing.timeout"),
    ("bad IP address", VALID.replace('"127.0.0.2"', '"127.0.0.256"'),
     "sources.static.nodes[0].addresses[0]"),
    ("duplicate node names", VALID.replace(
        'nodes = [{name = "n2", addresses = ["127.0.0.2"]}]',
        'nodes = [{name = "n2", addresses = ["127.0.0.2"]},'
        ' {name = "n2", addresses = ["127.0.0.3"]}]'),
     "sources.static.nodes[1].name: duplicate node name 'n2'"),
    ("empty peer set", VALID.replace(
        'nodes = [{name = "n2", addresses = ["127.0.0.2"]}]', "nodes = []"),
     "sources.static.nodes: empty peer set"),
    ("no peer source at all", VALID.split("[sources.static]")[0], "empty peer set"),
    ("unknown probe kind", VALID + "\n[probes.smoke]\nport = 1\n",
     "probes.smoke: unknown probe kind 'smoke'"),
    ("unknown key in a plugin section", VALID + "\n[probes.tcp]\nprot = 22\n",
     "probes.tcp.prot: unknown key"),
    ("plugin value out of range", VALID + "\n[probes.tcp]\nport = 70000\n", "probes.tcp.port"),
    ("node without addresses", VALID.replace('addresses = ["127.0.0.1"]\n', ""),
     "node.addresses"),
    ("threshold below one", VALID.replace('timeout = "500ms"',
     'timeout = "500ms"\nfailure_threshold = 0'), "probing.failure_threshold"),
    ("invalid TOML", VALID + "\n[probing\n", "invalid TOML"),
    ("node name with a slash", VALID.replace('name = "n1"', 'name = "a/b"'), "node.name"),
    ("missing required key", VALID + "\n[sources.file]\npoll = \"1s\"\n",
     "sources.file.path: required key is missing"),
    ("peer without addresses", VALID.replace(
        'nodes = [{name = "n2", addresses = ["127.0.0.2"]}]', 'nodes = [{name = "n2"}]'),
     "sources.static.nodes[0].addresses"),
    ("bad log level", VALID + '\n[log]\nlevel = "LOUD"\n', "log.level"),
]


@pytest.mark.parametrize(("what", "text", "needle"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_exits_2_naming_the_key(
    tmp_path: Path, what: str, text: str, needle: str
) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text(text)
    proc = run_cli("config", "check", "-c", str(cfg))
    assert proc.returncode == 2, (what, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) <= 2, err
    assert str(cfg) in err, err
    assert needle in err, err


def test_run_rejects_the_same_broken_config(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text(VALID.replace('"2s"', '"fast"'))
    proc = run_cli("run", "-c", str(cfg), "--once")
    assert proc.returncode == 2 and "probing.interval" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    proc = run_cli("config", "check", "-c", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2
    assert "nope.toml" in proc.stderr and "Traceback" not in proc.stderr


def test_valid_config_checks_ok_and_shows_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.toml"
    cfg.write_text(VALID)
    proc = run_cli("config", "check", "-c", str(cfg), "--show")
    assert proc.returncode == 0, proc.stderr
    assert 'failure_threshold = 9' in proc.stdout
    assert 'interval = "2s"' in proc.stdout


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_examples_are_valid(example: Path) -> None:
    proc = run_cli("config", "check", "-c", str(example))
    assert proc.returncode == 0, proc.stderr
