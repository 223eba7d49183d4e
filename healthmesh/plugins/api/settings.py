"""``[outputs.api]``: where the unix socket lives, its mode, its owner group and its limits."""

from __future__ import annotations

import grp
import os
from typing import Any

import msgspec

from healthmesh import ComponentSettings, ConfigPath, Duration, check_ranges

DEFAULT_SOCKET = "/run/healthmesh/health.sock"
SOCKET_ENV = "HEALTHMESH_SOCK"

#: (key, lowest, highest) of each numeric limit: values outside make no sense or cannot work.
LIMIT_BOUNDS: dict[str, tuple[float, float]] = {
    # Below a handful the reserve cannot work; above, file descriptors run out first.
    "max_connections": (4, 65536),
    # Seconds. Too short drops clients mid-request on a loaded host; a day is plenty.
    "idle_timeout": (0.1, 3600.0),
    # An HTTP/1.1 request line and headers: curl sends ~100 bytes; h11 needs some room.
    "max_header_bytes": (1024, 1024 * 1024),
    # No request of this API has a body; a small one is tolerated and ignored.
    "max_body_bytes": (0, 1024 * 1024),
}


def default_socket() -> str:
    """``$HEALTHMESH_SOCK``, else ``/run/healthmesh/health.sock``."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def _default_config_socket() -> ConfigPath:
    return ConfigPath(default_socket())


class ApiSettings(ComponentSettings):
    """``[outputs.api]``: the local API's unix socket."""

    #: The socket path; default ``$HEALTHMESH_SOCK``, else /run/healthmesh/health.sock.
    #: A relative path is relative to the config file's directory, like every path in a config.
    socket: ConfigPath = msgspec.field(default_factory=_default_config_socket)
    #: Permission bits of the socket file: "0660" (or the TOML integer 0o660).
    mode: str | int = "0660"
    #: Owner group of the socket (name or number); "" keeps the agent's own group.
    group: str | int = ""
    #: Open connections at most; at the cap the oldest idle one is closed to admit a new one.
    max_connections: int = 512
    #: A connection must send a complete request head within this time of connecting or of
    #: its previous answer (and read that answer); else it is closed (408 when half-written).
    idle_timeout: Duration = Duration(10.0)
    #: Request line and headers together, in bytes; more gets 431.
    max_header_bytes: int = 16 * 1024
    #: A request body (declared by Content-Length) above this gets 413.
    max_body_bytes: int = 4096

    @classmethod
    def validate(cls, settings: ApiSettings) -> None:
        """Raise ValueError naming the key when a value cannot work."""
        if not settings.socket:
            raise ValueError("socket: must not be empty")
        if "\0" in settings.socket:
            raise ValueError("socket: must not contain NUL")
        # sun_path holds 108 bytes, one of them the terminating NUL.
        if len(os.fsencode(settings.socket)) > 107:
            raise ValueError(f"socket: {settings.socket!r} is longer than 107 bytes")
        parse_mode(settings.mode)
        resolve_group(settings.group)
        check_ranges(settings, LIMIT_BOUNDS)


def parse_mode(mode: str | int) -> int:
    """Permission bits from "0660", "660" or 0o660; ValueError naming the key when invalid."""
    if isinstance(mode, int) and not isinstance(mode, bool):
        value = mode
    elif isinstance(mode, str):
        text = mode.strip().lower().removeprefix("0o")
        try:
            value = int(text, 8)
        except ValueError:
            raise ValueError(f'mode: {mode!r} is not an octal mode such as "0660"') from None
    else:
        raise ValueError(f'mode: {mode!r} is not an octal mode such as "0660"')
    if not 0 <= value <= 0o777:
        raise ValueError(f"mode: {oct(value)} is out of range (0000 to 0777)")
    return value


def resolve_group(group: str | int) -> int | None:
    """The gid of ``group`` (a name or a number), None for ""; ValueError when it is unknown."""
    if group == "" or group is None:
        return None
    if isinstance(group, int) or (isinstance(group, str) and group.isdigit()):
        gid = int(group)
        if gid < 0:
            raise ValueError(f"group: {gid} is not a group id")
        return gid
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"group: no group named {group!r} on this host") from None


def effective_socket(settings: Any) -> str:
    """The socket path an agent with ``settings`` serves on."""
    return str(settings.socket)
