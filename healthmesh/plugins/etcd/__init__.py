"""The etcd plugin: peer source ``etcd`` (registration, heartbeat, watch) and ``healthmesh leave``.

Its client, records and tables are also the library the ``clustermesh`` plugin reads remote
clusters with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from healthmesh import PeerSource, hookimpl
from healthmesh.plugins.etcd.source import EtcdSource

__all__ = ["EtcdSource"]


@hookimpl
def register_peer_sources(register: Callable[[type[PeerSource]], None]) -> None:
    register(EtcdSource)


@hookimpl
def register_commands(cli: Any) -> None:
    from healthmesh.plugins.etcd.command import leave_command

    cli.add_command(leave_command)
