"""Peer source ``etcd``: register this node, keep its heartbeat, and watch the other nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from healthmesh import ComponentSettings, Duration, Name, PeerSource, SourceFeed
from healthmesh.plugins.clustermesh.connection import (
    TlsSettings,
    check_connection,
    check_prefix,
    connection_from,
)
from healthmesh.plugins.clustermesh.follower import Follower, Registration
from healthmesh.plugins.clustermesh.indirect import IndirectProber, IndirectServer
from healthmesh.plugins.clustermesh.rows import RowPublisher
from healthmesh.plugins.clustermesh.tables import HealthmeshTable

#: etcd refuses leases shorter than its minimum (about 2 s with default election settings).
MIN_LEASE_TTL = 2.0


class EtcdSettings(ComponentSettings, kw_only=True):
    """``[sources.etcd]``: where etcd is, how to log in, and how this agent registers."""

    endpoints: list[str]
    #: Key prefix of healthmesh's layout: ``<prefix>/nodes/v1/...`` and ``<prefix>/alive/v1/...``.
    prefix: str = "healthmesh"
    #: Write this node's registration and heartbeat (false: only read the other nodes).
    register: bool = True
    #: Time-to-live of the heartbeat lease; it is renewed every third of it.
    lease_ttl: Duration = Duration(15.0)
    #: Bound on every request to etcd (a hung etcd is noticed within it).
    timeout: Duration = Duration(2.0)
    #: Longest pause between reconnection attempts (backoff starts at 0.5 s and doubles).
    retry_max: Duration = Duration(10.0)
    #: Other clusters whose nodes this etcd may also list (the local cluster always is).
    clusters: list[Name] = msgspec.field(default_factory=list)
    #: Values larger than this are skipped with a warning.
    max_value_bytes: int = 65536
    #: Keys under the prefix read at most (a bound on memory; the rest are ignored, with a warning).
    max_keys: int = 50000
    tls: TlsSettings = msgspec.field(default_factory=TlsSettings)
    username: str | None = None
    password: str | None = None
    #: A file holding the password (relative to the config file), instead of ``password``.
    password_file: str | None = None
    #: Share this agent's mesh row and read the others' (docs/mesh.md); needs ``register``.
    rows: bool = True
    #: Read the other agents' rows (false: publish only; this agent's matrix is then its own
    #: row, and it is spared the watch traffic of every row write — docs/mesh.md, at scale).
    rows_read: bool = True
    #: Least time between two writes of the row after a change (it grows with the mesh:
    #: at least N / 100 s, so the mesh writes at most 100 rows per second).
    rows_min_gap: Duration = Duration(2.0)
    #: The row is rewritten at least this often, with fresh RTT and loss.
    rows_refresh: Duration = Duration(60.0)
    #: Rows larger than this (compressed) are skipped with a warning.
    rows_max_bytes: int = 1_048_576
    #: Indirect probes (docs/mesh.md): ask this many other agents to probe each target this
    #: agent finds unreachable (0: off; 2 is a good value). Needs ``indirect_secret_file``.
    indirect_k: int = 0
    #: The TCP port every agent answers indirect probe requests on (on its node addresses).
    indirect_port: int = 4241
    #: A file holding the shared secret (at least 16 bytes) that signs requests and answers.
    indirect_secret_file: str | None = None
    #: Requests answered per second per caller address (bursts of twice as many).
    indirect_rate: float = 5.0


def check_etcd_settings(settings: EtcdSettings, config: Any) -> None:
    """Everything ``config check`` can know about ``[sources.etcd]`` without contacting etcd."""
    check_connection(settings, config.path)
    check_prefix(settings.prefix)
    if settings.lease_ttl < MIN_LEASE_TTL:
        raise ValueError(f"lease_ttl: must be at least {MIN_LEASE_TTL:g}s (etcd's minimum)")
    if settings.timeout * 2 > settings.lease_ttl:
        raise ValueError("timeout: must be at most half of lease_ttl, or heartbeats lapse")
    if settings.retry_max < 0.5:
        raise ValueError("retry_max: must be at least 500ms")
    if not 256 <= settings.max_value_bytes <= 1_572_864:
        raise ValueError("max_value_bytes: must be between 256 and 1572864 (etcd's request limit)")
    if settings.max_keys < 1:
        raise ValueError("max_keys: must be at least 1")
    if not 0.1 <= settings.rows_min_gap <= 3600:
        raise ValueError("rows_min_gap: must be between 100ms and 1h")
    if not settings.rows_min_gap <= settings.rows_refresh <= 86400:
        raise ValueError("rows_refresh: must be between rows_min_gap and 24h")
    if not 1024 <= settings.rows_max_bytes <= 1_572_864:
        raise ValueError("rows_max_bytes: must be between 1024 and 1572864 (etcd's request limit)")
    check_indirect(settings, config)


def check_indirect(settings: EtcdSettings, config: Any) -> None:
    """The ``indirect_*`` keys: off, or a secret file, a port and a rate."""
    if not 0 <= settings.indirect_k <= 16:
        raise ValueError("indirect_k: must be between 0 (off) and 16")
    if not 1 <= settings.indirect_port <= 65535:
        raise ValueError("indirect_port: must be between 1 and 65535")
    if not 0.1 <= settings.indirect_rate <= 1000:
        raise ValueError("indirect_rate: must be between 0.1 and 1000")
    if settings.indirect_k == 0:
        return
    if not settings.register or not settings.rows:
        raise ValueError("indirect_k: needs register = true and rows = true")
    if settings.indirect_secret_file is None:
        raise ValueError("indirect_secret_file: required when indirect_k is set")
    path = secret_path(settings, config.path)
    try:
        secret = open(path, "rb").read().strip()
    except OSError as exc:
        raise ValueError(f"indirect_secret_file: {path}: {exc.strerror}") from None
    if len(secret) < 16:
        raise ValueError(f"indirect_secret_file: {path}: the secret must be at least 16 bytes")


def secret_path(settings: EtcdSettings, config_path: str) -> str:
    """The secret file, relative to the config file."""
    p = Path(settings.indirect_secret_file or "")
    return str(p if p.is_absolute() else Path(config_path).resolve().parent / p)


class EtcdSource(PeerSource):
    """The nodes registered in etcd under ``<prefix>/nodes/v1/``, with their heartbeats.

    A registration is durable (a crashed node stays, shown unreachable, its heartbeat
    ``expired``); only ``healthmesh leave`` removes it. While etcd cannot be reached the last
    node set is kept, probing goes on and the source is shown stale.
    """

    name = "etcd"
    Settings = EtcdSettings

    @classmethod
    def validate_settings(cls, settings: EtcdSettings, config: Any) -> None:
        check_etcd_settings(settings, config)

    def __init__(self, settings: EtcdSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.conn = connection_from(settings, context.config.path)
        local = context.local_node
        clusters = {local.cluster, *(str(c) for c in settings.clusters)}
        self.table = HealthmeshTable(
            "sources.etcd",
            settings.prefix,
            clusters,
            max_bytes=settings.max_value_bytes,
            exclude=local.id,
            rows_max_bytes=settings.rows_max_bytes if settings.rows and settings.rows_read
            else None,
        )
        self.registration = (
            Registration(local, settings.prefix, float(settings.lease_ttl))
            if settings.register
            else None
        )
        self.follower: Follower | None = None
        self.publisher = (
            RowPublisher(
                context, self.conn, self.registration, settings.prefix,
                min_gap=float(settings.rows_min_gap), refresh=float(settings.rows_refresh),
            )
            # (An agent core without the mesh matrix has no local_row: no rows then.)
            if settings.rows and self.registration is not None
            and callable(getattr(context, "local_row", None))
            else None
        )  # fmt: skip

    async def run(self, feed: SourceFeed, *, task_status: TaskStatus[None]) -> None:
        if (self.settings.rows and self.settings.rows_read
                and callable(getattr(self.context, "publish_rows", None))):
            # The agent asks for the rows when the matrix is wanted; decoding waits till then.
            self.context.publish_rows("sources.etcd", self.table.rows)
        if self.publisher is None:
            await self._follow(feed, task_status.started)
            return
        async with anyio.create_task_group() as tg:
            await tg.start(self._follow_started, feed)
            tg.start_soon(self.publisher.run)
            if self.settings.indirect_k > 0:
                await self._start_indirect(tg)
            task_status.started()

    async def _start_indirect(self, tg: Any) -> None:
        """Serve members' indirect probe requests and ask k helpers about failing targets."""
        s = self.settings
        secret = Path(secret_path(s, self.context.config.path)).read_bytes().strip()
        timeout = float(self.context.config.probing.timeout)
        self.indirect_server = IndirectServer(
            secret, self.table.nodes, self.context.probe_node, rate=s.indirect_rate,
            timeout=timeout,
        )  # fmt: skip
        for addr in self.context.local_node.addresses:
            listener = await anyio.create_tcp_listener(local_host=addr, local_port=s.indirect_port)
            tg.start_soon(listener.serve, self.indirect_server.handle)
        self.indirect_prober = IndirectProber(
            self.context, secret, self.table.nodes, k=s.indirect_k, port=s.indirect_port,
            timeout=timeout, interval=float(self.context.config.probing.interval),
        )  # fmt: skip
        tg.start_soon(self.indirect_prober.run)

    async def _follow_started(self, feed: SourceFeed, *, task_status: TaskStatus[None]) -> None:
        await self._follow(feed, task_status.started)

    async def _follow(self, feed: SourceFeed, ready: Any) -> None:
        self.follower = Follower(
            "sources.etcd",
            self.conn,
            self.table,
            publish=feed.replace,
            stale=lambda reason: feed.mark_stale(f"etcd: {reason}"),
            fresh=feed.mark_fresh,
            retry_max=float(self.settings.retry_max),
            max_keys=self.settings.max_keys,
            registration=self.registration,
        )
        await self.follower.run(ready=ready)
