"""``[outputs.metrics]``: where the Prometheus endpoint listens, what it exports, its limits."""

from __future__ import annotations

import ssl

from healthmesh import ComponentSettings, Duration, parse_listen

DEFAULT_LISTEN = "127.0.0.1:9967"


class MetricsSettings(ComponentSettings):
    """``[outputs.metrics]``: a Prometheus endpoint (``GET /metrics``) over TCP."""

    #: ``ADDR:PORT`` (IPv6 in brackets); ``0.0.0.0:9967`` to be scraped from other hosts.
    listen: str = DEFAULT_LISTEN
    #: Per-peer series (``healthmesh_peer_*``), off by default: one series per peer and kind.
    per_peer: bool = False
    #: At most this many peers get per-peer series; a warning is logged when the cap cuts.
    max_peers: int = 100
    #: Also export Cilium's ``cilium_node_health_connectivity_*`` series.
    cilium_compat: bool = False
    #: The library's process and Python runtime series (``process_*``, ``python_*``).
    process: bool = True
    #: Open connections at most; the oldest is closed to make room for a new one.
    max_connections: int = 16
    #: Time a client has to send a whole request head, and to read a response.
    header_timeout: Duration = Duration(5.0)
    #: Time a kept-alive connection may wait for its next request.
    idle_timeout: Duration = Duration(60.0)
    #: A rendered body is reused for this long, so a flood of scrapes cannot eat the CPU.
    cache: Duration = Duration(0.5)
    #: HTTP basic authentication: a user name, and a file holding the password (one line).
    #: Both empty (the default): no authentication.
    basic_auth_user: str = ""
    basic_auth_password_file: str = ""
    #: TLS: a PEM certificate (chain) file and its key file. Both empty: plain HTTP.
    tls_cert_file: str = ""
    tls_key_file: str = ""

    @classmethod
    def validate(cls, s: MetricsSettings) -> tuple[str, int]:
        """``(address, port)``; ValueError naming the key when a value cannot work."""
        try:
            pair = parse_listen(s.listen, example=DEFAULT_LISTEN)
        except ValueError as exc:
            raise ValueError(f"listen: {exc}") from None
        if s.max_peers < 1:
            raise ValueError("max_peers: must be at least 1")
        if s.max_connections < 1:
            raise ValueError("max_connections: must be at least 1")
        for key in ("header_timeout", "idle_timeout"):
            if getattr(s, key) <= 0:
                raise ValueError(f"{key}: must be greater than zero")
        if s.cache < 0:
            raise ValueError("cache: must not be negative")
        if bool(s.basic_auth_user) != bool(s.basic_auth_password_file):
            raise ValueError(
                "basic_auth_user and basic_auth_password_file: set both, or neither"
            )
        if ":" in s.basic_auth_user:
            raise ValueError("basic_auth_user: must not contain ':'")
        if s.basic_auth_password_file:
            read_password(s.basic_auth_password_file)
        if bool(s.tls_cert_file) != bool(s.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file: set both, or neither")
        if s.tls_cert_file:
            tls_context(s)
        return pair


def tls_context(s: MetricsSettings) -> ssl.SSLContext | None:
    """The server's TLS context (None without TLS); ValueError naming the key when unusable."""
    if not s.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(s.tls_cert_file, s.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"tls_cert_file/tls_key_file: cannot load {s.tls_cert_file!r} and "
            f"{s.tls_key_file!r}: {exc}"
        ) from None
    return ctx


def read_password(path: str) -> str:
    """The password in ``path`` (its first line); ValueError naming the key when unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(4096)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"basic_auth_password_file: cannot read {path!r}: {exc}") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ValueError(f"basic_auth_password_file: {path!r} is empty")
    return password
