"""The ``dns`` check kind: resolve names against a chosen server or the system resolver.

Queries go over UDP from a connected socket (so that a stopped server's ICMP "port
unreachable" is seen as *refused* at once, not waited out as a timeout) and are retried over
TCP when the answer is truncated. dnspython builds and parses the messages. Every name is
its own target, timed on its own; the outcomes NXDOMAIN, SERVFAIL, REFUSED, no answer in time
and port unreachable are told apart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import anyio

from healthmesh import Check, CheckSettings, ProbeResult, format_duration, hookimpl, lazy_import
from healthmesh.plugins.checks import (
    MAX_TARGETS,
    config_relative,
    join_host_port,
    split_host_port,
    valid_hostname,
)

#: dnspython, loaded when the first dns check runs (most agents have none).
dns = lazy_import("dns", "asyncquery", "exception", "flags", "message", "rcode", "rdatatype")

RESOLV_CONF = "/etc/resolv.conf"
MAX_RESOLV_BYTES = 64 * 1024
MAX_NAMESERVERS = 3  # as libc uses at most three


class DnsSettings(CheckSettings, kw_only=True):
    """``[checks.<name>]`` with ``kind = "dns"``."""

    #: ``address[:port]`` of the DNS server; omitted: the nameservers of ``resolv_conf``.
    server: str | None = None
    names: list[str]
    #: ``"any"``: at least one address; or addresses that must all be in the answer.
    expect: str | list[str] = "any"
    record_type: Literal["A", "AAAA"] = "A"
    resolv_conf: str = RESOLV_CONF


def parse_resolv_conf(text: str) -> list[tuple[str, int]]:
    """The ``nameserver`` addresses of a resolv.conf, in order (at most three), port 53."""
    servers: list[tuple[str, int]] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            addr = parts[1].split("%")[0]  # a zone index is not needed to send
            try:
                servers.append((str(ipaddress.ip_address(addr)), 53))
            except ValueError:
                continue
    return servers[:MAX_NAMESERVERS]


class DnsCheck(Check):
    """Resolves each of ``names``; ok when the answer has the expected addresses."""

    name = "dns"
    Settings = DnsSettings

    @classmethod
    def validate_settings(cls, settings: DnsSettings, config: Any) -> None:
        settings.resolv_conf = config_relative(settings.resolv_conf, config)
        if not settings.names:
            raise ValueError("names: at least one name is required")
        if len(settings.names) > MAX_TARGETS:
            raise ValueError(f"names: {len(settings.names)} names; at most {MAX_TARGETS}")
        for i, name in enumerate(settings.names):
            if not valid_hostname(name):
                raise ValueError(f"names[{i}]: {name!r} is not a DNS name")
        if len(set(settings.names)) != len(settings.names):
            raise ValueError("names: duplicate name")
        if settings.server is not None:
            host, _ = split_host_port(settings.server, 53)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(
                    f"server: {settings.server!r}: give the server's IP address, not a name"
                ) from None
        if isinstance(settings.expect, str):
            if settings.expect != "any":
                raise ValueError(f'expect: {settings.expect!r}: use "any" or a list of addresses')
        else:
            if not settings.expect or len(settings.expect) > MAX_TARGETS:
                raise ValueError(f"expect: between 1 and {MAX_TARGETS} addresses")
            want = 4 if settings.record_type == "A" else 6
            for i, addr in enumerate(settings.expect):
                try:
                    ip = ipaddress.ip_address(addr)
                except ValueError:
                    raise ValueError(f"expect[{i}]: {addr!r} is not an IP address") from None
                if ip.version != want:
                    raise ValueError(
                        f"expect[{i}]: {addr} is not an IPv{want} address "
                        f"(record_type = {settings.record_type!r})"
                    )
                settings.expect[i] = str(ip)

    def targets(self) -> list[str]:
        return list(self.settings.names)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "server": s.server if s.server is not None else f"system ({s.resolv_conf})",
            "record_type": s.record_type,
            "expect": s.expect,
        }

    async def _servers(self) -> list[tuple[str, int]]:
        s = self.settings
        if s.server is not None:
            return [split_host_port(s.server, 53)]
        # Read each time (in a thread: file I/O), so a changed resolv.conf is followed.
        text = await anyio.to_thread.run_sync(_read_small, s.resolv_conf)
        return parse_resolv_conf(text)

    async def check(self, target: str, timeout: float) -> ProbeResult:
        try:
            servers = await self._servers()
        except OSError as exc:
            return ProbeResult.failure(
                f"cannot read {self.settings.resolv_conf}: {exc.strerror or exc}", outcome="error"
            )
        if not servers:
            return ProbeResult.failure(
                f"no nameserver in {self.settings.resolv_conf}", outcome="error"
            )
        rdtype = dns.rdatatype.from_text(self.settings.record_type)
        deadline = time.monotonic() + timeout
        result: ProbeResult | None = None
        # Like the system resolver: the next server when one fails, each a share of the time.
        for i, (host, port) in enumerate(servers):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            budget = left / (len(servers) - i)
            result = await self._query(target, rdtype, host, port, budget)
            if result.ok or result.details.get("outcome") in ("nxdomain", "unexpected", "nodata"):
                return result
        assert result is not None
        return result

    async def _query(
        self, name: str, rdtype: Any, host: str, port: int, timeout: float
    ) -> ProbeResult:
        where = join_host_port(host, port)
        query = dns.message.make_query(name, rdtype)
        start = time.perf_counter()
        try:
            with anyio.fail_after(timeout):
                response = await udp_query(query, host, port)
                used_tcp = bool(response.flags & dns.flags.TC)
                if used_tcp:
                    left = max(0.001, timeout - (time.perf_counter() - start))
                    response = await dns.asyncquery.tcp(query, host, timeout=left, port=port)
        except (TimeoutError, dns.exception.Timeout):
            return _fail(
                f"timeout: no answer from {where} within {format_duration(round(timeout, 3))}",
                "timeout", where,
            )
        except ConnectionRefusedError:
            return _fail(f"refused: nothing listens on {where} (port unreachable)",
                         "refused", where)
        except (OSError, EOFError) as exc:
            text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            return _fail(f"error talking to {where}: {text}", "error", where)
        except dns.exception.DNSException as exc:
            return _fail(f"bad answer from {where}: {exc}", "error", where)
        rtt = time.perf_counter() - start
        transport = "tcp" if used_tcp else "udp"
        rcode = response.rcode()
        rcode_text = dns.rcode.to_text(rcode)
        common = {"server": where, "transport": transport, "rcode": rcode_text}
        if rcode == dns.rcode.NXDOMAIN:
            return ProbeResult.failure(f"NXDOMAIN: {name} does not exist (server {where})",
                                       outcome="nxdomain", **common)
        if rcode == dns.rcode.SERVFAIL:
            return ProbeResult.failure(f"SERVFAIL from {where}", outcome="servfail", **common)
        if rcode == dns.rcode.REFUSED:
            return ProbeResult.failure(f"REFUSED by {where}", outcome="refused", **common)
        if rcode != dns.rcode.NOERROR:
            return ProbeResult.failure(f"{rcode_text} from {where}", outcome="error", **common)
        answers = sorted(
            {rd.address for rrset in response.answer if rrset.rdtype == rdtype for rd in rrset},
            key=ipaddress.ip_address,
        )
        details: dict[str, Any] = {**common, "answers": answers[:16]}
        if not answers:
            return ProbeResult.failure(
                f"no {self.settings.record_type} record for {name} (server {where})",
                outcome="nodata", **details,
            )
        expect = self.settings.expect
        if not isinstance(expect, str):
            missing = [a for a in expect if a not in answers]
            if missing:
                return ProbeResult.failure(
                    f"answer {', '.join(answers[:4])} lacks expected {', '.join(missing[:4])}",
                    outcome="unexpected", **details,
                )
        return ProbeResult.success(rtt, outcome="answer", **details)


async def udp_query(query: dns.message.Message, host: str, port: int) -> dns.message.Message:
    """Send ``query`` over UDP and return the matching answer (others are dropped).

    Cancel it to bound it in time. Raises ConnectionRefusedError when the server's host
    answers with ICMP port unreachable.
    """
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((host, port))  # connected: the kernel reports ICMP errors to recv
        await loop.sock_sendall(sock, query.to_wire())
        while True:
            data = await loop.sock_recv(sock, 65535)
            try:
                response = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue  # not a DNS message: keep waiting for the real answer
            if query.is_response(response):
                return response


def _fail(error: str, outcome: str, where: str) -> ProbeResult:
    return ProbeResult.failure(error, outcome=outcome, server=where)


def _read_small(path: str) -> str:
    with open(Path(path), "rb") as f:
        return f.read(MAX_RESOLV_BYTES).decode("utf-8", "replace")


@hookimpl
def register_check_kinds(register: Callable[[type[Check]], None]) -> None:
    register(DnsCheck)
