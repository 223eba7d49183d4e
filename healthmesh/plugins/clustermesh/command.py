"""``healthmesh leave``: remove a node's registration (and with --force its heartbeat) from etcd."""

from __future__ import annotations

import socket
import sys
from types import SimpleNamespace
from typing import Any, NoReturn

import anyio
import click
import msgspec

from healthmesh import Duration, Name, parse_duration
from healthmesh.plugins.clustermesh.client import EtcdClient, EtcdError
from healthmesh.plugins.clustermesh.connection import Connection, connection_from
from healthmesh.plugins.clustermesh.etcd_source import EtcdSettings, check_etcd_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from healthmesh.plugins.clustermesh.records import alive_key, node_key


def _load(path: str) -> tuple[EtcdSettings, tuple[str, str]]:
    """The ``[sources.etcd]`` settings and (cluster, node name) of a config; exit 2 on errors."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.loads(fh.read(4 * 1024 * 1024).decode("utf-8"))
    except OSError as exc:
        _fail(f"{path}: {exc.strerror}")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        _fail(f"{path}: invalid TOML: {exc}")
    node = data.get("node", {})
    table = data.get("sources", {}).get("etcd") if isinstance(data.get("sources"), dict) else None
    if not isinstance(node, dict) or not isinstance(table, dict):
        _fail(f"{path}: no [sources.etcd] section; nothing to leave")
    if table.get("enabled") is False:
        _fail(f"{path}: [sources.etcd] is disabled; nothing to leave")
    try:
        settings = msgspec.convert(table, EtcdSettings, dec_hook=_dec_hook)
        check_etcd_settings(settings, SimpleNamespace(path=path))
    except msgspec.ValidationError as exc:
        _fail(f"{path}: sources.etcd: {exc}")
    except ValueError as exc:
        _fail(f"{path}: sources.etcd.{exc}")
    name = node.get("name") or socket.gethostname().split(".")[0]
    return settings, (str(node.get("cluster", "default")), str(name))


def _dec_hook(typ: type, value: Any) -> Any:
    if typ is Duration and isinstance(value, str):
        return Duration(parse_duration(value))
    if typ is Name and isinstance(value, str):
        return Name(value)
    raise ValueError(f"unexpected value {value!r}")


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
    settings, (cluster, name) = _load(config_path)
    if node_ref:
        cluster, _, name = node_ref.rpartition("/") if "/" in node_ref else (cluster, "", node_ref)
        if not name or not cluster or "/" in cluster:
            _fail(f"--node {node_ref!r}: use NAME or CLUSTER/NAME")
    conn = connection_from(settings, config_path)
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
