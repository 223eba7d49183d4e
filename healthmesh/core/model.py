"""Domain types: nodes, probe paths, probe results and the snapshot handed to outputs."""

from __future__ import annotations

import enum
import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["host", "endpoint"]


class PathState(str, enum.Enum):
    """Reachability of one path for one probe kind, or of a whole node."""

    UNKNOWN = "unknown"
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class Node:
    """A peer (or the local node): its name, cluster and the addresses to probe."""

    name: str
    cluster: str = "default"
    addresses: tuple[str, ...] = ()
    health_addresses: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    #: Seconds between probes of this node's paths when it differs from ``[probing] interval``
    #: (remote clusters); rounded to a whole number of intervals.
    interval: float | None = None
    #: Facts a source knows about the node (for example ``{"heartbeat": "alive"}``), shown
    #: in the snapshot as the node's ``info``; they do not affect probing.
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @functools.cached_property
    def id(self) -> str:
        """The cluster-qualified identity used as the node's key: ``cluster/name``.

        Made once per node: the id is the key of several maps and every path's ``node_id``,
        and one string object shared by all of them is 5 fewer per node at 5,000 peers.
        """
        return f"{self.cluster}/{self.name}"

    @property
    def display_name(self) -> str:
        """The name as Cilium shows it: ``cluster/node`` unless the cluster is ``default``."""
        return self.name if self.cluster == "default" else self.id

    def paths(self, *, host: bool = True, endpoint: bool = True) -> list[Path]:
        """The probe paths of this node: one primary per role, the rest secondary."""
        out: list[Path] = []
        if host:
            out.extend(_role_paths(self, "host", self.addresses))
        if endpoint:
            out.extend(_role_paths(self, "endpoint", self.health_addresses))
        return out


def _role_paths(node: Node, role: Role, addresses: tuple[str, ...]) -> list[Path]:
    return [
        Path(node_id=node.id, address=addr, role=role, primary=(i == 0), interval=node.interval)
        for i, addr in enumerate(addresses)
    ]


@dataclass(frozen=True, slots=True)
class Path:
    """One address of one node to probe: the unit that has a state per probe kind.

    Slotted (an agent keeps 10,000 at 5,000 peers), with its ``key`` made at creation.
    """

    node_id: str
    address: str
    role: Role
    primary: bool
    interval: float | None = None
    #: Identity of the path, independent of whether it is primary.
    key: tuple[str, str, str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.node_id, self.address, self.role))

    @property
    def family(self) -> int:
        """4 or 6."""
        return ipaddress.ip_address(self.address).version


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe: ``ok``, round-trip time in seconds, error text, details.

    ``details`` carries kind-specific measurements (for example ``connect_ms`` and
    ``ttfb_ms`` for HTTP, ``sent``/``received`` for an ICMP burst); float values are
    folded into the path's rolling statistics as ``<key>_avg``.
    """

    ok: bool
    rtt: float | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0  # wall clock, seconds since the epoch
    finished_at: float = 0.0

    @classmethod
    def success(cls, rtt: float, **details: Any) -> ProbeResult:
        """A successful probe with its round-trip time in seconds."""
        return cls(ok=True, rtt=rtt, details=details)

    @classmethod
    def failure(cls, error: str, **details: Any) -> ProbeResult:
        """A failed probe with a one-line error text."""
        return cls(ok=False, error=error, details=details)


@dataclass
class Snapshot:
    """The agent's view at one moment, in the JSON shape of docs/snapshot.schema.json."""

    data: dict[str, Any]

    @property
    def summary(self) -> dict[str, int]:
        """``{"nodes", "reachable", "unreachable", "unknown"}`` counts."""
        return self.data["summary"]

    @property
    def all_reachable(self) -> bool:
        """True when every node is reachable."""
        s = self.summary
        return s["reachable"] == s["nodes"]
