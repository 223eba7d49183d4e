"""``[checks.<name>]`` sections are validated like every section: clear errors, no tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from healthmesh.core.config import ConfigError
from healthmesh.core.resolve import effective, resolve
from tests.checks_support import resolve_text
from tests.conftest import run_cli

DNS = """
[checks.cluster-dns]
kind = "dns"
server = "10.96.0.10:53"
names = ["kubernetes.default.svc.cluster.local"]
"""


def test_defaults_come_from_probing_and_the_no_flap_rule() -> None:
    config = resolve_text(DNS + '[checks.api]\nkind = "tcp"\ntargets = ["10.96.0.1:443"]\n'
                          'interval = "10s"\ntimeout = "3s"\nconfirm_checks = 4\n')
    dns_settings = config.checks["cluster-dns"]
    assert dns_settings.interval == 2.0 and dns_settings.timeout == 1.0  # [probing]
    assert dns_settings.failure_threshold == 3  # 1 + confirm_checks (2)
    assert dns_settings.expect == "any"
    api = config.checks["api"]
    assert (api.interval, api.timeout, api.failure_threshold) == (10.0, 3.0, 5)
    shown = effective(config)["checks"]
    assert shown["api"]["interval"] == "10s" and shown["cluster-dns"]["kind"] == "dns"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[checks.x]\nnames = []\n", "checks.x.kind: required key is missing"),
        ('[checks.x]\nkind = "smtp"\n', "checks.x.kind: unknown check kind 'smtp' (known: dns, "
                                         "http, https, tcp)"),
        ('[checks.x]\nkind = 3\n', "checks.x.kind: expected a string, got 3"),
        (DNS + "colour = 1\n", "checks.cluster-dns.colour: unknown key"),
        ('[checks.x]\nkind = "dns"\n', "checks.x.names: required key is missing"),
        (DNS + 'interval = "1ms"\n', "checks.cluster-dns.interval: must be between 100ms and 24h"),
        (DNS + 'interval = "25h"\n',
         "checks.cluster-dns.interval: '25h' is longer than the limit of 24h"),
        (DNS + 'timeout = "5s"\n', "checks.cluster-dns.timeout: must not exceed the check's "
                                   "interval"),
        (DNS + 'interval = "5m"\ntimeout = "2m"\n', "checks.cluster-dns.timeout: must be between"),
        (DNS + "confirm_checks = 1000\n", "checks.cluster-dns.confirm_checks: must be between 0"),
        (DNS + "failure_threshold = 0\n", "checks.cluster-dns.failure_threshold: must be between"),
        (DNS + 'confirm_spacing = "1h"\n', "checks.cluster-dns.confirm_spacing: must be between"),
        (DNS + 'expect = "some"\n', "checks.cluster-dns.expect: 'some': use \"any\""),
        (DNS + 'expect = ["1.2.3"]\n', "checks.cluster-dns.expect[0]: '1.2.3' is not an IP"),
        (DNS + 'expect = ["::1"]\n', "checks.cluster-dns.expect[0]: ::1 is not an IPv4 address"),
        (DNS + 'record_type = "MX"\n', "checks.cluster-dns.record_type:"),
        ('[checks.x]\nkind = "dns"\nnames = ["a..b"]\n', "checks.x.names[0]: 'a..b' is not a DNS"),
        ('[checks.x]\nkind = "dns"\nnames = []\n', "checks.x.names: at least one name"),
        ('[checks.x]\nkind = "dns"\nnames = ["a", "a"]\n', "checks.x.names: duplicate name"),
        ('[checks.x]\nkind = "dns"\nnames = ["a"]\nserver = "dns.example:53"\n',
         "checks.x.server: 'dns.example:53': give the server's IP address"),
        ('[checks.x]\nkind = "dns"\nnames = ["a"]\nserver = "10.0.0.1:99999"\n',
         "port must be between 1 and 65535"),
        ('[checks.x]\nkind = "tcp"\ntargets = ["10.0.0.1"]\n',
         "checks.x.targets[0]: '10.0.0.1': a port is required"),
        ('[checks.x]\nkind = "tcp"\ntargets = []\n', "checks.x.targets: at least one target"),
        ('[checks.x]\nkind = "tcp"\ntargets = ["[::1]:80", "[::1]:80"]\n', "duplicate target"),
        ('[checks.x]\nkind = "https"\ntargets = ["http://a/"]\n',
         "checks.x.targets[0]: 'http://a/': the scheme must be https"),
        ('[checks.x]\nkind = "http"\ntargets = ["ftp://a/"]\n', "the scheme must be http or https"),
        ('[checks.x]\nkind = "http"\ntargets = ["http://u@a/"]\n', "no user info"),
        ('[checks.x]\nkind = "http"\ntargets = ["http://a/"]\nexpect_status = [700]\n',
         "checks.x.expect_status[0]: 700 is not an HTTP status"),
        ('[checks.x]\nkind = "https"\ntargets = ["https://a/"]\ninsecure = true\n'
         'ca_file = "/ca.pem"\n', "checks.x.insecure: cannot be combined with ca_file"),
        ('[checks."bad name"]\nkind = "tcp"\ntargets = ["a:1"]\n',
         "checks.bad name: invalid check name"),
        ('[checks]\nx = 1\n', "checks.x: must be a table, got int"),
    ],
)
def test_bad_check_sections_are_errors_naming_the_key(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_text(extra)
    text = str(info.value)
    assert text.startswith("test.toml: "), text
    assert message in text, text


def test_checks_must_be_a_table() -> None:
    from healthmesh.core.config import parse_raw
    from tests.checks_support import BASE, registry

    with pytest.raises(ConfigError, match="checks: must be a table of checks, got int"):
        resolve(parse_raw("checks = 1\n" + BASE, "test.toml"), registry())


def test_too_many_targets_and_checks_are_rejected() -> None:
    names = ", ".join(f'"n{i}.test"' for i in range(101))
    with pytest.raises(ConfigError, match="names: 101 names; at most 100"):
        resolve_text(f'[checks.x]\nkind = "dns"\nnames = [{names}]\n')
    many = "".join(f'[checks.c{i}]\nkind = "tcp"\ntargets = ["a:1"]\n' for i in range(257))
    with pytest.raises(ConfigError, match="257 checks; at most 256"):
        resolve_text(many)


def test_a_disabled_check_is_validated_but_not_kept() -> None:
    config = resolve_text(DNS + "enabled = false\n")
    assert config.checks == {}
    with pytest.raises(ConfigError, match="names"):
        resolve_text('[checks.x]\nkind = "dns"\nenabled = false\n')


def test_config_check_cli_names_the_key_and_exits_2(tmp_path: Path) -> None:
    from tests.checks_support import BASE

    path = tmp_path / "c.toml"
    path.write_text(BASE + DNS + 'timeout = "0s"\n')
    result = run_cli("config", "check", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"healthmesh: error: {path}: checks.cluster-dns.timeout: must be between 0s and 60s"
    )
    path.write_text(BASE + DNS)
    shown = run_cli("config", "check", "-c", str(path), "--show")
    assert shown.returncode == 0, shown.stderr
    assert "[checks.cluster-dns]" in shown.stdout and 'failure_threshold = 3' in shown.stdout


def test_blocked_check_plugin_is_named() -> None:
    from healthmesh.core.plugins import load_plugins

    reg = load_plugins({"check-dns"})
    with pytest.raises(ConfigError) as info:
        resolve_text(DNS, reg)
    assert "unknown check kind 'dns'" in str(info.value)
    assert "blocked plugins: check-dns" in str(info.value)


def test_file_paths_are_relative_to_the_config_file() -> None:
    config = resolve_text(
        '[checks.web]\nkind = "https"\ntargets = ["https://a/"]\nca_file = "ca.pem"\n'
        '[checks.sys]\nkind = "dns"\nnames = ["a"]\nresolv_conf = "/etc/resolv.conf"\n'
    )
    assert config.checks["web"].ca_file == str(Path("test.toml").resolve().parent / "ca.pem")
    assert config.checks["sys"].resolv_conf == "/etc/resolv.conf"


def test_example_config_shows_every_key_of_every_builtin_check_kind() -> None:
    import re

    import msgspec

    from healthmesh import CheckSettings
    from tests.checks_support import registry
    from tests.conftest import ROOT

    keys: dict[str, set[str]] = {}
    kinds: dict[str, str] = {}
    section = ""
    for raw in (ROOT / "examples" / "healthmesh.toml").read_text().splitlines():
        line = raw.lstrip("# ").strip()
        if m := re.match(r"^\[checks\.([A-Za-z0-9_.-]+)\]", line):
            section = m.group(1)
            keys[section] = set()
        elif line.startswith("["):
            section = ""
        elif section and (m := re.match(r"^([a-z_]+)\s*=\s*(\S+)", line)):
            keys[section].add(m.group(1))
            if m.group(1) == "kind":
                kinds[section] = m.group(2).strip('"')
    common = {f.name for f in msgspec.structs.fields(CheckSettings)}
    assert common <= set().union(*keys.values())
    builtin = [k for k, r in registry().check_kinds.items() if r.plugin.startswith("check-")]
    assert sorted(builtin) == ["dns", "http", "https", "tcp"]
    for kind, reg in registry().check_kinds.items():
        if kind not in builtin:
            continue
        # http and https share their keys; the example shows them on an https check.
        same = {kind, "https"} if kind == "http" else {kind}
        shown = set().union(*(keys[s] for s, k in kinds.items() if k in same))
        own = {f.name for f in msgspec.structs.fields(reg.cls.Settings)} - common
        assert own <= shown, f"kind {kind}: {sorted(own - shown)} not in the example"


def test_example_checks_section_is_valid_when_uncommented() -> None:
    import re

    from healthmesh.core.config import parse_raw
    from tests.checks_support import registry
    from tests.conftest import ROOT

    text = (ROOT / "examples" / "healthmesh.toml").read_text()
    head, sep, tail = text.partition("# --- service checks")
    assert sep
    tail = re.sub(r"(?m)^# (\[checks\.|[a-z_]+ = )", r"\1", tail)
    config = resolve(parse_raw(head + "#" + tail, "example.toml"), registry())
    assert sorted(config.checks) == ["apiserver", "apiserver-ready", "cluster-dns"]
    assert config.checks["apiserver-ready"].expect_status == [200, 401]
