"""``healthmesh status``: ask the local agent over its unix socket, print, exit 0/1/3/4.

The table shows three layers in order: the agent's own components (when the agent reports
them), the node mesh, and the service checks.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

import click

from healthmesh.plugins.api.settings import DEFAULT_SOCKET, SOCKET_ENV

EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_NO_AGENT, EXIT_DEGRADED = 0, 1, 2, 3, 4
#: A GET answers from the agent's cache; a probe round may take a while at 5,000 peers.
GET_TIMEOUT = 10.0
PROBE_TIMEOUT = 120.0


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"healthmesh: error: {message}", err=True)
    sys.exit(code)


@click.command("status")
@click.option(
    "-H", "--host", "uri", metavar="URI", default=None,
    help=f"The agent's socket as unix:///path [default: ${SOCKET_ENV}, else {DEFAULT_SOCKET}]",
)
@click.option("--probe", is_flag=True,
              help="Probe every peer now and show that result (synchronous, bounded).")
@click.option("--verbose", "-v", is_flag=True,
              help="Every path's result per probe kind, with rolling statistics.")
@click.option("--succinct", is_flag=True, help="One line per node.")
@click.option(
    "-o", "--output", type=click.Choice(["table", "json", "cilium-json"]), default="table",
    show_default=True,
    help="table; json (the /v1 snapshot); cilium-json (Cilium's /v1beta document).",
)
def status_command(
    uri: str | None, probe: bool, verbose: bool, succinct: bool, output: str
) -> None:
    """Show what the local agent knows: which nodes are reachable, by which paths.

    Exit 0 when every node is reachable, 1 when any is not (or not yet known), 2 on a
    usage error, 3 when no agent answers on the socket, 4 when every node is reachable but
    the agent is degraded (a component not ok) or a service check is failing.

    \b
    Examples:
      healthmesh status
      healthmesh status --probe --verbose
      healthmesh status -H unix:///run/healthmesh/health.sock -o cilium-json
    """
    # Imported here: every healthmesh command builds the CLI, few of them run this one.
    from healthmesh.plugins.api.cilium import node_ok
    from healthmesh.plugins.api.client import AgentClient, AgentUnreachable, socket_from_uri

    if verbose and succinct:
        _fail("--verbose and --succinct cannot be combined", EXIT_USAGE)
    if output != "table" and (verbose or succinct):
        _fail(f"--verbose and --succinct apply to the table, not to -o {output}", EXIT_USAGE)
    try:
        path = socket_from_uri(uri)
    except ValueError as exc:
        _fail(f"-H {exc}", EXIT_USAGE)
    client = AgentClient(path, timeout=GET_TIMEOUT)
    try:
        if output == "cilium-json":
            doc = (client.call("PUT", "/v1beta/status/probe", PROBE_TIMEOUT) if probe
                   else client.get("/v1beta/status"))
            click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
            nodes = doc.get("nodes") or []
            sys.exit(EXIT_OK if nodes and all(node_ok(n) for n in nodes) else EXIT_UNREACHABLE)
        snap = (client.call("POST", "/v1/probe", PROBE_TIMEOUT) if probe
                else client.get("/v1/status"))
    except AgentUnreachable as exc:
        _fail(str(exc), EXIT_NO_AGENT)
    if output == "json":
        click.echo(json.dumps(snap, indent=2, ensure_ascii=False))
    else:
        from healthmesh.plugins.api.report import (
            check_lines,
            component_lines,
            succinct_lines,
            verbose_lines,
        )

        # Three layers, in order: components, the mesh, the checks.
        _echo_block(component_lines(snap))
        # Verdicts of the mesh matrix that name this node (when the agent builds one).
        _echo_block(_local_verdicts(client, snap))
        if verbose or succinct:
            click.echo("\n".join(verbose_lines(snap) if verbose else succinct_lines(snap)))
        else:
            _print_table(snap)
        checks = check_lines(snap, verbose=verbose)
        if checks:
            click.echo()
            _echo_block(checks, blank=False)
    sys.exit(exit_code(snap))


def exit_code(snap: dict[str, Any]) -> int:
    """1 when a node is not reachable; else 4 when a component is not ok or a check fails."""
    summary = snap["summary"]
    if summary["reachable"] != summary["nodes"]:
        return EXIT_UNREACHABLE
    components = snap.get("components") or []
    if any(isinstance(c, dict) and c.get("state") in ("degraded", "failed") for c in components):
        return EXIT_DEGRADED
    checks = snap.get("checks") or []
    if any(isinstance(c, dict) and c.get("state") == "failing" for c in checks):
        return EXIT_DEGRADED
    return EXIT_OK


def _echo_block(lines: list[str], blank: bool = True) -> None:
    if lines:
        click.echo("\n".join(lines))
        if blank:
            click.echo()


def _print_table(snap: dict[str, Any]) -> None:
    from rich.console import Console

    from healthmesh import summary_table

    # Piped output keeps whole rows instead of squeezing them into 80 columns.
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
    Console(width=width, soft_wrap=False).print(summary_table(snap))


def _local_verdicts(client: Any, snap: dict[str, Any]) -> list[str]:
    """The mesh verdicts naming the local node; [] when none or the agent has no /v1/mesh."""
    from healthmesh.plugins.api.client import AgentUnreachable
    from healthmesh.plugins.api.report import verdict_lines

    local = snap.get("local") or {}
    try:
        matrix = client.get("/v1/mesh")
    except AgentUnreachable:  # an older agent (404), or it went away: the table still shows
        return []
    if not isinstance(matrix, dict):
        return []
    return verdict_lines(matrix, only=f"{local.get('cluster', 'default')}/{local.get('name')}")


@click.command("mesh")
@click.option(
    "-H", "--host", "uri", metavar="URI", default=None,
    help=f"The agent's socket as unix:///path [default: ${SOCKET_ENV}, else {DEFAULT_SOCKET}]",
)
@click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="table; json (docs/mesh.schema.json).",
)
def mesh_command(uri: str | None, output: str) -> None:
    """Show the whole mesh: which node reaches which, and where each fault is.

    Every agent's row (shared through etcd; without it, the local agent's row alone) as an
    observers × targets matrix, with the verdicts on top: node down, agent down, observer
    isolated, link cut, one-way failure, port 4240 or ICMP filtered, degraded (docs/mesh.md).
    Exit 0 when all is fine, 1 on any fault, 2 on a usage error, 3 when no agent answers.

    \b
    Examples:
      healthmesh mesh
      healthmesh mesh -H unix:///run/healthmesh/health.sock -o json
    """
    from healthmesh.plugins.api.client import AgentClient, AgentUnreachable, socket_from_uri
    from healthmesh.plugins.api.report import mesh_faulty, mesh_lines

    try:
        path = socket_from_uri(uri)
    except ValueError as exc:
        _fail(f"-H {exc}", EXIT_USAGE)
    try:
        matrix = AgentClient(path, timeout=GET_TIMEOUT).get("/v1/mesh")
    except AgentUnreachable as exc:
        _fail(str(exc), EXIT_NO_AGENT)
    if not isinstance(matrix, dict) or "cells" not in matrix:
        _fail(f"the agent on {path} answered /v1/mesh with something not a mesh", EXIT_NO_AGENT)
    if output == "json":
        click.echo(json.dumps(matrix, indent=2, ensure_ascii=False))
    else:
        click.echo("\n".join(mesh_lines(matrix)))
    sys.exit(EXIT_UNREACHABLE if mesh_faulty(matrix) else EXIT_OK)
