"""Environment substitution in config string values: ``${VAR}``, ``${VAR:-default}``, ``$$``.

Applied to the parsed TOML document (string values only, never keys), so a substituted value
can never change the document's structure, and an error can name the key it is under. This is
how one ConfigMap serves every node of a Kubernetes cluster: ``name = "${NODE_NAME}"`` with
``NODE_NAME`` set from the downward API.

- ``${VAR}``: the variable's value; unset is an error naming the file, key and variable.
  Set but empty is taken as it is (the key's own validation then rejects it if needed).
- ``${VAR:-default}``: the default when the variable is unset or empty.
- ``$$``: a literal ``$``. A ``$`` followed by anything else is kept as it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

#: A substituted value longer than this is an error (a runaway variable, not a config value).
MAX_VALUE_CHARS = 65536

_TOKEN = re.compile(r"\$(\$|\{([^}]*)\}|\{)")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EnvSubstError(ValueError):
    """A substitution problem, worded ``key: problem`` (the caller prefixes the file)."""


def substitute_env(data: Any, env: Mapping[str, str] | None = None, where: str = "") -> Any:
    """``data`` (parsed TOML) with every string value substituted; raises EnvSubstError."""
    environ = os.environ if env is None else env
    if isinstance(data, str):
        return _substitute(data, environ, where)
    if isinstance(data, dict):
        return {
            k: substitute_env(v, environ, f"{where}.{k}" if where else str(k))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [substitute_env(v, environ, f"{where}[{i}]") for i, v in enumerate(data)]
    return data


def _substitute(text: str, env: Mapping[str, str], where: str) -> str:
    if "$" not in text:
        return text
    def one(m: re.Match[str]) -> str:
        if m.group(1) == "$":
            return "$"
        if m.group(1) == "{":
            raise EnvSubstError(f"{where}: unterminated '${{' (write '$$' for a literal '$')")
        body = m.group(2)
        name, sep, default = body.partition(":-")
        if not _NAME.match(name):
            raise EnvSubstError(
                f"{where}: '${{{body}}}' is not a variable reference "
                "(${NAME} or ${NAME:-default}; write '$$' for a literal '$')"
            )
        value = env.get(name)
        if sep and not value:
            return default
        if value is None:
            raise EnvSubstError(
                f"{where}: environment variable {name} is not set "
                f"(referenced as ${{{name}}}; use ${{{name}:-default}} for a fallback)"
            )
        return value

    out = _TOKEN.sub(one, text)
    if len(out) > MAX_VALUE_CHARS:
        raise EnvSubstError(f"{where}: value is longer than {MAX_VALUE_CHARS} characters")
    return out
