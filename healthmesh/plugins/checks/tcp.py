"""The ``tcp`` check kind: a TCP connection to each ``host:port`` target, timed."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import anyio

from healthmesh import Check, CheckSettings, ProbeResult, format_duration, hookimpl
from healthmesh.plugins.checks import MAX_TARGETS, split_host_port


class TcpSettings(CheckSettings, kw_only=True):
    """``[checks.<name>]`` with ``kind = "tcp"``."""

    #: ``address:port`` or ``name:port`` (names go through the system resolver).
    targets: list[str]


def validate_targets(targets: list[str], default_port: int | None = None) -> None:
    """Between 1 and MAX_TARGETS distinct ``host:port`` targets; ValueError names the bad one."""
    if not targets:
        raise ValueError("targets: at least one target is required")
    if len(targets) > MAX_TARGETS:
        raise ValueError(f"targets: {len(targets)} targets; at most {MAX_TARGETS}")
    for i, target in enumerate(targets):
        try:
            split_host_port(target, default_port)
        except ValueError as exc:
            raise ValueError(f"targets[{i}]: {exc}") from None
    if len(set(targets)) != len(targets):
        raise ValueError("targets: duplicate target")


def os_error_text(exc: BaseException) -> str:
    """``connection refused`` rather than ``[Errno 111] Connect call failed ('1.2.3.4', 5)``.

    anyio reports a name with several addresses as one OSError caused by a group of them:
    the first one with an errno says it.
    """
    seen: list[BaseException] = [exc]
    while seen:
        err = seen.pop(0)
        number = getattr(err, "errno", None)
        if isinstance(number, int) and number > 0:
            return os.strerror(number).lower()
        seen.extend(getattr(err, "exceptions", ()))
        if err.__cause__ is not None:
            seen.append(err.__cause__)
    return (str(exc) or type(exc).__name__).lower()


class TcpCheck(Check):
    """Connects to every target; ok when the connection is accepted in time."""

    name = "tcp"
    Settings = TcpSettings

    @classmethod
    def validate_settings(cls, settings: TcpSettings, config: Any) -> None:
        validate_targets(settings.targets)

    def targets(self) -> list[str]:
        return list(self.settings.targets)

    async def check(self, target: str, timeout: float) -> ProbeResult:
        host, port = split_host_port(target)
        start = time.perf_counter()
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_tcp(host, port)
        except TimeoutError:
            return ProbeResult.failure(
                f"timeout: not connected within {format_duration(round(timeout, 3))}"
            )
        except OSError as exc:
            return ProbeResult.failure(os_error_text(exc))
        rtt = time.perf_counter() - start
        await stream.aclose()
        return ProbeResult.success(rtt)


@hookimpl
def register_check_kinds(register: Callable[[type[Check]], None]) -> None:
    register(TcpCheck)
