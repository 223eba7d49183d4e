"""The etcd plugin: peer source ``etcd`` (registration, heartbeat, watch) and ``healthmesh leave``.

A plugin of its own (entry point ``etcd``, blockable by name) whose module lives in the
clustermesh package, because both read etcd with the same client, records and tables, and a
plugin may import only the public API and its own package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from healthmesh import PeerSource, hookimpl
from healthmesh.plugins.clustermesh.etcd_source import EtcdSource

__all__ = ["EtcdSource"]


@hookimpl
def register_peer_sources(register: Callable[[type[PeerSource]], None]) -> None:
    register(EtcdSource)


@hookimpl
def register_commands(cli: Any) -> None:
    from healthmesh.plugins.clustermesh.command import leave_command

    cli.add_command(leave_command)
