"""The connection to an etcd cluster: endpoints, TLS files, username and password."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any
from urllib.parse import urlsplit

from healthmesh import Settings


class TlsSettings(Settings):
    """``tls = {ca, cert, key}``: CA bundle to verify etcd, and a client certificate and key."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Connection:
    """Everything needed to talk to one etcd cluster."""

    endpoints: tuple[str, ...]
    timeout: float
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = None
    password_file: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for https endpoints (None when every endpoint is plain http)."""
        if not any(e.startswith("https://") for e in self.endpoints):
            return None
        ctx = ssl.create_default_context(cafile=self.ca)
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def read_password(self) -> str | None:
        """The password, from the config or from ``password_file`` (trailing newline removed)."""
        if self.password_file is None:
            return self.password
        with open(self.password_file, encoding="utf-8") as fh:
            return fh.read(4096).rstrip("\r\n")


def connection_from(settings: Any, config_path: str) -> Connection:
    """A ``Connection`` from any settings with the connection keys; paths are config-relative."""
    tls = settings.tls
    return Connection(
        endpoints=tuple(e.rstrip("/") for e in settings.endpoints),
        timeout=float(settings.timeout),
        ca=_resolve(tls.ca, config_path),
        cert=_resolve(tls.cert, config_path),
        key=_resolve(tls.key, config_path),
        username=settings.username,
        password=settings.password,
        password_file=_resolve(settings.password_file, config_path),
    )


def check_connection(settings: Any, config_path: str, where: str = "") -> None:
    """Validate the connection keys; ValueError names the key (``where`` is prepended)."""
    if not settings.endpoints:
        raise ValueError(f"{where}endpoints: list at least one etcd endpoint")
    for i, endpoint in enumerate(settings.endpoints):
        problem = _endpoint_problem(endpoint)
        if problem:
            raise ValueError(f"{where}endpoints[{i}]: {endpoint!r}: {problem}")
    if settings.timeout <= 0:
        raise ValueError(f"{where}timeout: must be greater than zero")
    tls = settings.tls
    if (tls.cert is None) != (tls.key is None):
        missing = "key" if tls.key is None else "cert"
        raise ValueError(f"{where}tls.{missing}: a client certificate needs both cert and key")
    uses_tls = any(tls_value is not None for tls_value in (tls.ca, tls.cert, tls.key))
    if uses_tls and not all(e.startswith("https://") for e in settings.endpoints):
        raise ValueError(f"{where}tls: set, but not every endpoint is https://")
    for name in ("ca", "cert", "key"):
        _check_file(getattr(tls, name), config_path, f"{where}tls.{name}")
    if settings.password is not None and settings.password_file is not None:
        raise ValueError(f"{where}password_file: give password or password_file, not both")
    has_password = settings.password is not None or settings.password_file is not None
    if settings.username is not None and not settings.username:
        raise ValueError(f"{where}username: must not be empty")
    if has_password and settings.username is None:
        raise ValueError(f"{where}username: required with a password")
    if settings.username is not None and not has_password:
        raise ValueError(f"{where}password: required with a username (or password_file)")
    _check_file(settings.password_file, config_path, f"{where}password_file")


def check_prefix(prefix: str, where: str = "prefix") -> None:
    """A key prefix: non-empty, no leading or trailing slash, no empty segment."""
    if not prefix or prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
        raise ValueError(f"{where}: {prefix!r}: use segments like \"healthmesh\", no outer slashes")


def _endpoint_problem(endpoint: str) -> str | None:
    try:
        url = urlsplit(endpoint)
        port = url.port
    except ValueError as exc:
        return str(exc)
    if url.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not url.hostname:
        return "has no host"
    if port is None:
        return "has no port (etcd's client port is usually 2379)"
    if url.path not in ("", "/") or url.query or url.fragment:
        return "must be scheme://host:port, without a path"
    return None


def _resolve(path: str | None, config_path: str) -> str | None:
    if path is None:
        return None
    p = FsPath(path)
    if not p.is_absolute():
        p = FsPath(config_path).resolve().parent / p
    return str(p)


def _check_file(path: str | None, config_path: str, key: str) -> None:
    resolved = _resolve(path, config_path)
    if resolved is None:
        return
    if not os.path.isfile(resolved):
        raise ValueError(f"{key}: {resolved}: no such file")
    if not os.access(resolved, os.R_OK):
        raise ValueError(f"{key}: {resolved}: permission denied")
