"""healthmesh: a full-mesh node reachability prober; this module is the plugin-author API.

Plugins (built-in and third-party alike) import only from here.
"""

from healthmesh.core.backoff import Backoff
from healthmesh.core.components import (
    AgentContext,
    Check,
    CheckSettings,
    CheckUnavailable,
    ComponentSettings,
    Output,
    PeerSource,
    Probe,
    ProbeUnavailable,
    Service,
    SourceFeed,
)
from healthmesh.core.config import (
    ConfigError,
    ConfigPath,
    Duration,
    IPAddress,
    Name,
    Settings,
    check_against_local,
    check_ranges,
    config_relative,
    parse_nodes,
)
from healthmesh.core.events import Event, EventLog, Gap
from healthmesh.core.hookspecs import hookimpl
from healthmesh.core.jsonenc import encode_json, json_encoder
from healthmesh.core.lazy import lazy_import
from healthmesh.core.listen import format_listen, parse_listen
from healthmesh.core.mesh import cell_state
from healthmesh.core.model import Node, Path, PathState, ProbeResult, Role, Snapshot
from healthmesh.core.render import header_line, summary_table
from healthmesh.core.state import rfc3339
from healthmesh.core.telemetry import Histogram, Telemetry
from healthmesh.core.timestamps import SO_TIMESTAMPNS, kernel_receive_ns
from healthmesh.core.units import format_duration, parse_duration

__version__ = "0.1.0"

__all__ = [
    "SO_TIMESTAMPNS",
    "AgentContext",
    "Backoff",
    "Check",
    "CheckSettings",
    "CheckUnavailable",
    "ComponentSettings",
    "ConfigError",
    "ConfigPath",
    "Duration",
    "Event",
    "EventLog",
    "Gap",
    "Histogram",
    "IPAddress",
    "Name",
    "Node",
    "Output",
    "Path",
    "PathState",
    "PeerSource",
    "Probe",
    "ProbeResult",
    "ProbeUnavailable",
    "Role",
    "Service",
    "Settings",
    "Snapshot",
    "SourceFeed",
    "Telemetry",
    "__version__",
    "cell_state",
    "check_against_local",
    "check_ranges",
    "config_relative",
    "encode_json",
    "format_duration",
    "format_listen",
    "header_line",
    "hookimpl",
    "json_encoder",
    "kernel_receive_ns",
    "lazy_import",
    "parse_duration",
    "parse_listen",
    "parse_nodes",
    "rfc3339",
    "summary_table",
]
