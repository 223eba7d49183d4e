"""Built-in service-check kinds: ``dns``, ``tcp``, ``http`` and ``https`` (docs/checks.md).

Each kind is its own plugin (``check-dns``, ``check-tcp``, ``check-http``), so one can be
blocked by name without the others.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

_HOST_RE = re.compile(r"^(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)+$")
MAX_TARGETS = 100


def valid_hostname(name: str) -> bool:
    """A DNS name: labels of letters, digits, '-' and '_', 1–63 long, 253 in all."""
    return bool(_HOST_RE.match(name)) and ".." not in name


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or (with a default port) ``host``; ValueError says why."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{text!r} is not host:port")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']'")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [address]:port")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:  # a bare IPv6 address
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r}: a port is required (host:port)")
        port = default_port
    else:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: port must be between 1 and 65535")
        port = int(port_text)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not valid_hostname(host):
            raise ValueError(f"{text!r}: {host!r} is not an IP address or a host name") from None
    return host, port


def config_relative(path: str, config: object) -> str:
    """``path`` made absolute against the directory of the config file (as file paths are)."""
    if os.path.isabs(path):
        return path
    config_path = getattr(config, "path", None) or "."
    return str(Path(config_path).resolve().parent / path)


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
