"""``healthmesh responder``: the 4240 responder alone, for a health-endpoint network namespace."""

from __future__ import annotations

import signal
import sys

import anyio
import click
from loguru import logger

from healthmesh import Duration, parse_duration
from healthmesh.plugins.http.listen import check_listen
from healthmesh.plugins.http.responder import DEFAULT_LISTEN, Responder, ResponderSettings

_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> Duration:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise click.BadParameter("must be greater than zero")
    return Duration(seconds)


def _listen(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    addresses = list(value) or list(DEFAULT_LISTEN)
    try:
        check_listen(addresses)
    except ValueError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None
    return addresses


@click.command("responder")
@click.option(
    "--listen", "-l", "listen", multiple=True, metavar="ADDR:PORT", callback=_listen,
    help="Address to answer on; repeat for several. IPv6 in brackets. "
    "[default: 0.0.0.0:4240 and [::]:4240]",
)
@click.option(
    "--max-connections", type=click.IntRange(min=1), default=4096, show_default=True,
    help="Open connections at most; at the cap the oldest is closed.",
)
@click.option(
    "--header-timeout", default="5s", show_default=True, callback=_duration,
    help="Time a client has to send its request head.",
)
@click.option(
    "--idle-timeout", default="30s", show_default=True, callback=_duration,
    help="Time a kept-alive connection may idle between requests.",
)
@click.option(
    "--max-pipelined", type=click.IntRange(min=0), default=16, show_default=True,
    help="Requests a client may pipeline ahead of its answers; past it, it is closed.",
)
@click.option(
    "--loop", type=click.Choice(["auto", "asyncio", "uvloop"]), default="auto",
    show_default=True, help="Event loop; auto uses uvloop when it is installed.",
)
@click.option(
    "--log-level", type=click.Choice(_LEVELS, case_sensitive=False), default="INFO",
    show_default=True, help="Level of the log on stderr.",
)
def responder_command(
    listen: list[str], max_connections: int, header_timeout: Duration, idle_timeout: Duration,
    max_pipelined: int, loop: str, log_level: str,
) -> None:
    """Run the health responder alone: GET /hello -> 200, any other path -> 404.

    The analogue of cilium-health-responder, for a health-endpoint network namespace:
    peers probe it on port 4240 while the agent itself runs elsewhere. IPv4 and IPv6
    addresses can share a port. Stops cleanly on SIGINT or SIGTERM.

    \b
    Examples:
      healthmesh responder
      healthmesh responder --listen 10.244.0.5:4240
      ip netns exec health healthmesh responder -l 0.0.0.0:4240 -l [::]:4240
    """
    logger.remove()
    logger.add(sys.stderr, level=log_level.upper(), format="{time:YYYY-MM-DD HH:mm:ss} {message}")
    settings = ResponderSettings(
        listen=listen, max_connections=max_connections, header_timeout=header_timeout,
        idle_timeout=idle_timeout, max_pipelined=max_pipelined,
    )
    try:
        anyio.run(_serve, settings, backend="asyncio",
                  backend_options={"use_uvloop": _use_uvloop(loop)})
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        pass
    except Exception as exc:
        bind_error = _find_os_error(exc)
        if bind_error is None:
            raise
        raise click.ClickException(str(bind_error)) from None


def _use_uvloop(choice: str) -> bool:
    if choice == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise click.UsageError("--loop uvloop: uvloop is not installed") from None
        return False
    return True


def _find_os_error(exc: BaseException) -> OSError | None:
    """The OSError inside a (possibly nested) exception group: a bind failure to report."""
    if isinstance(exc, OSError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find_os_error(inner)
        if found is not None:
            return found
    return None


async def _serve(settings: ResponderSettings) -> None:
    responder = Responder(settings)
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await tg.start(responder.run)
            async for signum in signals:
                logger.info("received {}, stopping", signal.Signals(signum).name)
                break
        tg.cancel_scope.cancel()
