"""The icmp probe inside network namespaces the tests create: drops, ICMP errors, IPv6,
late and duplicate replies, and the unprivileged datagram sockets of a non-root user.

Each probe runs in a subprocess under ``ip netns exec`` (this file is also that script:
``python -m tests.test_icmp_netns SPEC``), so nothing is sent outside the namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from healthmesh import Duration, Path, ProbeUnavailable, parse_duration
from healthmesh.plugins.icmp import IcmpProbe, IcmpSettings
from healthmesh.plugins.icmp.packets import checksum
from tests.conftest import ROOT
from tests.netns import Netns, sh

NOBODY = 65534
#: Own prefix with the creating pid: conftest's start-of-session clean-up deletes every
#: "hmt-" namespace, which kills the namespaces of a test session running concurrently.
PREFIX = "hmicmp-"

# -- the in-namespace script ------------------------------------------------------------


def _path(address: str) -> Path:
    return Path(node_id="default/peer", address=address, role="host", primary=True)


def _as_dict(result: Any) -> dict[str, Any]:
    return {"ok": result.ok, "rtt": result.rtt, "error": result.error,
            "details": result.details}


class ScriptedPeer:
    """Answers echo requests to 127.0.0.1 itself (the kernel's echo is off), as told:
    after a delay, several times, or not at all."""

    def __init__(self, plan: list[dict[str, Any]]) -> None:
        self.plan = list(plan)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._on_request)

    def _on_request(self) -> None:
        while True:
            try:
                data, _addr = self.sock.recvfrom(4096)
            except BlockingIOError:
                return
            icmp = data[(data[0] & 0x0F) * 4 :]
            if icmp[0] != 8 or not self.plan:
                continue
            step = self.plan.pop(0)
            body = b"\x00\x00\x00\x00" + icmp[4:]
            reply = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
            for _ in range(step.get("copies", 0)):
                self.loop.call_later(step.get("delay", 0.0), self.sock.sendto, reply,
                                     ("127.0.0.1", 0))

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def _run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    settings = IcmpSettings(**{
        key: Duration(parse_duration(value)) if key in ("spacing", "identifier_rotation")
        else value
        for key, value in spec.get("settings", {}).items()
    })
    timeout = spec.get("timeout", 1.0)
    peer = ScriptedPeer(spec["peer"]) if "peer" in spec else None
    try:
        async with asyncio.timeout(20) if hasattr(asyncio, "timeout") else _nullcontext():
            async with IcmpProbe(settings, None) as probe:
                for address in spec.get("warmup", []):  # resolve neighbours first
                    await probe.probe(_path(address), 3.0)
                results = []
                for address in spec["addresses"]:
                    results.append(_as_dict(await probe.probe(_path(address), timeout)))
                    endpoint = probe.endpoints[6 if ":" in address else 4]
                    results[-1]["ident"] = endpoint.ident
                    await asyncio.sleep(spec.get("gap", 0.0))
                await asyncio.sleep(0.05)  # let the reader count stragglers
                return {"mode": probe.mode, "results": results,
                        "counters": vars(probe.counters)}
    except ProbeUnavailable as exc:
        return {"unavailable": str(exc)}
    finally:
        if peer is not None:
            peer.close()


class _nullcontext:  # Python 3.10 has no asyncio.timeout; the subprocess timeout bounds it
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _main() -> None:
    spec = json.loads(sys.argv[1])
    if "user" in spec:  # drop to a non-root user before any socket is opened
        uid, gid = spec["user"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        assert os.geteuid() == uid and os.getegid() == gid
        try:
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
            raise SystemExit("a raw socket opened after dropping root")
        except PermissionError:
            pass
    print(json.dumps(asyncio.run(_run_spec(spec))))


# -- the tests ----------------------------------------------------------------------------


def _leftovers_removed() -> None:
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            Netns(name).delete()


@contextmanager
def _namespace() -> Iterator[Netns]:
    _leftovers_removed()
    made = Netns(f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}").create()
    try:
        yield made
    finally:
        made.delete()


@pytest.fixture
def ns(root_net: None) -> Iterator[Netns]:
    """A fresh namespace with loopback up (this module's own, see PREFIX)."""
    with _namespace() as made:
        yield made


def probe_in(ns: Netns, spec: dict[str, Any]) -> dict[str, Any]:
    """Run the spec in ``ns`` and return what the script printed."""
    proc = subprocess.run(
        ns.cmd(sys.executable, "-m", "tests.test_icmp_netns", json.dumps(spec)),
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _datagram_allowed(ns: Netns, gid: int) -> None:
    ns.run("sysctl", "-qw", f"net.ipv4.ping_group_range={gid} {gid}")


@pytest.mark.parametrize("mode", ["raw", "datagram"])
def test_dropped_echo_requests_time_out_with_the_timeout_as_error(ns: Netns, mode: str) -> None:
    _datagram_allowed(ns, 0)
    ns.run("ip", "addr", "add", "10.203.0.1/32", "dev", "lo")
    ns.run("iptables", "-A", "INPUT", "-d", "10.203.0.1", "-p", "icmp",
           "--icmp-type", "echo-request", "-j", "DROP")
    out = probe_in(ns, {"addresses": ["10.203.0.1", "127.0.0.1"], "timeout": 0.3,
                        "settings": {"mode": mode}})
    assert out["mode"] == mode
    dropped, alive = out["results"]
    assert dropped["ok"] is False
    assert dropped["error"] == "timeout after 300ms"
    assert dropped["details"]["sent"] == 1 and dropped["details"]["echo_loss_pct"] == 100.0
    assert alive["ok"] is True


@pytest.fixture
def routed(ns: Netns) -> Iterator[tuple[Netns, Netns]]:
    """``ns`` behind a router namespace with an unreachable and a prohibited route."""
    with _namespace() as router:
        for side in (ns, router):  # no duplicate address detection: addresses usable at once
            side.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
            side.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
        tag = uuid.uuid4().hex[:6]
        a, b = f"hmA{tag}", f"hmB{tag}"
        subprocess.run(["ip", "link", "add", a, "netns", ns.name, "type", "veth", "peer",
                        "name", b, "netns", router.name], check=True, capture_output=True)
        ns.run("ip", "addr", "add", "10.204.0.1/24", "dev", a)
        ns.run("ip", "-6", "addr", "add", "fd00:204::1/64", "dev", a, "nodad")
        ns.run("ip", "link", "set", a, "up")
        ns.run("ip", "route", "add", "default", "via", "10.204.0.2")
        ns.run("ip", "-6", "route", "add", "default", "via", "fd00:204::2")
        router.run("ip", "addr", "add", "10.204.0.2/24", "dev", b)
        router.run("ip", "-6", "addr", "add", "fd00:204::2/64", "dev", b, "nodad")
        router.run("ip", "link", "set", b, "up")
        router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        router.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        router.run("ip", "route", "add", "unreachable", "10.205.0.0/24")
        router.run("ip", "route", "add", "prohibit", "10.206.0.0/24")
        router.run("ip", "-6", "route", "add", "unreachable", "fd00:205::/64")
        yield ns, router


@pytest.mark.parametrize("mode", ["raw", "datagram"])
def test_an_unreachable_route_gives_the_icmp_error_text(
    routed: tuple[Netns, Netns], mode: str
) -> None:
    ns, _router = routed
    _datagram_allowed(ns, 0)
    out = probe_in(ns, {
        "addresses": ["10.205.0.9", "10.206.0.9", "fd00:205::9", "10.204.0.2", "fd00:204::2"],
        "timeout": 1.0, "settings": {"mode": mode},
        "warmup": ["10.204.0.2", "fd00:204::2"],  # a first IPv6 neighbour lookup takes ~1s
    })
    assert out["mode"] == mode
    unreachable, prohibited, unreachable6, router4, router6 = out["results"]
    assert unreachable["error"] == "destination host unreachable from 10.204.0.2"
    assert prohibited["error"] == "communication administratively prohibited from 10.204.0.2"
    assert unreachable6["error"] == "no route to destination from fd00:204::2"
    assert router4["ok"] and router6["ok"]  # the router itself answers
    assert out["counters"]["errors"] == 3
    assert out["counters"]["late"] == 0


def test_ipv6_on_loopback_and_a_namespace_address(ns: Netns) -> None:
    ns.run("ip", "-6", "addr", "add", "fd00:203::1/128", "dev", "lo", "nodad")
    out = probe_in(ns, {"addresses": ["::1", "fd00:203::1"], "settings": {"count": 3}})
    for result in out["results"]:
        assert result["ok"], result["error"]
        assert result["details"]["received"] == 3
        assert 0 < result["rtt"] < 0.05


@pytest.mark.parametrize("mode", ["raw", "datagram"])
def test_late_replies_are_not_credited_to_newer_probes(ns: Netns, mode: str) -> None:
    _datagram_allowed(ns, 0)
    ns.run("sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1")  # the scripted peer answers
    out = probe_in(ns, {
        "addresses": ["127.0.0.1"] * 4,
        "timeout": 0.2,
        "settings": {"mode": mode},
        "peer": [
            {"delay": 0.3, "copies": 1},  # 1: answered 100 ms after its timeout
            {"copies": 0},  # 2: never answered; 1's late reply arrives while it waits
            {"delay": 0.0, "copies": 2},  # 3: answered twice
            {"delay": 0.0, "copies": 1},  # 4: answered once
        ],
    })
    first, second, third, fourth = out["results"]
    assert first["error"] == "timeout after 200ms"
    assert second["ok"] is False and second["error"] == "timeout after 200ms"
    assert second["details"]["late"] == 1  # counted, and reported with the next result
    assert third["ok"] and third["details"]["received"] == 1
    assert fourth["ok"] and fourth["details"]["late"] == 0
    assert out["counters"]["late"] == 1
    assert out["counters"]["duplicates"] == 1


def test_a_burst_with_lost_echoes_reports_their_loss_percent(ns: Netns) -> None:
    ns.run("sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1")  # the scripted peer answers
    out = probe_in(ns, {
        "addresses": ["127.0.0.1", "127.0.0.1"],
        "timeout": 0.3,
        "settings": {"count": 4, "spacing": "10ms"},
        "peer": [{"copies": 1}, {"copies": 0}, {"copies": 1}, {"copies": 0}]
        + [{"copies": 0}] * 4,
    })
    partial, lost = out["results"]
    assert partial["ok"] is True  # a path answering some echoes is reachable ...
    assert partial["details"] == {"sent": 4, "received": 2, "echo_loss_pct": 50.0, "late": 0}
    assert lost["ok"] is False and lost["details"]["echo_loss_pct"] == 100.0  # ... none: not


def test_a_non_root_user_probes_with_datagram_sockets(ns: Netns) -> None:
    _datagram_allowed(ns, NOBODY)  # per-namespace sysctl: the host's range is untouched
    out = probe_in(ns, {"user": [NOBODY, NOBODY], "addresses": ["127.0.0.1", "::1"],
                        "settings": {"count": 2}})
    assert out["mode"] == "datagram"
    assert [r["ok"] for r in out["results"]] == [True, True], out["results"]
    assert out["results"][0]["details"]["received"] == 2


def test_a_non_root_user_without_ping_group_gets_one_clear_reason(ns: Netns) -> None:
    ns.run("sysctl", "-qw", "net.ipv4.ping_group_range=1 0")
    out = probe_in(ns, {"user": [NOBODY, NOBODY], "addresses": ["127.0.0.1"]})
    reason = out["unavailable"]
    assert "CAP_NET_RAW" in reason
    assert 'net.ipv4.ping_group_range="65534 65534"' in reason
    assert 'now "1 0"' in reason
    assert "\n" not in reason


def test_datagram_identifier_rotation_opens_a_new_socket(ns: Netns) -> None:
    _datagram_allowed(ns, 0)
    out = probe_in(ns, {"addresses": ["127.0.0.1"] * 3, "gap": 1.1,
                        "settings": {"mode": "datagram", "identifier_rotation": "1s"}})
    assert [r["ok"] for r in out["results"]] == [True, True, True]
    idents = [r["ident"] for r in out["results"]]
    assert len(set(idents)) == 3  # a datagram socket's identifier is its port: new sockets


if __name__ == "__main__":
    _main()
