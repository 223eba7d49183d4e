"""Keep a node table in step with etcd: register, load, watch, and reconnect with backoff.

One session is: (re-)register when asked to, load the prefix at one revision, then watch it
from the next revision while a liveness loop (lease keep-alive, or a cheap count) checks that
etcd still answers. Any failure ends the session: the table keeps its last content and is
shown stale, and a new session starts after a backoff (0.5 s doubling to ``retry_max``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from loguru import logger

from healthmesh import Backoff, Node
from healthmesh.plugins.clustermesh.client import EtcdClient, EtcdCompacted, EtcdError
from healthmesh.plugins.clustermesh.connection import Connection
from healthmesh.plugins.clustermesh.records import (
    alive_key,
    encode_heartbeat,
    encode_node,
    node_key,
)
from healthmesh.plugins.clustermesh.tables import NodeTable

#: Seconds between liveness checks of a read-only follower.
PING_INTERVAL = 5.0


@dataclass
class Registration:
    """This node's registration (durable) and heartbeat (leased) in healthmesh's layout."""

    node: Node
    prefix: str
    lease_ttl: float
    lease: int = 0

    async def establish(self, client: EtcdClient) -> None:
        """Write both keys; reuse the lease when it survived, else grant a new one."""
        if self.lease:
            try:
                ttl = await client.keepalive(self.lease)
            except EtcdCompacted:
                ttl = 0
            if ttl <= 0:
                self.lease = 0
        if not self.lease:
            self.lease = await client.grant(self.lease_ttl)
        n = self.node
        await client.put(node_key(self.prefix, n.cluster, n.name), encode_node(n))
        await client.put(
            alive_key(self.prefix, n.cluster, n.name), encode_heartbeat(n), lease=self.lease
        )

    async def keepalive(self, client: EtcdClient) -> None:
        """Renew the heartbeat lease; EtcdError when it has expired (the session restarts)."""
        ttl = await client.keepalive(self.lease)
        if ttl <= 0:
            self.lease = 0
            raise EtcdError("heartbeat lease expired; registering again")

    async def revoke(self, client: EtcdClient) -> None:
        """End the heartbeat now (clean shutdown): peers see the agent gone at once."""
        if self.lease:
            await client.revoke(self.lease)
            self.lease = 0


class Follower:
    """Runs sessions against one etcd cluster for one table until cancelled."""

    def __init__(
        self,
        label: str,
        conn: Connection,
        table: NodeTable,
        *,
        publish: Callable[[list[Node]], None],
        stale: Callable[[str], None],
        fresh: Callable[[], None],
        retry_max: float,
        max_keys: int,
        registration: Registration | None = None,
    ) -> None:
        self.label = label
        self.conn = conn
        self.table = table
        self.publish = publish
        self.stale = stale
        self.fresh = fresh
        self.registration = registration
        self.max_keys = max_keys
        self.backoff = Backoff(retry_max)
        self._keys: set[str] = set()
        self._is_stale = False
        self.sessions = 0

    async def run(self, ready: Callable[[], None]) -> None:
        """Follow etcd forever; ``ready`` is called after the first load or the first failure."""
        said_ready = False

        def once_ready() -> None:
            nonlocal said_ready
            if not said_ready:
                said_ready = True
                ready()

        try:
            async with EtcdClient(self.conn) as client:
                try:
                    while True:
                        try:
                            await self._session(client, once_ready)
                        except EtcdCompacted as exc:
                            logger.info("{}: {}; loading afresh", self.label, exc)
                        except EtcdError as exc:
                            self._go_stale(str(exc))
                            once_ready()
                        delay = self.backoff.next()
                        logger.debug("{}: next attempt in {:.1f}s", self.label, delay)
                        await anyio.sleep(delay)
                finally:
                    await self._close(client)
        except EtcdError as exc:  # the client could not even be set up (TLS files)
            self._go_stale(str(exc))
            once_ready()
            await anyio.sleep_forever()

    async def _close(self, client: EtcdClient) -> None:
        if self.registration is None or not self.registration.lease:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            try:
                await self.registration.revoke(client)
                logger.info("{}: heartbeat revoked", self.label)
            except EtcdError as exc:
                logger.debug("{}: could not revoke the heartbeat: {}", self.label, exc)

    def _go_stale(self, reason: str) -> None:
        if not self._is_stale:
            self._is_stale = True
            self.publish(self.table.nodes(stale=True))
        self.stale(reason)

    async def _session(self, client: EtcdClient, ready: Callable[[], None]) -> None:
        self.sessions += 1
        if self.registration is not None:
            await self.registration.establish(client)
            logger.info(
                "{}: registered {} (heartbeat lease {:x})",
                self.label,
                self.registration.node.id,
                self.registration.lease,
            )
        prefix = self.table.watch_prefix
        kvs, revision, more = await client.range_prefix(
            prefix, limit=self.max_keys, end=self.table.watch_end
        )
        if more:
            logger.warning(
                "{}: more than max_keys ({}) keys under {}; the rest are ignored",
                self.label,
                self.max_keys,
                prefix,
            )
        before = self.table.node_ids()
        self._keys = {kv.key for kv in kvs}
        self.table.load((kv.key, kv.value) for kv in kvs)
        self._log_changes(before)
        self._is_stale = False
        self.publish(self.table.nodes())
        self.fresh()
        ready()
        self.backoff.reset()

        failure: EtcdError | None = None
        async with anyio.create_task_group() as tg:

            async def guard(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
                nonlocal failure
                try:
                    await fn(*args)
                except EtcdError as exc:
                    if failure is None:
                        failure = exc
                    tg.cancel_scope.cancel()

            tg.start_soon(guard, self._watch, client, revision + 1)
            tg.start_soon(guard, self._liveness, client)
        if failure is not None:
            raise failure
        raise EtcdError("session ended")  # pragma: no cover - both loops run forever

    async def _watch(self, client: EtcdClient, start: int) -> None:
        prefix = self.table.watch_prefix
        async with client.watch(prefix, start, self.table.watch_end) as batches:
            async for _revision, events in batches:
                if not events:
                    continue
                before = self.table.node_ids()
                for ev in events:
                    if ev.type == "delete":
                        self._keys.discard(ev.key)
                        self.table.apply(ev.key, None)
                        continue
                    if ev.key not in self._keys and len(self._keys) >= self.max_keys:
                        logger.warning(
                            "{}: skipping {}: more than max_keys ({}) keys",
                            self.label,
                            ev.key[:300],
                            self.max_keys,
                        )
                        continue
                    self._keys.add(ev.key)
                    self.table.apply(ev.key, ev.value)
                self._log_changes(before)
                self.publish(self.table.nodes())

    async def _liveness(self, client: EtcdClient) -> None:
        if self.registration is not None:
            interval = self.registration.lease_ttl / 3
            while True:
                await anyio.sleep(interval)
                await self.registration.keepalive(client)
        while True:
            await anyio.sleep(PING_INTERVAL)
            await client.count(self.table.watch_prefix + "\0")

    def _log_changes(self, before: set[str]) -> None:
        after = self.table.node_ids()
        joined, left = sorted(after - before), sorted(before - after)
        if len(joined) + len(left) > 20:
            logger.info("{}: {} nodes joined, {} left", self.label, len(joined), len(left))
            return
        for node_id in joined:
            logger.info("{}: node {} joined", self.label, node_id)
        for node_id in left:
            logger.info("{}: node {} left", self.label, node_id)
