"""The icmp probe on real sockets to loopback peers (127/8 and ::1), as root."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator

import anyio
import pytest

from healthmesh import Node, Path, ProbeResult
from healthmesh.plugins.icmp import IcmpProbe, IcmpSettings
from tests.conftest import require

pytestmark = pytest.mark.anyio


@pytest.fixture
async def probe() -> AsyncIterator[IcmpProbe]:
    require(None if os.geteuid() == 0 else "needs root (raw ICMP sockets)")
    async with IcmpProbe(IcmpSettings(), None) as p:
        yield p


def _path(address: str) -> Path:
    return Path(node_id="default/peer", address=address, role="host", primary=True)


async def _probe(p: IcmpProbe, address: str, timeout: float = 1.0) -> ProbeResult:
    with anyio.fail_after(timeout + 2):
        return await p.probe(_path(address), timeout)


async def test_loopback_peers_answer_with_sane_rtts(probe: IcmpProbe) -> None:
    assert probe.mode == "raw"
    for address in ("127.0.0.1", "127.1.0.1", "127.1.3.77"):
        result = await _probe(probe, address)
        assert result.ok, result.error
        assert result.rtt is not None and 0 < result.rtt < 0.05
        assert result.details == {"sent": 1, "received": 1, "echo_loss_pct": 0.0, "late": 0}


async def test_ipv6_loopback_answers(probe: IcmpProbe) -> None:
    result = await _probe(probe, "::1")
    assert result.ok, result.error
    assert result.rtt is not None and 0 < result.rtt < 0.05


async def test_a_node_with_both_families_has_both_paths_probed(probe: IcmpProbe) -> None:
    node = Node(name="dual", addresses=("127.0.0.1", "::1"))
    paths = node.paths()
    assert [(p.address, p.primary) for p in paths] == [("127.0.0.1", True), ("::1", False)]
    assert all(probe.supports(p) for p in paths)
    with anyio.fail_after(3):
        results = [await probe.probe(p, 1.0) for p in paths]
    assert all(r.ok for r in results), [r.error for r in results]


async def test_a_burst_reports_sent_received_and_loss() -> None:
    require(None if os.geteuid() == 0 else "needs root (raw ICMP sockets)")
    settings = IcmpSettings(count=4)
    async with IcmpProbe(settings, None) as p:
        with anyio.fail_after(3):
            started = anyio.current_time()
            result = await p.probe(_path("127.0.0.1"), 1.0)
            took = anyio.current_time() - started
    assert result.ok
    assert result.details == {"sent": 4, "received": 4, "echo_loss_pct": 0.0, "late": 0}
    assert took >= 3 * settings.spacing * 0.9  # the requests were spaced, not sent at once


async def test_thousands_of_concurrent_probes_share_one_socket_per_family(
    probe: IcmpProbe,
) -> None:
    gc.collect()  # sockets an earlier in-process test dropped are closed now, not mid-count
    fds_before = len(os.listdir("/proc/self/fd"))
    addresses = [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(2000)] + ["::1"] * 50
    results: list[ProbeResult | None] = [None] * len(addresses)

    async def one(i: int) -> None:
        results[i] = await probe.probe(_path(addresses[i]), 2.0)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(len(addresses)):
                tg.start_soon(one, i)
    assert len(os.listdir("/proc/self/fd")) <= fds_before  # no socket per probe
    failed = [(a, r.error) for a, r in zip(addresses, results) if r is None or not r.ok]
    assert failed == []
    assert probe.counters.replies >= len(addresses)
    assert probe.ledger.in_flight == {}


async def test_probe_many_matches_probe_results(probe: IcmpProbe) -> None:
    paths = [_path(a) for a in ("127.0.0.1", "::1", "127.1.0.5", "not-an-address")]
    with anyio.fail_after(3):
        results = await probe.probe_many(paths, 1.0)
    assert [r.ok for r in results] == [True, True, True, False]
    assert "not an IPv4 address" in (results[3].error or "")


async def test_a_cancelled_probe_leaves_nothing_in_flight_and_its_reply_counts_late(
    probe: IcmpProbe,
) -> None:
    with anyio.fail_after(3):
        task = asyncio.ensure_future(probe.probe(_path("127.0.0.1"), 1.0))
        await asyncio.sleep(0)  # the request is sent (and on loopback already answered)
        task.cancel()  # as the scheduler does past the timeout
        with pytest.raises(asyncio.CancelledError):
            await task
        assert probe.ledger.in_flight == {}
        await asyncio.sleep(0.05)  # the reader gets round to the reply
    assert probe.counters.late == 1
    result = await _probe(probe, "127.0.0.1")
    assert result.ok and result.details["late"] == 1  # reported with the next result


async def test_sequence_wrap_moves_to_a_new_identifier_and_skips_requests_in_flight(
    probe: IcmpProbe,
) -> None:
    endpoint = probe.endpoints[4]
    endpoint._seq = 0xFFFE
    ident = endpoint.ident
    first = await _probe(probe, "127.0.0.1")  # seq 0xFFFF
    assert endpoint.ident == ident and first.ok
    second = await _probe(probe, "127.0.0.1")  # wraps to 0 under a new identifier
    assert second.ok and endpoint.ident != ident
    # A key still in flight is never handed out again.
    busy = (4 << 32) | (endpoint.ident << 16) | 1
    probe.ledger.in_flight[busy] = object()  # type: ignore[assignment]
    try:
        third = await _probe(probe, "127.0.0.1")
    finally:
        del probe.ledger.in_flight[busy]
    assert third.ok and endpoint._seq == 2


async def test_the_identifier_rotates_after_the_rotation_period(probe: IcmpProbe) -> None:
    endpoint = probe.endpoints[4]
    seen = set()
    for _ in range(3):
        endpoint._rotate_at = 0.0  # the period has passed
        result = await _probe(probe, "127.0.0.1")
        assert result.ok
        seen.add(endpoint.ident)
    assert len(seen) == 3
    assert endpoint.rotations == 3
