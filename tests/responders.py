"""The 4240 responder run inside the test process, for probe and responder tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from healthmesh.plugins.http import Responder, ResponderSettings


@asynccontextmanager
async def responder(*listen: str, **limits: object) -> AsyncIterator[Responder]:
    """Our responder on ``listen`` (port 0: a free port), with optional limits."""
    r = Responder(ResponderSettings(listen=list(listen), **limits))  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(5):
            await tg.start(r.run)
        yield r
        tg.cancel_scope.cancel()


def port_of(r: Responder, i: int = 0) -> int:
    """The port of the responder's ``i``-th listen address."""
    return int(r.addresses[i].rsplit(":", 1)[1])
