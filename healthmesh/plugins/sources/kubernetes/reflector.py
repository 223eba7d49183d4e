"""Keep a local copy of one resource in step with the API server: list, then watch from there.

The watch resumes from the last ``resourceVersion`` seen (an event's or a bookmark's), so a
cut stream, a timeout or a server restart loses nothing and repeats nothing; only a ``410
Gone`` (the version has been compacted away) makes it list again, and the new list replaces
the copy whole, so objects deleted meanwhile go too. Errors back off from 0.5 s, doubling to
``retry_max``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from loguru import logger

from healthmesh import Backoff, lazy_import
from healthmesh.plugins.sources.kubernetes.api import Api, ApiError, Resource
from healthmesh.plugins.sources.kubernetes.nodes import name_of

#: httpx is loaded when this code first runs (most agents have no such source).
httpx = lazy_import("httpx")


class Reflector:
    """One resource's objects by name, kept current; calls ``changed`` after each change.

    ``ready`` is called after the first successful list, or the first failure. ``healthy``
    gets None when the copy is current, or the reason it is not.
    """

    def __init__(
        self,
        label: str,
        api: Api,
        res: Resource,
        *,
        label_selector: str,
        retry_max: float,
        changed: Callable[[], None],
        healthy: Callable[[str | None], None],
        absent_ok: bool = False,
        absent_recheck: float = 60.0,
    ) -> None:
        self.label = label
        self.api = api
        self.res = res
        self.selector = label_selector
        self.changed = changed
        self.healthy = healthy
        self.absent_ok = absent_ok
        self.absent_recheck = absent_recheck
        self.backoff = Backoff(retry_max)
        self.objects: dict[str, dict[str, Any]] = {}
        self.resource_version = ""
        self.lists = 0  # how many full lists (tests: a 410 makes one more)
        self.watches = 0
        self.absent = False
        self._said: str | None = None
        self._opened = False  # the current watch was accepted
        self._gone = 0  # 410s in a row without an event between them

    async def run(self, ready: Callable[[], None]) -> None:
        """Follow the resource until cancelled."""
        said_ready = False
        while True:
            try:
                if not self.resource_version:
                    await self._list()
                    if not said_ready:
                        said_ready = True
                        ready()
                if await self._watch():
                    continue  # a clean end after events: the server's timeoutSeconds
                # A clean end without a single event or bookmark: not an error, but a server
                # or proxy that ends watches at once must not make this loop spin.
                await anyio.sleep(self.backoff.next())
                continue
            except ApiError as exc:
                if exc.status == 410:
                    logger.info("{}: {}; listing again", self.label, exc)
                    self.resource_version = ""
                    self._gone += 1
                    if self._gone > 1:  # 410 right after a fresh list: do not spin
                        await anyio.sleep(self.backoff.next())
                    continue
                if exc.status == 404 and self.absent_ok:
                    self._go_absent()
                    if not said_ready:
                        said_ready = True
                        ready()
                    await anyio.sleep(self.absent_recheck)
                    continue
                self._fail(str(exc), loud=exc.status in (401, 403))
            except (httpx.HTTPError, OSError, ValueError) as exc:  # ValueError: a token file
                reason = f"{self.res.plural}: {_describe(exc)}"
                if self._opened:
                    # A watch that was running broke (a server restart, a proxy timeout):
                    # resume from the last version without calling the source stale; only a
                    # failed attempt to resume does.
                    logger.debug("{}: watch ended: {}; resuming", self.label, reason)
                else:
                    self._fail(reason)
            if not said_ready:
                said_ready = True
                ready()
            await anyio.sleep(self.backoff.next())

    async def _list(self) -> None:
        self._opened = False
        # The first list may come from the server's watch cache; after a 410 it must not
        # (the cache may be older than what was already seen), as client-go's reflector does.
        items, rv = await self.api.list(self.res, self.selector, cached=self._gone == 0)
        if not rv:
            raise ApiError(0, f"list {self.res.plural}: no metadata.resourceVersion")
        self.lists += 1
        self.objects = {name_of(o): o for o in items if name_of(o)}
        self.resource_version = rv
        if self.absent:
            logger.info("{}: {} appeared", self.label, self.res.plural)
        self.absent = False
        logger.debug("{}: listed {} {} at {}", self.label, len(items), self.res.plural, rv)
        self._ok()
        self.changed()

    def _open(self) -> None:
        self._opened = True
        self._ok()

    async def _watch(self) -> bool:
        """Apply events until the stream ends; whether any event (or bookmark) came."""
        self.watches += 1
        self._opened = False
        pending = False
        received = False
        limit = self.api.limits.max_objects
        try:
            async for event, more in self.api.watch(
                self.res, self.resource_version, self.selector, opened=self._open
            ):
                self.backoff.reset()
                self._gone = 0
                received = True
                rv = event.resource_version
                if event.type != "BOOKMARK":
                    name = name_of(event.object)
                    if name and event.type == "DELETED":
                        pending |= self.objects.pop(name, None) is not None
                    elif name and (name in self.objects or len(self.objects) < limit):
                        self.objects[name] = event.object
                        pending = True
                    elif name:
                        logger.warning(
                            "{}: skipping {} {}: more than max_nodes ({})",
                            self.label, self.res.plural, name[:100], limit,
                        )  # fmt: skip
                if rv:
                    self.resource_version = rv
                if pending and not more:  # publish once per burst of buffered events
                    pending = False
                    self.changed()
        finally:
            if pending:
                self.changed()
        return received

    def _ok(self) -> None:
        if self._said is not None:
            logger.info("{}: {} reachable again", self.label, self.res.plural)
        self._said = None
        self.healthy(None)

    def _go_absent(self) -> None:
        if not self.absent:
            logger.info(
                "{}: {} not served by this API server (no such CRD); going on without it",
                self.label,
                self.res.plural,
            )
        self.absent = True
        self.resource_version = ""
        if self.objects:
            self.objects = {}
            self.changed()
        self._said = None
        self.healthy(None)

    def _fail(self, reason: str, loud: bool = False) -> None:
        if reason != self._said:
            (logger.error if loud else logger.warning)("{}: {}", self.label, reason)
        self._said = reason
        self.healthy(reason)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]
