"""Turn Kubernetes ``Node`` and Cilium ``CiliumNode`` objects into healthmesh nodes."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from healthmesh import Node

#: Node names that can be a healthmesh name (Kubernetes node names are DNS subdomains).
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
#: Node labels carried over (the rest would only bloat the snapshot).
KEPT_LABELS = ("topology.kubernetes.io/zone", "topology.kubernetes.io/region")


class Skip(ValueError):
    """The object cannot be a healthmesh node; the message says why."""


@dataclass(frozen=True)
class NodeFacts:
    """What one ``Node`` object says, before CiliumNode health addresses are added."""

    name: str
    addresses: tuple[str, ...]
    ready: str  # "True", "False" or "Unknown"
    condition: str  # reason and message of a Ready condition that is not True
    labels: tuple[tuple[str, str], ...]


def name_of(obj: dict[str, Any]) -> str:
    """``metadata.name`` or ""."""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else ""


def node_facts(obj: dict[str, Any], address_types: list[str]) -> NodeFacts:
    """The facts of a Node object; Skip when it has no usable name or address."""
    name = name_of(obj)
    if not _NAME.match(name):
        raise Skip(f"node name {name[:80]!r} is not a valid healthmesh name")
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    listed = [a for a in status.get("addresses") or [] if isinstance(a, dict)]
    addresses: list[str] = []
    for kind in address_types:  # order of address_types is the order of preference
        for entry in listed:
            if entry.get("type") != kind:
                continue
            try:
                addr = str(ipaddress.ip_address(str(entry.get("address", ""))))
            except ValueError:
                continue
            if addr not in addresses:
                addresses.append(addr)
    if not addresses:
        raise Skip(f"node {name}: no address of type {', '.join(address_types)}")
    ready, condition = "Unknown", "no Ready condition"
    for cond in status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            ready = str(cond.get("status") or "Unknown")
            reason = str(cond.get("reason") or "")
            message = str(cond.get("message") or "")
            condition = f"{reason}: {message}".strip(": ")[:200]
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    kept = tuple((k, str(labels[k])[:63]) for k in KEPT_LABELS if k in labels)
    return NodeFacts(name, tuple(addresses), ready, condition if ready != "True" else "", kept)


def health_addresses(obj: dict[str, Any]) -> tuple[str, ...]:
    """``spec.health.ipv4`` and ``ipv6`` of a CiliumNode, the valid ones."""
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    health = spec.get("health") if isinstance(spec.get("health"), dict) else {}
    out: list[str] = []
    for key in ("ipv4", "ipv6"):
        value = health.get(key)
        if not isinstance(value, str) or not value:
            continue
        try:
            out.append(str(ipaddress.ip_address(value)))
        except ValueError:
            continue
    return tuple(out)


def to_node(facts: NodeFacts, cluster: str, health: tuple[str, ...]) -> Node:
    """The healthmesh node: readiness (and why not) in ``info``."""
    info: dict[str, Any] = {"ready": facts.ready}
    if facts.condition:
        info["condition"] = facts.condition
    return Node(
        name=facts.name,
        cluster=cluster,
        addresses=facts.addresses,
        health_addresses=health,
        labels=dict(facts.labels),
        info=info,
    )
