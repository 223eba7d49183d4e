"""icmp probe internals without the network: packets, matching, deadlines, settings."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest
from icmplib.sockets import ICMPv4Socket

from healthmesh import Duration
from healthmesh.plugins.icmp.deadlines import Deadlines
from healthmesh.plugins.icmp.ledger import Burst, EchoLedger, echo_key
from healthmesh.plugins.icmp.packets import ERROR, REPLY, EchoCodec, checksum, error_text
from healthmesh.plugins.icmp.settings import IcmpSettings, validate
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.anyio

TOKEN = bytes(range(8))


def _ipv4_header(src: str, dst: str, payload_len: int, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    header = struct.pack(
        "!BBHHHBBH4s4s", (4 << 4) | ihl, 0, ihl * 4 + payload_len, 0, 0, 64, 1, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )
    return header + options


def _ipv6_header(src: str, dst: str, payload_len: int) -> bytes:
    return struct.pack(
        "!IHBB16s16s", 6 << 28, payload_len, 58, 64,
        socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst),
    )


def _reply_of(request: bytes, reply_type: int) -> bytes:
    body = bytes([reply_type, 0, 0, 0]) + request[4:]
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


# -- packets ----------------------------------------------------------------------------


def test_echo_requests_match_icmplib_byte_for_byte() -> None:
    reference = ICMPv4Socket(privileged=False) if os.geteuid() else ICMPv4Socket()
    rng = random.Random(7)
    try:
        for _ in range(500):
            token = rng.randbytes(8)
            size = rng.randint(16, 200)
            ident, seq, serial = rng.getrandbits(16), rng.getrandbits(16), rng.getrandbits(64)
            ours = EchoCodec(4, True, token, size).build(ident, seq, serial)
            payload = token + serial.to_bytes(8, "big") + bytes(size - 16)
            assert ours == reference._create_packet(ident, seq, payload)
            assert checksum(ours) == 0  # a correct checksum sums to zero
    finally:
        reference.close()


def test_replies_are_parsed_with_identifier_sequence_and_tag() -> None:
    for family, raw in ((4, True), (4, False), (6, True), (6, False)):
        codec = EchoCodec(family, raw, TOKEN, 56)
        request = codec.build(0x1234, 0xFFFF, 99)
        reply = _reply_of(request, 0 if family == 4 else 129)
        if family == 4 and raw:
            reply = _ipv4_header("127.0.0.1", "127.0.0.1", len(reply)) + reply
        msg = codec.parse(reply)
        assert msg is not None and msg.kind == REPLY
        assert (msg.ident, msg.seq) == (0x1234, 0xFFFF)
        assert msg.tag == TOKEN + (99).to_bytes(8, "big")


def test_ipv4_header_options_do_not_shift_the_parse() -> None:
    codec = EchoCodec(4, True, TOKEN, 56)
    reply = _reply_of(codec.build(7, 8, 9), 0)
    packet = _ipv4_header("10.0.0.2", "10.0.0.1", len(reply), options=b"\x01" * 8) + reply
    msg = codec.parse(packet)
    assert msg is not None and (msg.ident, msg.seq) == (7, 8)


def test_icmp_errors_name_the_quoted_destination_and_the_router() -> None:
    v4 = EchoCodec(4, True, TOKEN, 56)
    request = v4.build(1, 2, 3)
    quoted = _ipv4_header("10.0.0.1", "10.9.9.9", len(request)) + request[:8]  # RFC 792: 8 bytes
    error = bytes([3, 1, 0, 0, 0, 0, 0, 0]) + quoted
    msg = v4.parse(_ipv4_header("10.0.0.7", "10.0.0.1", len(error)) + error)
    assert msg is not None and msg.kind == ERROR
    assert (msg.ident, msg.seq, msg.quoted_destination) == (1, 2, "10.9.9.9")
    assert msg.tag == b""  # only the ICMP header was quoted
    text = error_text(4, msg.icmp_type, msg.icmp_code, "10.0.0.7")
    assert text == "destination host unreachable from 10.0.0.7"

    v6 = EchoCodec(6, True, TOKEN, 56)
    request6 = v6.build(4, 5, 6)
    error6 = bytes([3, 0, 0, 0, 0, 0, 0, 0]) + _ipv6_header("fd00::1", "fd00::9", 64) + request6
    msg6 = v6.parse(error6)
    assert msg6 is not None and msg6.kind == ERROR
    assert (msg6.ident, msg6.seq, msg6.quoted_destination) == (4, 5, "fd00::9")
    assert msg6.tag == TOKEN + (6).to_bytes(8, "big")
    assert error_text(6, 3, 0, "fd00::2") == "hop limit exceeded from fd00::2"
    assert error_text(4, 11, 0, "10.0.0.7") == "time to live exceeded from 10.0.0.7"
    assert error_text(4, 3, 99, "10.0.0.7") == "destination unreachable (code 99) from 10.0.0.7"


def test_other_icmp_messages_are_ignored() -> None:
    codec = EchoCodec(4, False, TOKEN, 56)
    assert codec.parse(codec.build(1, 1, 1)) is None  # an echo request, not a reply
    assert codec.parse(b"\x05\x00") is None  # truncated redirect
    assert codec.parse(b"") is None


# -- matching ---------------------------------------------------------------------------


def _burst(loop: asyncio.AbstractEventLoop, address: str = "127.0.0.1", count: int = 1) -> Burst:
    return Burst(address, 4, count, loop.create_future())


def _send(ledger: EchoLedger, burst: Burst, seq: int) -> tuple[int, bytes]:
    echo = ledger.new_echo(burst)
    echo.sent_ns = 1_000_000_000
    echo.sent_mono = 100.0
    key = echo_key(4, 1, seq)
    ledger.sent(echo, key)
    return key, ledger.tag(echo.serial)


async def test_late_replies_are_counted_for_their_address_and_credited_to_no_one() -> None:
    loop = asyncio.get_running_loop()
    ledger = EchoLedger()
    old = _burst(loop)
    key, tag = _send(ledger, old, seq=5)
    ledger.retire(old, 101.0)  # timed out
    new = _burst(loop)
    # A newer request that happens to reuse the same identifier and sequence.
    new_key, _new_tag = _send(ledger, new, seq=5)
    assert new_key == key
    ledger.reply(key, tag, "127.0.0.1", 1_500_000_000, 101.5)
    assert not new.future.done() and new.echoes[0].rtt is None
    assert ledger.counters.late == 1
    assert ledger.take_late("127.0.0.1") == 1
    assert ledger.take_late("127.0.0.1") == 0


async def test_duplicate_replies_are_ignored() -> None:
    loop = asyncio.get_running_loop()
    ledger = EchoLedger()
    burst = _burst(loop)
    key, tag = _send(ledger, burst, seq=1)
    ledger.reply(key, tag, "127.0.0.1", 1_000_200_000, 100.001)
    ledger.reply(key, tag, "127.0.0.1", 1_000_300_000, 100.002)
    assert burst.future.done() and burst.echoes[0].rtt == pytest.approx(200e-6)
    assert (ledger.counters.replies, ledger.counters.duplicates) == (1, 1)


async def test_replies_for_another_pinger_or_from_another_address_are_not_credited() -> None:
    loop = asyncio.get_running_loop()
    ledger = EchoLedger()
    burst = _burst(loop)
    key, tag = _send(ledger, burst, seq=1)
    ledger.reply(key, b"\xff" * 8 + tag[8:], "127.0.0.1", 1_000_200_000, 100.001)
    ledger.reply(key, tag, "127.0.0.2", 1_000_200_000, 100.001)
    assert not burst.future.done()
    assert ledger.counters.stray == 2


async def test_a_stepped_wall_clock_falls_back_to_the_monotonic_clock() -> None:
    loop = asyncio.get_running_loop()
    ledger = EchoLedger()
    burst = _burst(loop)
    key, tag = _send(ledger, burst, seq=1)
    ledger.reply(key, tag, "127.0.0.1", 1_000_000_000 - 5_000_000_000, 100.0003)  # stepped back
    assert burst.echoes[0].rtt == pytest.approx(0.0003)


async def test_icmp_errors_settle_only_the_request_they_quote() -> None:
    loop = asyncio.get_running_loop()
    ledger = EchoLedger()
    burst = _burst(loop, "10.9.9.9", count=2)
    key1, _ = _send(ledger, burst, seq=1)
    key2, _ = _send(ledger, burst, seq=2)
    ledger.error(key1, b"", "10.9.9.8", "wrong destination", 100.1)  # not ours: ignored
    ledger.error(key1, b"", "10.9.9.9", "destination host unreachable from 10.0.0.7", 100.1)
    assert not burst.future.done()
    assert burst.echoes[0].error == "destination host unreachable from 10.0.0.7"
    assert key2 in ledger.in_flight


async def test_deadlines_fire_in_order_on_one_timer() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    now = loop.time()
    futures = [loop.create_future() for _ in range(4)]
    deadlines.add(now + 0.05, futures[0])
    deadlines.add(now + 0.10, futures[1])
    deadlines.add(now + 0.02, futures[2])  # out of order: its own timer
    deadlines.add(now + 0.10, futures[3])
    futures[3].set_result(None)  # answered before its deadline
    with anyio.fail_after(2):
        await futures[2]
        assert not futures[0].done()
        await futures[0]
        assert not futures[1].done()
        await futures[1]
    assert len(deadlines) == 0


# -- settings ---------------------------------------------------------------------------


def _config(timeout: float) -> SimpleNamespace:
    return SimpleNamespace(probing=SimpleNamespace(timeout=timeout))


def test_a_burst_longer_than_the_timeout_is_a_config_error() -> None:
    validate(IcmpSettings(count=5, spacing=Duration(0.1)), _config(1.0))
    with pytest.raises(ValueError, match=r"^spacing: 20 echo requests 100ms apart"):
        validate(IcmpSettings(count=20, spacing=Duration(0.1)), _config(1.0))
    with pytest.raises(ValueError, match="payload_size"):
        validate(IcmpSettings(payload_size=8), _config(1.0))
    with pytest.raises(ValueError, match="count"):
        validate(IcmpSettings(count=0), _config(1.0))


def test_config_check_names_the_icmp_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[node]\nname = "n1"\naddresses = ["127.0.0.1"]\n'
        '[probing]\ntimeout = "500ms"\ninterval = "5s"\n'
        '[probes.icmp]\ncount = 10\nspacing = "100ms"\n'
        '[sources.static]\nnodes = [{name = "n2", addresses = ["127.0.0.2"]}]\n'
    )
    proc = run_cli("config", "check", "-c", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert "probes.icmp.spacing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_icmp_kind_is_registered_through_its_entry_point() -> None:
    proc = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-c",
         "from importlib.metadata import entry_points;"
         "ep = [e for e in entry_points(group='healthmesh') if e.name == 'icmp'][0];"
         "m = ep.load(); seen = [];"
         "m.register_probe_kinds(register=seen.append);"
         "print(seen[0].name, seen[0].__module__)"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert proc.stdout.split() == ["icmp", "healthmesh.plugins.icmp.probe"], proc.stderr


async def test_finished_requests_are_remembered_for_the_horizon_then_forgotten() -> None:
    from healthmesh.plugins.icmp.ledger import MARK_EVERY

    loop = asyncio.get_running_loop()
    ledger = EchoLedger(horizon=30.0)
    sent = []
    for i in range(50):  # finished over 2.5 s, from t=100
        burst = _burst(loop)
        key, tag = _send(ledger, burst, seq=i)
        ledger.retire(burst, 100.0 + i * 0.05)
        sent.append((key, tag))
    ledger.prune(100.0 + 30.0)  # the first is exactly one horizon old: all kept
    assert len(ledger._recent) == 50
    ledger.prune(100.0 + 30.0 + 1.0 + MARK_EVERY)  # those finished before t=101 are gone
    assert 29 <= len(ledger._recent) <= 31
    ledger.prune(200.0)
    assert not ledger._recent and not ledger._recent_order and not ledger._marks
    key, tag = sent[-1]
    ledger.reply(key, tag, "127.0.0.1", 1_500_000_000, 200.0)  # too old to know: stray
    assert (ledger.counters.late, ledger.counters.stray) == (0, 1)
