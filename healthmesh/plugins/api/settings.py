"""``[outputs.api]``: where the unix socket lives, its mode and its owner group."""

from __future__ import annotations

import grp
import os
from typing import Any

import msgspec

from healthmesh import ComponentSettings, ConfigPath

DEFAULT_SOCKET = "/run/healthmesh/health.sock"
SOCKET_ENV = "HEALTHMESH_SOCK"


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
