"""The ``icmp`` probe kind: bursts of echo requests over one long-lived socket per family."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from loguru import logger

from healthmesh import (
    AgentContext,
    Path,
    Probe,
    ProbeResult,
    ProbeUnavailable,
    format_duration,
)
from healthmesh.plugins.icmp.deadlines import Deadlines
from healthmesh.plugins.icmp.endpoint import Endpoint
from healthmesh.plugins.icmp.ledger import Burst, Counters, Echo, EchoLedger
from healthmesh.plugins.icmp.settings import IcmpSettings, validate
from healthmesh.plugins.icmp.sockets import SocketRefused, unavailable_reason

_MODES = {"auto": (True, False), "raw": (True,), "datagram": (False,)}


class IcmpProbe(Probe):
    """ICMP echo to every path, IPv4 and IPv6, matched by one reader per socket.

    ``probe`` sends ``count`` echo requests ``spacing`` apart and waits until each is
    answered (a reply or an ICMP error) or the timeout passes; the result's RTT is the
    median of the replies, and ``details`` carries sent / received / echo_loss_pct and the late
    replies seen from this address since its previous probe.
    """

    name: ClassVar[str] = "icmp"
    default_enabled: ClassVar[bool] = True
    Settings: ClassVar[type[IcmpSettings]] = IcmpSettings
    #: The scheduler hands us every path due in one tick: one task sends all the echoes.
    batched: ClassVar[bool] = True

    def __init__(self, settings: IcmpSettings, context: AgentContext | None) -> None:
        super().__init__(settings, context)
        self.settings: IcmpSettings = settings
        self.ledger = EchoLedger()
        self.endpoints: dict[int, Endpoint] = {}
        self.unavailable: dict[int, str] = {}
        self._deadlines: Deadlines | None = None

    @classmethod
    def validate_settings(cls, settings: IcmpSettings, config: Any) -> None:
        """Config check: the burst must fit in the timeout, sizes within bounds."""
        validate(settings, config)

    @property
    def counters(self) -> Counters:
        """Totals since start: sent, replies, errors, late, duplicates, stray."""
        return self.ledger.counters

    @property
    def mode(self) -> str | None:
        """"raw" or "datagram" once open."""
        for endpoint in self.endpoints.values():
            return endpoint.mode
        return None

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> IcmpProbe:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ProbeUnavailable(
                "the icmp probe needs an asyncio event loop (run on anyio's asyncio backend)"
            ) from None
        if not hasattr(loop, "add_reader"):
            raise ProbeUnavailable("the icmp probe needs an event loop with add_reader")
        permission: dict[bool, str] = {}
        refused: dict[int, str] = {}
        for raw in _MODES[self.settings.mode]:
            opened, refused = {}, {}
            for family in (4, 6):
                try:
                    opened[family] = Endpoint(family, raw, self.settings, self.ledger, loop)
                except SocketRefused as exc:
                    refused[family] = str(exc)
                    if exc.permission:
                        permission[raw] = str(exc)
                except OSError as exc:
                    refused[family] = exc.strerror or str(exc)
            if opened:
                break
        else:
            if permission:
                raise ProbeUnavailable(
                    unavailable_reason(permission.get(True), permission.get(False))
                )
            raise ProbeUnavailable(
                "no ICMP socket can be opened: "
                + "; ".join(f"IPv{f}: {why}" for f, why in sorted(refused.items()))
            )
        self.endpoints = opened
        self._deadlines = Deadlines(loop)
        for family, why in refused.items():
            self.unavailable[family] = f"no ICMPv{family} socket: {why}"
            logger.warning("icmp: IPv{} paths cannot be probed: no ICMP socket ({})",
                           family, why)
        if self.mode == "datagram" and True in permission:
            logger.info("icmp: no raw socket ({}); using unprivileged datagram ICMP sockets",
                        permission[True])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for endpoint in self.endpoints.values():
            endpoint.close()
        self.endpoints = {}
        if self._deadlines is not None:
            self._deadlines.close()

    # -- probing -------------------------------------------------------------------------

    def supports(self, path: Path) -> bool:
        """Every IPv4 and IPv6 path."""
        return True

    async def probe(self, path: Path, timeout: float) -> ProbeResult:
        """Send the burst to ``path.address`` and wait for its answers, at most ``timeout``."""
        return (await self.probe_many([path], timeout))[0]

    async def probe_many(self, paths: Sequence[Path], timeout: float) -> list[ProbeResult]:
        """Probe many paths at once from one task: the bursts go out back to back.

        The same as ``probe`` for each path, without a task per path; results are in the
        order of ``paths``.
        """
        results: list[ProbeResult | None] = [None] * len(paths)
        bursts: list[tuple[int, Burst, Endpoint, Any]] = []
        for i, path in enumerate(paths):
            started = self._start(path, timeout)
            if isinstance(started, ProbeResult):
                results[i] = started
            else:
                bursts.append((i, *started))
        try:
            for n in range(self.settings.count):
                if n:
                    await asyncio.sleep(float(self.settings.spacing))
                for _i, burst, endpoint, sockaddr in bursts:
                    if not burst.future.done():
                        await self._send(endpoint, self.ledger.new_echo(burst), sockaddr)
            for _i, burst, _endpoint, _sockaddr in bursts:
                burst.stop_sending()
            for _i, burst, _endpoint, _sockaddr in bursts:
                if not burst.future.done():
                    await burst.future
        finally:
            now = time.monotonic()
            for _i, burst, _endpoint, _sockaddr in bursts:
                self.ledger.retire(burst, now)
        for i, burst, _endpoint, _sockaddr in bursts:
            results[i] = self._outcome(burst, timeout)
        return results  # type: ignore[return-value]

    def _start(self, path: Path, timeout: float) -> tuple[Burst, Endpoint, Any] | ProbeResult:
        family = 6 if ":" in path.address else 4
        endpoint = self.endpoints.get(family)
        if endpoint is None:
            return ProbeResult.failure(
                self.unavailable.get(family, "the icmp probe is not open"),
                sent=0, received=0, echo_loss_pct=100.0, late=0,
            )
        try:
            sockaddr = endpoint.sockaddr(path.address)
        except (OSError, ValueError):
            return ProbeResult.failure(f"not an IPv{family} address: {path.address!r}")
        if timeout > endpoint.max_timeout:
            endpoint.max_timeout = timeout
        burst = Burst(sockaddr[0], family, self.settings.count, endpoint.loop.create_future())
        burst.deadline = endpoint.loop.time() + timeout
        assert self._deadlines is not None
        self._deadlines.add(burst.deadline, burst.future)
        return burst, endpoint, sockaddr

    async def _send(self, endpoint: Endpoint, echo: Echo, sockaddr: Any) -> None:
        while True:
            try:
                error = endpoint.send(echo, sockaddr)
            except BlockingIOError:
                if endpoint.loop.time() + 0.001 < echo.burst.deadline:
                    await asyncio.sleep(0.001)
                    continue
                error = "cannot send echo request: the socket's send buffer stayed full"
            if error is not None:
                self.ledger.send_failed(echo, error)
            return

    def _outcome(self, burst: Burst, timeout: float) -> ProbeResult:
        late = self.ledger.take_late(burst.address)
        sent = sum(1 for e in burst.echoes if e.key >= 0)
        rtts = sorted(e.rtt for e in burst.echoes if e.rtt is not None)
        received = len(rtts)
        loss = round(100.0 * (sent - received) / sent, 2) if sent else 100.0
        if rtts:
            return ProbeResult.success(
                _median(rtts), sent=sent, received=received, echo_loss_pct=loss, late=late
            )
        error = next((e.error for e in burst.echoes if e.error), None)
        return ProbeResult.failure(
            error or f"timeout after {format_duration(timeout)}",
            sent=sent, received=0, echo_loss_pct=100.0, late=late,
        )


def _median(values: list[float]) -> float:
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
