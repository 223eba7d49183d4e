"""``${VAR}`` substitution in config string values (healthmesh/core/envsubst.py)."""

from __future__ import annotations

import pytest

from healthmesh.core.config import ConfigError, parse_raw
from healthmesh.core.envsubst import EnvSubstError, substitute_env

ENV = {"NODE_NAME": "worker-1", "HOST_IP": "10.0.0.7", "EMPTY": ""}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${NODE_NAME}", "worker-1"),
        ("node-${NODE_NAME}.${HOST_IP}", "node-worker-1.10.0.0.7"),
        ("${MISSING:-fallback}", "fallback"),
        ("${EMPTY:-fallback}", "fallback"),  # :- also covers set-but-empty
        ("${EMPTY}", ""),
        ("${MISSING:-}", ""),
        ("$$", "$"),
        ("$${NODE_NAME}", "${NODE_NAME}"),  # escaped: not substituted
        ("pa$$word", "pa$word"),
        ("cost $5", "cost $5"),  # a lone $ stays
        ("no dollars", "no dollars"),
    ],
)
def test_substitution(text: str, expected: str) -> None:
    assert substitute_env(text, ENV) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${MISSING}", "x: environment variable MISSING is not set"),
        ("${NODE_NAME", "x: unterminated '${'"),
        ("${1BAD}", "x: '${1BAD}' is not a variable reference"),
        ("${}", "x: '${}' is not a variable reference"),
    ],
)
def test_errors_name_the_key_and_the_variable(text: str, message: str) -> None:
    with pytest.raises(EnvSubstError) as err:
        substitute_env(text, ENV, "x")
    assert str(err.value).startswith(message)


def test_only_string_values_are_substituted_and_errors_carry_the_key_path() -> None:
    data = {"${NODE_NAME}": 1, "n": {"list": ["a", "${HOST_IP}"], "port": 5, "on": True}}
    out = substitute_env(data, ENV)
    assert out == {"${NODE_NAME}": 1, "n": {"list": ["a", "10.0.0.7"], "port": 5, "on": True}}
    with pytest.raises(EnvSubstError, match=r"^n\.list\[1\]: environment variable X"):
        substitute_env({"n": {"list": ["a", "${X}"]}}, {})


def test_a_value_cannot_change_the_document_structure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", 'evil"\n[probing]\ninterval = "1ms')
    with pytest.raises(ConfigError, match=r"^<config>: node\.name: .* is not a valid name"):
        parse_raw('[node]\nname = "${NODE_NAME}"\naddresses = ["127.0.0.1"]\n')


def test_the_loader_substitutes_and_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HM_TEST_NAME", "n7")
    monkeypatch.setenv("HM_TEST_IP", "127.0.0.7")
    monkeypatch.delenv("HM_TEST_UNSET", raising=False)
    raw = parse_raw(
        '[node]\nname = "${HM_TEST_NAME}"\naddresses = ["${HM_TEST_IP}"]\n'
        'cluster = "${HM_TEST_UNSET:-default}"\n',
        "f.toml",
    )
    assert (raw.core.node.name, raw.core.node.addresses, raw.core.node.cluster) == (
        "n7",
        ["127.0.0.7"],
        "default",
    )
    with pytest.raises(ConfigError, match=r"^f\.toml: node\.name: environment variable"):
        parse_raw('[node]\nname = "${HM_TEST_UNSET}"\n', "f.toml")
