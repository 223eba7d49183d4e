"""``healthmesh events``: follow the local agent's state-change events, like ``kubectl get -w``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any, NoReturn
from urllib.parse import quote

import click

from healthmesh.plugins.api.settings import DEFAULT_SOCKET, SOCKET_ENV

EXIT_OK, EXIT_USAGE, EXIT_NO_AGENT = 0, 2, 3
#: The agent sends a heartbeat every 15 s on a quiet stream; three missed ones mean it is gone.
READ_TIMEOUT = 45.0
COLUMNS = ("TIME", "NODE", "PATH", "KIND", "FROM", "TO", "REASON")
WIDTHS = (24, 24, 26, 6, 11, 11)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"healthmesh: error: {message}", err=True)
    sys.exit(code)


def since_param(value: str | None) -> str | None:
    """The API's ``since``: a seq and an RFC 3339 time pass through, a duration means ago."""
    if value is None or value.isdigit():
        return value
    from healthmesh import parse_duration, rfc3339

    try:
        ago = parse_duration(value)
    except ValueError:
        return value  # an RFC 3339 time, or an error the agent will word
    return rfc3339(time.time() - ago)


def table_line(item: dict[str, Any]) -> str:
    """One event (or gap) as one table row."""
    if item.get("type") == "gap":
        return f"--- {item.get('missed')} events lost ({item.get('reason')}) ---"
    node = item.get("node", "")
    if item.get("cluster", "default") != "default":
        node = f"{item.get('cluster')}/{node}"
    if item.get("component"):
        where = f"component {item['component']}"
    elif item.get("path"):
        where = f"{item['path']} ({item.get('role')})"
    else:
        where = "-"
    cells = (item.get("time", ""), node, where, item.get("kind") or "-",
             item.get("from", ""), item.get("to", ""))
    row = "".join(str(c).ljust(w) + " " for c, w in zip(cells, WIDTHS))
    return row + str(item.get("reason", ""))


def header() -> str:
    return "".join(c.ljust(w) + " " for c, w in zip(COLUMNS, WIDTHS)) + COLUMNS[-1]


def _exit_on_signals() -> None:
    """Ctrl-C or SIGTERM end a follow at once, exit 0, without unwinding the HTTP client.

    A KeyboardInterrupt raised at an unlucky point inside httpx/httpcore (between taking and
    releasing its pool lock) can leave the client waiting on itself at close; once seen in
    the suite as a follow that ignored SIGINT for 10 s. Every printed line is already flushed
    and a reader holds no state, so leaving directly loses nothing.
    """

    def stop(signum: int, frame: object) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(EXIT_OK)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


@click.command("events")
@click.option(
    "-H", "--host", "uri", metavar="URI", default=None,
    help=f"The agent's socket as unix:///path [default: ${SOCKET_ENV}, else {DEFAULT_SOCKET}]",
)
@click.option("--since", metavar="SEQ|TIME|DURATION", default=None,
              help="Replay from the ring first: events after seq SEQ, at or after an RFC 3339 "
                   "TIME, or within the last DURATION (5m). Default: only new events.")
@click.option("--follow/--no-follow", default=True, show_default=True,
              help="Keep following live events, or stop after the replay.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="table: one line per event; json: the NDJSON lines.")
def events_command(uri: str | None, since: str | None, follow: bool, output: str) -> None:
    """Follow the local agent's state-change events: paths and nodes going down and up.

    Exit 0 on Ctrl-C (or at the end of a --no-follow replay), 2 on a usage error, 3 when
    no agent answers or the agent goes away.

    \b
    Examples:
      healthmesh events
      healthmesh events --since 10m
      healthmesh events --since 0 --no-follow -o json
    """
    from healthmesh.plugins.api.client import (
        AgentClient,
        AgentRefused,
        AgentUnreachable,
        socket_from_uri,
    )

    try:
        path = socket_from_uri(uri)
    except ValueError as exc:
        _fail(f"-H {exc}", EXIT_USAGE)
    query = [] if follow else ["follow=false"]
    value = since_param(since)
    if value is not None:
        query.insert(0, f"since={quote(value)}")
    url = "/v1/events" + ("?" + "&".join(query) if query else "")
    client = AgentClient(path, timeout=10.0)
    out = sys.stdout
    if follow:
        _exit_on_signals()
    try:
        if output == "table":
            out.write(header() + "\n")
            out.flush()
        for raw in client.stream_lines(url, READ_TIMEOUT):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except ValueError:
                _fail(f"the agent on {path} sent a line that is not JSON", EXIT_NO_AGENT)
            if item.get("type") == "heartbeat":
                continue
            out.write((raw.decode() if output == "json" else table_line(item)) + "\n")
            out.flush()
    except AgentRefused as exc:
        _fail(f"the agent refused {url}: {exc}", EXIT_USAGE if exc.status == 400 else
              EXIT_NO_AGENT)
    except AgentUnreachable as exc:
        _fail(str(exc), EXIT_NO_AGENT)
    except KeyboardInterrupt:
        sys.exit(EXIT_OK)
    except BrokenPipeError:
        sys.exit(EXIT_OK)
    if follow:
        _fail(f"the agent on {path} ended the event stream (stopped?)", EXIT_NO_AGENT)
    sys.exit(EXIT_OK)
