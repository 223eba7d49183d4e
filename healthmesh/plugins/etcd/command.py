"""``healthmesh leave``: remove a node's registration (and with --force its heartbeat) from etcd."""

from __future__ import annotations

import sys
from typing import NoReturn

import anyio
import click

from healthmesh.plugins.etcd.client import EtcdClient, EtcdError
from healthmesh.plugins.etcd.records import alive_key, node_key
from healthmesh.plugins.etcd.settings import Connection, connection_from


def _fail(message: str) -> NoReturn:
    click.echo(f"healthmesh: error: {message}", err=True)
    sys.exit(2)


@click.command("leave")
@click.option(
    "-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
    help="The agent's TOML config (its [sources.etcd] and [node] are used).",
)
@click.option(
    "--node", "node_ref", metavar="[CLUSTER/]NAME", default=None,
    help="Remove this node instead of the config's own (e.g. a node that will not return).",
)
@click.option(
    "--force", is_flag=True,
    help="Remove the node even though its agent still has a live heartbeat.",
)
def leave_command(config_path: str, node_ref: str | None, force: bool) -> None:
    """Remove this node's registration from etcd, so its peers stop probing it.

    A stopped or crashed agent stays registered on purpose (its peers keep probing it and
    show it unreachable); `leave` is how a node leaves the mesh for good. It refuses while
    the node's heartbeat is alive (the agent still runs) unless --force is given. Exit 0
    when the node is gone (also when it was not registered), 2 on any error.
    """
    from healthmesh.cli import load_config, setup_logging

    setup_logging("ERROR")
    config, _registry = load_config(config_path, need_peers=False)
    settings = config.components.get("sources.etcd")
    if settings is None:
        _fail(f"{config_path}: no enabled [sources.etcd] section; nothing to leave")
    cluster, name = config.node.cluster, config.node.name
    if node_ref:
        cluster, _, name = node_ref.rpartition("/") if "/" in node_ref else ("", "", node_ref)
        cluster = cluster or config.node.cluster
        if not name or "/" in cluster:
            _fail(f"--node {node_ref!r}: use NAME or CLUSTER/NAME")
    conn = connection_from(settings, config.path)
    try:
        message = anyio.run(_leave, conn, settings.prefix, cluster, name, force)
    except EtcdError as exc:
        _fail(f"etcd: {exc}")
    except TimeoutError:
        _fail(f"etcd: no answer within {conn.timeout * 4:g}s from {', '.join(conn.endpoints)}")
    click.echo(message)


async def _leave(conn: Connection, prefix: str, cluster: str, name: str, force: bool) -> str:
    with anyio.fail_after(conn.timeout * 4 * len(conn.endpoints)):
        async with EtcdClient(conn) as client:
            heartbeat = await client.get(alive_key(prefix, cluster, name))
            if heartbeat is not None and not force:
                _fail(
                    f"node {cluster}/{name} still has a live heartbeat (its agent runs): "
                    "stop the agent first, or use --force"
                )
            if heartbeat is not None:
                if heartbeat.lease:
                    await client.revoke(heartbeat.lease)
                await client.delete(heartbeat.key)
            key = node_key(prefix, cluster, name)
            if await client.delete(key):
                return f"node {cluster}/{name} left the mesh (deleted {key})"
            return f"node {cluster}/{name} was not registered ({key} does not exist)"
