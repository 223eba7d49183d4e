"""``healthmesh status``: ask the local agent over its unix socket, print, exit 0/1/3."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

import click

from healthmesh.plugins.api.settings import DEFAULT_SOCKET, SOCKET_ENV

EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_NO_AGENT = 0, 1, 2, 3
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
    usage error, 3 when no agent answers on the socket.

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
    elif verbose or succinct:
        from healthmesh.plugins.api.report import succinct_lines, verbose_lines

        lines = verbose_lines(snap) if verbose else succinct_lines(snap)
        click.echo("\n".join(lines))
    else:
        _print_table(snap)
    summary = snap["summary"]
    sys.exit(EXIT_OK if summary["reachable"] == summary["nodes"] else EXIT_UNREACHABLE)


def _print_table(snap: dict[str, Any]) -> None:
    from rich.console import Console

    from healthmesh import summary_table

    # Piped output keeps whole rows instead of squeezing them into 80 columns.
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
    Console(width=width, soft_wrap=False).print(summary_table(snap))
