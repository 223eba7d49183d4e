"""Mesh rows in etcd: a compact encoding of one agent's row, strict decoding, and the publisher.

A row is stored at ``<prefix>/rows/v1/<cluster>/<node>`` under the agent's heartbeat lease
(it vanishes with the agent) as zlib-compressed JSON::

    {"v": 1, "o": "c/n", "ts": 1796119200, "k": ["http", "icmp"],
     "c": [["c/t", "rr", 412, 0, 1796119100], ...]}

one entry per target: its id, one character per kind of ``k`` (``r`` reachable, ``u``
unreachable, ``p`` partial, ``-`` unknown), RTT p50 in microseconds, loss in hundredths
of a percent, and the epoch second of its last change (each may be null). Values read back
are untrusted: size-bounded before and after decompression, schema-checked, the observer
must match the key; a bad row raises ``BadValue`` and is skipped by the table.
"""

from __future__ import annotations

import json
import math
import re
import time
import zlib
from typing import Any

import anyio
import msgspec
from loguru import logger

from healthmesh import cell_state
from healthmesh.plugins.clustermesh.client import EtcdClient, EtcdError
from healthmesh.plugins.clustermesh.records import BadValue

VERSION = 1
#: Bound on a decompressed row (a 5,000-peer row is about 250 kB; allow 100,000 peers).
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_TARGETS = 100_000
MAX_KINDS = 16
#: Cluster-wide budget of row writes per second: each agent writes at most once per
#: ``N / WRITE_BUDGET`` seconds in an N-node mesh (docs/mesh.md, "Load on etcd").
WRITE_BUDGET = 100.0
#: Loss bands (percent) whose crossing counts as a change worth publishing before the refresh.
LOSS_BANDS = (10.0, 25.0, 50.0)

_STATE_CHAR = {"reachable": "r", "unreachable": "u", "partial": "p", "unknown": "-"}
_CHAR_STATE = {v: k for k, v in _STATE_CHAR.items()}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}/[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def rows_prefix(prefix: str) -> str:
    """``<prefix>/rows/v1/``: where rows live."""
    return f"{prefix}/rows/v1/"


def row_key(prefix: str, cluster: str, name: str) -> str:
    """``<prefix>/rows/v1/<cluster>/<name>``."""
    return f"{rows_prefix(prefix)}{cluster}/{name}"


def _int_or_none(x: Any, scale: float) -> int | None:
    if x is None or not isinstance(x, (int, float)) or math.isnan(x):
        return None
    return max(0, round(x * scale))


def encode_row(row: dict[str, Any]) -> bytes:
    """The compact, compressed value of a row as ``AgentContext.local_row()`` returns it."""
    kinds = sorted({k for cell in row["cells"].values() for k in cell.get("kinds", {})})
    entries = []
    for target, cell in sorted(row["cells"].items()):
        states = "".join(_STATE_CHAR.get(cell["kinds"].get(k, "unknown"), "-") for k in kinds)
        entries.append([
            target, states, _int_or_none(cell.get("rtt_ms"), 1000.0),
            _int_or_none(cell.get("loss_pct"), 100.0), _int_or_none(cell.get("since"), 1.0),
        ])  # fmt: skip
    payload = {"v": VERSION, "o": row["observer"], "ts": int(row["timestamp"]), "k": kinds,
               "c": entries}  # fmt: skip
    return zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), 6)


class _RowRecord(msgspec.Struct):
    v: int
    o: str
    ts: int
    k: list[str]
    c: list[tuple[str, str, int | None, int | None, int | None]]


def decode_row(cluster: str, name: str, raw: bytes, *, max_bytes: int) -> dict[str, Any]:
    """The row stored at ``.../rows/v1/<cluster>/<name>``; BadValue with a reason otherwise."""
    if len(raw) > max_bytes:
        raise BadValue(f"row is {len(raw)} bytes, larger than rows_max_bytes ({max_bytes})")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(raw, MAX_JSON_BYTES)
    except zlib.error as exc:
        raise BadValue(f"row is not zlib data: {exc}") from None
    if inflater.unconsumed_tail:
        raise BadValue(f"row inflates to more than {MAX_JSON_BYTES} bytes")
    if not inflater.eof:
        raise BadValue("row is truncated zlib data")
    try:
        rec = msgspec.json.decode(text, type=_RowRecord)
    except msgspec.ValidationError as exc:
        raise BadValue(f"row has the wrong schema: {str(exc).splitlines()[0][:200]}") from None
    except msgspec.DecodeError as exc:
        raise BadValue(f"row is not JSON: {str(exc).splitlines()[0][:200]}") from None
    if rec.v != VERSION:
        raise BadValue(f"row version {rec.v} is not {VERSION}")
    if rec.o != f"{cluster}/{name}":
        raise BadValue(f"observer {rec.o[:80]!r} does not match the key")
    if len(rec.k) > MAX_KINDS or len(set(rec.k)) != len(rec.k):
        raise BadValue(f"more than {MAX_KINDS} kinds, or a kind twice")
    for kind in rec.k:
        if not _KIND_RE.match(kind):
            raise BadValue(f"bad kind name {kind[:40]!r}")
    if len(rec.c) > MAX_TARGETS:
        raise BadValue(f"more than {MAX_TARGETS} targets")
    cells: dict[str, dict[str, Any]] = {}
    for target, states, rtt_us, loss, since in rec.c:
        if not _ID_RE.match(target):
            raise BadValue(f"bad target {target[:80]!r}")
        if len(states) != len(rec.k) or any(ch not in _CHAR_STATE for ch in states):
            raise BadValue(f"bad states {states[:40]!r} for target {target}")
        if (rtt_us is not None and not 0 <= rtt_us <= 3_600_000_000) or (
            loss is not None and not 0 <= loss <= 10_000
        ):
            raise BadValue(f"RTT or loss out of range for target {target}")
        kinds = {k: _CHAR_STATE[ch] for k, ch in zip(rec.k, states)}
        cells[target] = {
            "state": cell_state(kinds),
            "kinds": kinds,
            "rtt_ms": None if rtt_us is None else rtt_us / 1000.0,
            "loss_pct": None if loss is None else loss / 100.0,
            "since": None if since is None else float(since),
        }
    return {"observer": rec.o, "timestamp": float(rec.ts), "cells": cells}


def signature(row: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    """What makes a row worth publishing before its refresh: each target's kind states and
    its loss band (RTT and small loss changes wait for the refresh)."""
    out = {}
    for target, cell in row["cells"].items():
        loss = cell.get("loss_pct")
        band = None if loss is None else sum(1 for edge in LOSS_BANDS if loss >= edge)
        out[target] = (tuple(sorted(cell.get("kinds", {}).items())), band)
    return out


class RowPublisher:
    """Writes this agent's row under its heartbeat lease: on a change (at most once per
    ``gap``) and at least every ``refresh``; ``gap`` grows with the mesh so that the whole
    mesh stays within WRITE_BUDGET writes per second."""

    def __init__(
        self,
        context: Any,
        conn: Any,
        registration: Any,
        prefix: str,
        *,
        min_gap: float,
        refresh: float,
    ) -> None:
        self.context = context
        self.conn = conn
        self.registration = registration
        node = context.local_node
        self.key = row_key(prefix, node.cluster, node.name)
        self.min_gap = min_gap
        self.refresh = refresh
        self.writes = 0
        self.last_size = 0

    def gap(self, nodes: int) -> float:
        """Least seconds between two writes of this agent in a mesh of ``nodes``."""
        return max(self.min_gap, nodes / WRITE_BUDGET)

    async def run(self) -> None:
        async with EtcdClient(self.conn) as client:
            last_sig: dict[str, Any] | None = None
            last_write = -math.inf
            last_lease = 0
            while True:
                row = self.context.local_row()
                gap = self.gap(len(row["cells"]))
                lease = self.registration.lease
                now = time.monotonic()
                since = now - last_write
                if lease:
                    sig = signature(row)
                    due = (
                        lease != last_lease
                        or (sig != last_sig and since >= gap)
                        or since >= max(self.refresh, gap)
                    )
                    if due:
                        value = encode_row(row)
                        try:
                            await client.put(self.key, value, lease=lease)
                        except EtcdError as exc:
                            logger.debug("sources.etcd: could not write the row: {}", exc)
                        else:
                            last_sig, last_write, last_lease = sig, now, lease
                            self.writes += 1
                            self.last_size = len(value)
                # A poll is a snapshot build: often in a small mesh, less so in a large one.
                await anyio.sleep(min(1.0, max(0.1, gap / 4)))
