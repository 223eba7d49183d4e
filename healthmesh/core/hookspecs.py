"""The hook specifications of healthmesh: what a plugin can implement, each documented."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from healthmesh.core.components import Check, Output, PeerSource, Probe, Service

hookspec = pluggy.HookspecMarker("healthmesh")
hookimpl = pluggy.HookimplMarker("healthmesh")

# All hooks are called once, at start-up (or when the CLI is built); none is called per probe.
# A hook hands back classes through ``register``; the agent instantiates the ones the
# config enables, with their validated settings.

# ---------------------------------------------------------------------------------------
# Probing
# ---------------------------------------------------------------------------------------


@hookspec
def register_probe_kinds(register: Callable[[type[Probe]], None]) -> None:
    """Register probe kinds.

    Called once per plugin when the agent starts, and by ``healthmesh plugins``.

    :param register: call ``register(ProbeClass)`` for each kind. ``ProbeClass.name`` is the
        kind (``"icmp"``), which names its results and its config section
        ``[probes.<name>]``; ``ProbeClass.Settings`` validates that section.
        Registering a kind that another plugin registered is a start-up error naming both.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_check_kinds(register: Callable[[type[Check]], None]) -> None:
    """Register service-check kinds: targets that are not mesh peers (DNS, TCP, HTTP).

    Called once per plugin when the agent starts, and by ``healthmesh plugins``.

    :param register: call ``register(CheckClass)`` for each kind. ``CheckClass`` subclasses
        ``healthmesh.Check``; ``CheckClass.name`` is the kind (``"dns"``) that a
        ``[checks.<any name>]`` section selects with ``kind = "dns"``;
        ``CheckClass.Settings`` (a ``healthmesh.CheckSettings`` subclass) validates that
        section. Registering a kind that another plugin registered is a start-up error
        naming both.
    :return: nothing; the return value is ignored.
    """


# ---------------------------------------------------------------------------------------
# Membership
# ---------------------------------------------------------------------------------------


@hookspec
def register_peer_sources(register: Callable[[type[PeerSource]], None]) -> None:
    """Register peer sources: where the agent learns which nodes to probe.

    Called once per plugin when the agent starts, and by ``healthmesh plugins``.

    :param register: call ``register(SourceClass)`` for each source. Its config section is
        ``[sources.<name>]`` unless the class sets ``section`` (``clustermesh`` does); the
        source runs when its section is present (or ``default_enabled`` is true).
    :return: nothing; the return value is ignored.
    """


# ---------------------------------------------------------------------------------------
# Outputs and services
# ---------------------------------------------------------------------------------------


@hookspec
def register_outputs(register: Callable[[type[Output]], None]) -> None:
    """Register outputs: sinks that receive a snapshot after every round.

    Called once per plugin when the agent starts, and by ``healthmesh plugins``.

    :param register: call ``register(OutputClass)`` for each output. Its section is
        ``[outputs.<name>]``; an output with ``console = True`` can be chosen with
        ``run -o <name>``.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_services(register: Callable[[type[Service]], None]) -> None:
    """Register services: long-running servers started before the first probe is sent.

    Called once per plugin when the agent starts, and by ``healthmesh plugins``.

    :param register: call ``register(ServiceClass)`` for each service; its config section is
        ``ServiceClass.section`` (the HTTP plugin's responder uses ``[responder]``).
    :return: nothing; the return value is ignored.
    """


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``healthmesh`` command line.

    Called once when the CLI is built, before arguments are parsed; plugins blocked through
    ``HEALTHMESH_DISABLE_PLUGINS`` add nothing.

    :param cli: the top-level click group; decorate functions with ``@cli.command()``.
    :return: nothing; the return value is ignored.
    """
