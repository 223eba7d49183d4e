"""The ``healthmesh`` command line: run, plugins, config check, and plugin-added commands."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

import anyio
import click
from loguru import logger

from healthmesh import __version__
from healthmesh.core.agent import EXIT_COMPONENT_FAILED, Agent, StartupError
from healthmesh.core.config import LOG_LEVELS, Config, ConfigError, load_raw
from healthmesh.core.memory import tune_allocator
from healthmesh.core.plugins import PluginError, PluginRegistry, load_plugins
from healthmesh.core.resolve import effective, resolve

if sys.version_info >= (3, 11):
    from builtins import BaseExceptionGroup
else:  # the backport anyio itself uses on 3.10
    from exceptiongroup import BaseExceptionGroup

EXIT_USAGE = 2
__all__ = ["EXIT_COMPONENT_FAILED", "EXIT_USAGE", "build_cli", "cli", "main"]


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print a one- or two-line error and exit."""
    click.echo(f"healthmesh: error: {message}", err=True)
    sys.exit(code)


def setup_logging(level: str) -> None:
    """loguru to stderr at ``level``."""
    logger.remove()
    logger.add(
        sys.stderr,
        level=level.upper(),
        format="{time:YYYY-MM-DDTHH:mm:ss.SSS} <level>{level: <7}</level> {message}",
        backtrace=False,
        diagnose=False,
    )


def load_config(path: str, *, need_peers: bool = True) -> tuple[Config, PluginRegistry]:
    """Load, validate and resolve a config; exit 2 with a clear message on any problem."""
    try:
        raw = load_raw(path)
        registry = load_plugins(set(raw.core.plugins.disable))
        return resolve(raw, registry, need_peers=need_peers), registry
    except (ConfigError, PluginError) as exc:
        fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="healthmesh")
def cli() -> None:
    """Know, first hand and at all times, which nodes of a cluster can reach which.

    Every node runs one agent (`healthmesh run`), which answers probes on port 4240 and
    probes every peer by ICMP and HTTP. See `healthmesh COMMAND --help`.
    """


def config_option(help_text: str) -> Any:
    """The ``-c/--config FILE`` option, required."""
    return click.option(
        "-c",
        "--config",
        "config_path",
        required=True,
        # Not click.Path's checks: load_config reports every unusable file in one line.
        type=click.Path(readable=False),
        help=help_text,
    )


@cli.command()
@config_option("TOML config file (see examples/healthmesh.toml).")
@click.option("--once", is_flag=True, help="Probe every peer once, print the result, exit.")
@click.option(
    "-o",
    "--output",
    # The choices are the console outputs of the loaded plugins (set by build_cli).
    type=click.Choice(["table", "json"]),
    default=None,
    help="Console output (default: table); json prints NDJSON, one document per round.",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default=None,
    help="Log level on stderr (default: [log] level, else INFO).",
)
def run(config_path: str, once: bool, output: str | None, log_level: str | None) -> None:
    """Run the agent: answer probes, probe every peer, report.

    With --once, exit 0 when every node is reachable, 1 when any is not, 2 on a usage or
    config error. Without it, exit 0 after SIGTERM, SIGINT or SIGHUP, 2 when it cannot
    start, 4 when a component kept crashing and could not be restarted.
    """
    tune_allocator()  # before the config of thousands of peers is read (docs/benchmarks.md)
    setup_logging(log_level or "WARNING")
    config, registry = load_config(config_path)
    setup_logging(log_level or config.core.log.level)
    try:
        agent = Agent(config, registry, once=once, console=output or "table")
        code = anyio.run(agent.run, backend="asyncio", backend_options=loop_options())
    except StartupError as exc:
        fail(str(exc))
    except BaseExceptionGroup as group:
        startup = _find(group, StartupError)
        if startup is None:
            raise
        fail(str(startup))
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


def loop_options() -> dict[str, Any]:
    """uvloop when installed (about 15 % less CPU per probe, docs/http.md), unless
    HEALTHMESH_LOOP=asyncio asks for the standard event loop."""
    if os.environ.get("HEALTHMESH_LOOP", "auto") == "asyncio":
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def _find(group: BaseException, cls: type[BaseException]) -> BaseException | None:
    if isinstance(group, cls):
        return group
    for exc in getattr(group, "exceptions", ()):
        found = _find(exc, cls)
        if found is not None:
            return found
    return None


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List every plugin: name, distribution, version, hooks, built-in or not."""
    setup_logging("ERROR")
    try:
        registry = load_plugins()
    except PluginError as exc:
        fail(str(exc))
    listing = registry.listing()
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("Name", "Distribution", "Version", "Built-in", "Status", "Provides", "Hooks"):
        table.add_column(col)
    for p in listing:
        provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in p["provides"].items())
        table.add_row(
            p["name"],
            p["distribution"] or "-",
            p["version"] or "-",
            "yes" if p["builtin"] else "no",
            p["status"] + (f" ({p['error']})" if p["error"] else ""),
            provides or "-",
            ", ".join(p["hooks"]) or "-",
        )
    Console().print(table)


@cli.group()
def config() -> None:
    """Validate config files."""


@config.command("check")
@config_option("TOML config file to validate.")
@click.option("--show", is_flag=True, help="Print the effective config, defaults filled in.")
def config_check(config_path: str, show: bool) -> None:
    """Validate a config: exit 0 when valid, 2 with the file and key when not."""
    setup_logging("ERROR")
    cfg, _ = load_config(config_path)
    if show:
        import tomli_w

        click.echo(tomli_w.dumps(effective(cfg)), nl=False)
    else:
        click.echo(f"{config_path}: ok")


def build_cli() -> click.Group:
    """The CLI with the commands that plugins add."""
    try:
        registry = load_plugins()
    except PluginError as exc:
        fail(str(exc))
    registry.add_commands(cli)
    consoles = registry.console_outputs()
    for param in run.params:
        if param.name == "output" and consoles:
            param.type = click.Choice(consoles)
    return cli


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    setup_logging(os.environ.get("HEALTHMESH_LOG_LEVEL", "WARNING"))
    return build_cli().main(args=argv, prog_name="healthmesh")
