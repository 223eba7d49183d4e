"""The dns check kind against real resolvers: dnsmasq on loopback, and a scripted server."""

from __future__ import annotations

from pathlib import Path

import anyio
import dns.rcode
import pytest

from tests.checks_support import build_check
from tests.conftest import require
from tests.dns_fixtures import ScriptedDns, dnsmasq, loopback_address

pytestmark = pytest.mark.anyio


def dns_check(server: str, *names: str, timeout: str = "1s", extra: str = "") -> object:
    quoted = ", ".join(f'"{n}"' for n in names)
    return build_check(
        f"""
[checks.cluster-dns]
kind = "dns"
server = "{server}"
names = [{quoted}]
timeout = "{timeout}"
{extra}
"""
    )


async def run(check: object, target: str, timeout: float = 1.0) -> object:
    with anyio.fail_after(timeout + 5):
        return await check.check(target, timeout)  # type: ignore[attr-defined]


async def test_answer_nxdomain_and_tcp_fallback_from_dnsmasq(tmp_path: Path) -> None:
    with dnsmasq(tmp_path) as server:
        check = dns_check(server.server, "ok.test", "nope.test", "big.test")
        ok = await run(check, "ok.test")
        assert ok.ok, ok.error
        assert ok.details["answers"] == ["127.0.0.5"]
        assert ok.details["transport"] == "udp" and ok.details["outcome"] == "answer"
        assert ok.rtt is not None and 0 < ok.rtt < 1.0

        nx = await run(check, "nope.test")
        assert not nx.ok
        assert nx.details["outcome"] == "nxdomain" and nx.details["rcode"] == "NXDOMAIN"
        assert nx.error.startswith("NXDOMAIN")

        # 40 A records do not fit 512 bytes: dnsmasq sets TC and the check retries over TCP.
        big = await run(check, "big.test")
        assert big.ok, big.error
        assert big.details["transport"] == "tcp"
        assert len(big.details["answers"]) == 16  # the first 16 are kept
        assert big.details["answers"][0] == "127.0.1.1"


async def test_expect_a_list_of_addresses_and_aaaa(tmp_path: Path) -> None:
    with dnsmasq(tmp_path) as server:
        good = dns_check(server.server, "ok.test", extra='expect = ["127.0.0.5"]')
        assert (await run(good, "ok.test")).ok
        bad = dns_check(server.server, "ok.test", extra='expect = ["127.0.0.6"]')
        result = await run(bad, "ok.test")
        assert not result.ok and result.details["outcome"] == "unexpected"
        assert "lacks expected 127.0.0.6" in result.error
        six = dns_check(server.server, "ok.test", extra='record_type = "AAAA"')
        result = await run(six, "ok.test")
        assert result.ok and result.details["answers"] == ["::5"]
        # A name with an A record and no AAAA: NOERROR without an address.
        nodata = await run(six, "big.test")
        assert not nodata.ok and nodata.details["outcome"] == "nodata"


async def test_stopped_server_is_refused_and_paused_server_times_out(tmp_path: Path) -> None:
    with dnsmasq(tmp_path) as server:
        check = dns_check(server.server, "ok.test", timeout="500ms")
        assert (await run(check, "ok.test", 0.5)).ok
        server.pause()  # SIGSTOP: the socket is there, nobody answers
        try:
            t = anyio.current_time()
            hung = await run(check, "ok.test", 0.5)
            assert anyio.current_time() - t >= 0.45
            assert not hung.ok and hung.details["outcome"] == "timeout"
            assert hung.error.startswith("timeout: no answer from " + server.server)
        finally:
            server.resume()
        assert (await run(check, "ok.test", 0.5)).ok
    # dnsmasq stopped: the kernel answers port unreachable, told apart from a timeout.
    t = anyio.current_time()
    refused = await run(check, "ok.test", 0.5)
    assert not refused.ok and refused.details["outcome"] == "refused"
    assert anyio.current_time() - t < 0.4
    assert "nothing listens on " + server.server in refused.error


async def test_slow_answers_and_servfail_from_a_scripted_server() -> None:
    with ScriptedDns(delay=0.3) as slow:
        check = dns_check(slow.server, "a.test", timeout="2s")
        late = await run(check, "a.test", 2.0)
        assert late.ok, late.error
        assert late.rtt >= 0.28
        tight = await run(check, "a.test", 0.1)
        assert not tight.ok and tight.details["outcome"] == "timeout"
    with ScriptedDns(rcode=dns.rcode.SERVFAIL) as failing:
        check = dns_check(failing.server, "a.test")
        result = await run(check, "a.test")
        assert not result.ok and result.details["outcome"] == "servfail"
        assert result.error == f"SERVFAIL from {failing.server}"
    with ScriptedDns(rcode=dns.rcode.REFUSED) as refusing:
        result = await run(dns_check(refusing.server, "a.test"), "a.test")
        assert not result.ok and result.details["outcome"] == "refused"
        assert result.details["rcode"] == "REFUSED"


async def test_system_resolver_from_resolv_conf_with_failover(tmp_path: Path) -> None:
    # resolv.conf has no port: the servers must listen on 53, which needs root.
    import os

    require(None if os.geteuid() == 0 else "binding port 53 needs root")
    dead = loopback_address()
    live = loopback_address()
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"# test\nsearch example\nnameserver {dead}\nnameserver {live}\n")
    with dnsmasq(tmp_path, host=live, port=53):
        check = build_check(
            f"""
[checks.system]
kind = "dns"
names = ["ok.test"]
resolv_conf = "{conf}"
"""
        )
        assert check.describe()["server"] == f"system ({conf})"
        result = await run(check, "ok.test")
        assert result.ok, result.error  # the first server is refused, the second answers
        assert result.details["server"] == f"{live}:53"
    conf.write_text("# no nameserver\n")
    empty = await run(check, "ok.test")
    assert not empty.ok and empty.error == f"no nameserver in {conf}"
    conf.unlink()
    missing = await run(check, "ok.test")
    assert not missing.ok and missing.error.startswith(f"cannot read {conf}")

