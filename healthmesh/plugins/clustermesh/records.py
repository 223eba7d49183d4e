"""Node records in etcd: healthmesh's keys and values, Cilium's node keys, strict decoding.

Everything read from etcd is untrusted: a value is size-bounded, decoded against a schema,
its name and cluster must match its key, and its addresses are validated; a bad value raises
``BadValue`` with a one-line reason and never reaches the mesh.
"""

from __future__ import annotations

import json
import re
import time

import msgspec

from healthmesh import ConfigError, Node, __version__, parse_nodes

#: Addresses per role a record may carry (a real node has a handful).
MAX_ADDRESSES = 16
MAX_LABELS = 64
CILIUM_PREFIX = "cilium/state/nodes/v1"
#: Cilium address types probed as host paths, in order of preference.
CILIUM_HOST_TYPES = ("InternalIP", "ExternalIP")


class BadValue(ValueError):
    """A value that is not a valid node record; the text says why."""


def nodes_prefix(prefix: str) -> str:
    """``<prefix>/nodes/v1/``: where registrations live."""
    return f"{prefix}/nodes/v1/"


def alive_prefix(prefix: str) -> str:
    """``<prefix>/alive/v1/``: where leased heartbeats live."""
    return f"{prefix}/alive/v1/"


def node_key(prefix: str, cluster: str, name: str) -> str:
    """``<prefix>/nodes/v1/<cluster>/<name>``."""
    return f"{nodes_prefix(prefix)}{cluster}/{name}"


def alive_key(prefix: str, cluster: str, name: str) -> str:
    """``<prefix>/alive/v1/<cluster>/<name>``."""
    return f"{alive_prefix(prefix)}{cluster}/{name}"


def split_key(key: str, prefix: str) -> tuple[str, str] | None:
    """(cluster, name) of ``<prefix><cluster>/<name>``, or None when the key has another shape."""
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix) :].split("/")
    if len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]


def encode_node(node: Node) -> bytes:
    """The registration value of a node (docs/etcd.md)."""
    return json.dumps(
        {
            "name": node.name,
            "cluster": node.cluster,
            "addresses": list(node.addresses),
            "health_addresses": list(node.health_addresses),
            "labels": dict(node.labels),
            "version": __version__,
        },
        separators=(",", ":"),
    ).encode()


def encode_heartbeat(node: Node) -> bytes:
    """The value of the leased heartbeat key."""
    return json.dumps(
        {"name": node.name, "cluster": node.cluster, "since": int(time.time())},
        separators=(",", ":"),
    ).encode()


class _HealthmeshRecord(msgspec.Struct):
    """The registration value; unknown fields are allowed (newer agents may add some)."""

    name: str
    cluster: str
    addresses: list[str]
    health_addresses: list[str] = msgspec.field(default_factory=list)
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    version: str | None = None


class _CiliumAddress(msgspec.Struct):
    Type: str = ""
    IP: str = ""


class _CiliumRecord(msgspec.Struct):
    """The fields of Cilium's ``nodeTypes.Node`` that healthmesh uses (the rest are ignored)."""

    Name: str
    Cluster: str = ""
    IPAddresses: list[_CiliumAddress] | None = None
    IPv4HealthIP: str | None = ""
    IPv6HealthIP: str | None = ""
    Labels: dict[str, str] | None = None


def _decode(raw: bytes, typ: type, max_bytes: int) -> object:
    if len(raw) > max_bytes:
        raise BadValue(f"value is {len(raw)} bytes, larger than max_value_bytes ({max_bytes})")
    if not raw.strip():
        raise BadValue("value is empty")
    try:
        return msgspec.json.decode(raw, type=typ)
    except msgspec.ValidationError as exc:
        raise BadValue(f"wrong schema: {_first_line(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise BadValue(f"invalid JSON: {_first_line(str(exc))}") from None


def _first_line(text: str) -> str:
    return text.splitlines()[0][:200] if text else "?"


def _node(
    cluster: str,
    name: str,
    addresses: list[str],
    health_addresses: list[str],
    labels: dict[str, str],
) -> Node:
    if len(addresses) > MAX_ADDRESSES or len(health_addresses) > MAX_ADDRESSES:
        raise BadValue(f"more than {MAX_ADDRESSES} addresses")
    if len(labels) > MAX_LABELS:
        raise BadValue(f"more than {MAX_LABELS} labels")
    table = {
        "name": name,
        "cluster": cluster,
        "addresses": addresses,
        "health_addresses": health_addresses,
        "labels": labels,
    }
    try:
        return parse_nodes([table], "value")[0]
    except ConfigError as exc:
        raise BadValue(re.sub(r"^value\[0\]\.?", "", str(exc))) from None


def decode_healthmesh(cluster: str, name: str, raw: bytes, *, max_bytes: int) -> Node:
    """A node from a healthmesh registration at ``.../<cluster>/<name>``; BadValue otherwise."""
    rec = _decode(raw, _HealthmeshRecord, max_bytes)
    assert isinstance(rec, _HealthmeshRecord)
    if rec.name != name:
        raise BadValue(f"name {rec.name[:80]!r} does not match the key")
    if rec.cluster != cluster:
        raise BadValue(f"cluster {rec.cluster[:80]!r} does not match the key")
    return _node(cluster, name, rec.addresses, rec.health_addresses, rec.labels)


def decode_cilium(cluster: str, name: str, raw: bytes, *, max_bytes: int) -> Node:
    """A node from Cilium's ``cilium/state/nodes/v1/<cluster>/<name>``; BadValue otherwise.

    Host paths are the InternalIP addresses, then the ExternalIP ones (as cilium-health
    probes them); health paths are ``IPv4HealthIP`` and ``IPv6HealthIP`` when set.
    """
    rec = _decode(raw, _CiliumRecord, max_bytes)
    assert isinstance(rec, _CiliumRecord)
    if rec.Name != name:
        raise BadValue(f"Name {rec.Name[:80]!r} does not match the key")
    if rec.Cluster != cluster:
        raise BadValue(f"Cluster {rec.Cluster[:80]!r} does not match the key")
    addresses: list[str] = []
    for kind in CILIUM_HOST_TYPES:
        for addr in rec.IPAddresses or []:
            if addr.Type == kind and addr.IP and addr.IP not in addresses:
                addresses.append(addr.IP)
    if not addresses:
        raise BadValue("no InternalIP or ExternalIP in IPAddresses")
    health = [ip for ip in (rec.IPv4HealthIP, rec.IPv6HealthIP) if ip]
    return _node(cluster, name, addresses, health, dict(rec.Labels or {}))
