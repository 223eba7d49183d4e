"""A healthmesh probe kind that measures TCP connect time to a configurable port."""

from __future__ import annotations

import os
import time
from typing import Any

import anyio

from healthmesh import ComponentSettings, Path, Probe, ProbeResult, format_duration, hookimpl


class TcpSettings(ComponentSettings):
    """``[probes.tcp]``: the port to connect to."""

    port: int = 4240


class TcpProbe(Probe):
    """Connects to ``address:port``; success is an established connection."""

    name = "tcp"
    Settings = TcpSettings

    @classmethod
    def validate_settings(cls, settings: TcpSettings, config: Any) -> None:
        if not 1 <= settings.port <= 65535:
            raise ValueError(f"port: {settings.port} is not a TCP port (1-65535)")

    async def probe(self, path: Path, timeout: float) -> ProbeResult:
        target = f"{path.address}:{self.settings.port}"
        start = time.perf_counter()
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_tcp(path.address, self.settings.port)
        except TimeoutError:
            return ProbeResult.failure(f"tcp connect to {target}: timeout after "
                                       f"{format_duration(timeout)}")
        except OSError as exc:
            # anyio wraps the per-address errors; the first cause says what happened.
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            reason = os.strerror(cause.errno) if cause.errno else str(cause)
            return ProbeResult.failure(f"tcp connect to {target}: {reason}")
        rtt = time.perf_counter() - start
        await stream.aclose()
        return ProbeResult.success(rtt, connect_ms=rtt * 1000.0)


@hookimpl
def register_probe_kinds(register: Any) -> None:
    register(TcpProbe)
