"""Listen addresses as written in the config (``ADDR:PORT``, IPv6 in brackets): parsed, checked.

One parser for every listener (the responder, the metrics endpoint, the web page), so that the
same mistake gets the same one-line answer whichever section it is made in.
"""

from __future__ import annotations

import ipaddress


def parse_listen(text: str, example: str = "0.0.0.0:4240") -> tuple[str, int]:
    """``(address, port)`` from ``ADDR:PORT``; ValueError saying why not, with ``example``."""
    hint = f'use ADDR:PORT, with an IPv6 address in brackets, e.g. "{example}"'
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        ok = bool(sep) and ":" in host
    else:
        host, sep, port_text = text.rpartition(":")
        ok = bool(sep) and ":" not in host
    if not ok:
        raise ValueError(f"{text!r} is not a listen address; {hint}")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address; {hint}") from None
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"{port_text!r} is not a TCP port (1-65535; 0 picks a free one)")
    return str(addr), int(port_text)


def format_listen(address: str, port: int) -> str:
    """The ``ADDR:PORT`` text of a listen address (IPv6 in brackets)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
