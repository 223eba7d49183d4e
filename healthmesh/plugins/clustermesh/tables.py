"""Node tables kept from etcd keys: healthmesh registrations with heartbeats, or Cilium nodes.

A table is fed key by key (a full load, then watch events) and hands out the current node
list. Bad keys and values are skipped with one warning naming the key; a bad value that
replaces a good one leaves the last good node in place.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from loguru import logger

from healthmesh import Node
from healthmesh.plugins.clustermesh.records import (
    CILIUM_PREFIX,
    BadValue,
    alive_prefix,
    decode_cilium,
    decode_healthmesh,
    nodes_prefix,
    split_key,
)
from healthmesh.plugins.clustermesh.rows import decode_row, rows_prefix

Decoder = Callable[..., Node]


class NodeTable:
    """Nodes decoded from the keys under ``watch_prefix``."""

    #: The prefix to load and watch.
    watch_prefix: str
    #: Where the watched range ends (excluded) when not at the end of the prefix.
    watch_end: str | None = None

    def __init__(
        self,
        label: str,
        clusters: Iterable[str],
        *,
        max_bytes: int,
        exclude: str | None = None,
        interval: float | None = None,
    ) -> None:
        self.label = label
        self.clusters = set(clusters)
        self.max_bytes = max_bytes
        self.exclude = exclude
        self.interval = interval
        self._nodes: dict[str, Node] = {}  # node id -> node
        self._key_of: dict[str, str] = {}  # key -> node id, for deletes
        self._warned: dict[str, int] = {}  # key -> crc of the value warned about

    # -- feeding ----------------------------------------------------------------------

    def load(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Start over from a full listing of the prefix."""
        self._nodes.clear()
        self._key_of.clear()
        self._load_extra()
        for key, value in items:
            self.apply(key, value)

    def apply(self, key: str, value: bytes | None) -> None:
        """One key was put (``value``) or deleted (None)."""
        raise NotImplementedError

    def _load_extra(self) -> None:
        return None

    def _apply_node(self, key: str, prefix: str, value: bytes | None, decode: Decoder) -> None:
        if value is None:
            node_id = self._key_of.pop(key, None)
            if node_id is not None:
                self._nodes.pop(node_id, None)
            self._warned.pop(key, None)
            return
        where = split_key(key, prefix)
        if where is None:
            self._warn(key, value, "not a <cluster>/<node> key")
            return
        cluster, name = where
        if cluster not in self.clusters:
            known = ", ".join(sorted(self.clusters))
            self._warn(key, value, f"unknown cluster {cluster[:80]!r} (expected: {known})")
            return
        node_id = f"{cluster}/{name}"
        if node_id == self.exclude:
            return
        try:
            node = decode(cluster, name, value, max_bytes=self.max_bytes)
        except BadValue as exc:
            keeping = "; keeping its last good value" if node_id in self._nodes else ""
            self._warn(key, value, f"{exc}{keeping}")
            return
        self._warned.pop(key, None)
        self._nodes[node_id] = node
        self._key_of[key] = node_id

    def _warn(self, key: str, value: bytes, reason: str) -> None:
        crc = zlib.crc32(value)
        if self._warned.get(key) == crc:
            return  # already said, for this very value
        if len(self._warned) < 100_000:
            self._warned[key] = crc
        logger.warning("{}: skipping {}: {}", self.label, key[:300], reason)

    # -- reading ----------------------------------------------------------------------

    def node_ids(self) -> set[str]:
        """The ids (``cluster/name``) of the current nodes."""
        return set(self._nodes)

    def nodes(self, *, stale: bool = False) -> list[Node]:
        """The current nodes, each with its ``info`` (heartbeat) and probe interval."""
        return [
            dataclasses.replace(node, interval=self.interval, info=self._info(node_id, stale))
            for node_id, node in sorted(self._nodes.items())
        ]

    def _info(self, node_id: str, stale: bool) -> dict[str, str]:
        return {"heartbeat": "unknown"}


class HealthmeshTable(NodeTable):
    """healthmesh's layout: ``<prefix>/nodes/v1/<cluster>/<node>`` and leased heartbeats."""

    def __init__(
        self,
        label: str,
        prefix: str,
        clusters: Iterable[str],
        *,
        rows_max_bytes: int | None = None,
        **kw: object,
    ) -> None:
        super().__init__(label, clusters, **kw)  # type: ignore[arg-type]
        self.watch_prefix = f"{prefix}/"
        self._nodes_prefix = nodes_prefix(prefix)
        self._alive_prefix = alive_prefix(prefix)
        self._alive: set[str] = set()
        #: Mesh rows (docs/mesh.md) by observer id, kept when ``rows_max_bytes`` is set:
        #: stored as written and decoded only when the matrix is asked for (a watch event
        #: costs no decoding: every agent sees every row's writes).
        self._rows_prefix = rows_prefix(prefix) if rows_max_bytes else None
        self.rows_max_bytes = rows_max_bytes or 0
        self._rows: dict[str, tuple[str, bytes]] = {}  # observer -> (key, value)
        self._decoded: dict[str, tuple[bytes, dict[str, Any]]] = {}
        if self._rows_prefix is None:
            # Not reading rows: leave them out of the load and the watch altogether (they
            # sort after nodes/v1/, which sorts after alive/v1/).
            self.watch_end = self._nodes_prefix[:-1] + "0"

    def _load_extra(self) -> None:
        self._alive.clear()
        self._rows.clear()

    def rows(self) -> dict[str, dict[str, Any]]:
        """The other observers' valid rows, by observer id (decoded now, or cached)."""
        out: dict[str, dict[str, Any]] = {}
        for observer, (key, value) in list(self._rows.items()):
            cached = self._decoded.get(observer)
            if cached is not None and cached[0] is value:
                out[observer] = cached[1]
                continue
            cluster, name = observer.split("/", 1)
            try:
                row = decode_row(cluster, name, value, max_bytes=self.rows_max_bytes)
            except BadValue as exc:
                self._decoded.pop(observer, None)
                self._warn(key, value, str(exc))
                continue
            self._decoded[observer] = (value, row)
            out[observer] = row
        for gone in set(self._decoded) - set(self._rows):
            del self._decoded[gone]
        return out

    def _apply_row(self, key: str, value: bytes | None) -> None:
        assert self._rows_prefix is not None
        where = split_key(key, self._rows_prefix)
        if where is None or where[0] not in self.clusters:
            if value is not None:
                self._warn(key, value, "not a row of a known cluster")
            return
        observer = "/".join(where)
        if observer == self.exclude:
            return
        if value is None or len(value) > self.rows_max_bytes:
            self._rows.pop(observer, None)  # a bad row never stands for a good one
            self._warned.pop(key, None)
            if value is not None:
                self._warn(key, value, f"row is {len(value)} bytes, larger than rows_max_bytes "
                                       f"({self.rows_max_bytes})")
            return
        self._rows[observer] = (key, value)

    def apply(self, key: str, value: bytes | None) -> None:
        if self._rows_prefix is not None and key.startswith(self._rows_prefix):
            self._apply_row(key, value)
        elif key.startswith(self._nodes_prefix):
            self._apply_node(key, self._nodes_prefix, value, decode_healthmesh)
        elif key.startswith(self._alive_prefix):
            where = split_key(key, self._alive_prefix)
            if where is None:
                return
            node_id = "/".join(where)
            if value is None:
                self._alive.discard(node_id)
            else:
                self._alive.add(node_id)
        # Other keys under the prefix belong to other versions of the layout: not ours.

    def _info(self, node_id: str, stale: bool) -> dict[str, str]:
        if stale:
            return {"heartbeat": "unknown"}
        return {"heartbeat": "alive" if node_id in self._alive else "expired"}


class CiliumTable(NodeTable):
    """Cilium's own node keys, ``cilium/state/nodes/v1/<cluster>/<node>`` (read-only)."""

    def __init__(self, label: str, clusters: Iterable[str], **kw: object) -> None:
        super().__init__(label, clusters, **kw)  # type: ignore[arg-type]
        self.watch_prefix = f"{CILIUM_PREFIX}/"

    def apply(self, key: str, value: bytes | None) -> None:
        self._apply_node(key, self.watch_prefix, value, decode_cilium)
