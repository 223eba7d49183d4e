"""Durations as operators write them ("250ms", "30s", "1m30s") and as Go prints them."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Parse a Go-style duration string into seconds; ValueError on anything else."""
    s = text.strip()
    if not s or len(s) > 64:
        raise ValueError(f'invalid duration {text!r} (use e.g. "30s", "250ms", "1m30s")')
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m:
            raise ValueError(f'invalid duration {text!r} (use e.g. "30s", "250ms", "1m30s")')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return total


def format_duration(seconds: float) -> str:
    """Format seconds the way Go's time.Duration.String does ("30s", "1h2m3s", "250ms")."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 1:
        ns = round(seconds * 1e9)
        for unit, scale in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= scale:
                return f"{sign}{_trim(ns / scale)}{unit}"
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    out = sign
    if h:
        out += f"{int(h)}h"
    if h or m:
        out += f"{int(m)}m"
    return out + f"{_trim(round(s, 9))}s"


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"
