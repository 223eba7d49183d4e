"""The ``[probes.icmp]`` config section and its checks."""

from __future__ import annotations

from typing import Any, Literal

from healthmesh import ComponentSettings, Duration

#: Bytes of the echo payload that identify a request: an 8-byte agent token + 8-byte serial.
MIN_PAYLOAD = 16
#: Keeps an echo request inside the IPv6 minimum MTU (1280 - 40 IPv6 - 8 ICMPv6 header).
MAX_PAYLOAD = 1232


class IcmpSettings(ComponentSettings):
    """``[probes.icmp]``: echo requests per probe, their spacing and the socket to use."""

    #: Echo requests per probe; the result carries their loss % and the median RTT.
    count: int = 1
    #: Time between the echo requests of one probe.
    spacing: Duration = Duration(0.01)
    #: Bytes of echo data (56 like ping's default); the first 16 identify the request.
    payload_size: int = 56
    #: "auto": a raw socket when allowed, else an unprivileged datagram ICMP socket.
    mode: Literal["auto", "raw", "datagram"] = "auto"
    #: How long one echo identifier is used before the next, so that a stateful firewall
    #: or conntrack entry keyed on the identifier cannot keep a path failed forever.
    identifier_rotation: Duration = Duration(60.0)
    #: Receive buffer per socket, in bytes, so replies to a burst of thousands fit.
    receive_buffer: int = 4 * 1024 * 1024


def validate(settings: IcmpSettings, config: Any) -> None:
    """Raise ValueError, naming the key, when the settings cannot work together."""
    timeout = float(config.probing.timeout)
    if not 1 <= settings.count <= 100:
        raise ValueError("count: must be between 1 and 100")
    if settings.spacing < 0:
        raise ValueError("spacing: must not be negative")
    if settings.count > 1 and (settings.count - 1) * settings.spacing >= timeout:
        raise ValueError(
            f"spacing: {settings.count} echo requests {settings.spacing * 1000:g}ms apart "
            f"do not fit in probing.timeout ({timeout * 1000:g}ms)"
        )
    if not MIN_PAYLOAD <= settings.payload_size <= MAX_PAYLOAD:
        raise ValueError(f"payload_size: must be between {MIN_PAYLOAD} and {MAX_PAYLOAD}")
    if settings.identifier_rotation < 1.0:
        raise ValueError("identifier_rotation: must be at least 1s")
    if not 65_536 <= settings.receive_buffer <= 1 << 30:
        raise ValueError("receive_buffer: must be between 65536 and 1073741824 bytes")
