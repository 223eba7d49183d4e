"""Output ``web``: serves the page and its JSON on a TCP listener, fed by the agent's snapshots."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
from anyio.abc import SocketAttribute, TaskStatus
from loguru import logger

from healthmesh import AgentContext, ComponentSettings, Output, Snapshot
from healthmesh.plugins.web.app import WebApp, encode
from healthmesh.plugins.web.history import History
from healthmesh.plugins.web.mesh import cell, compact, local_mesh
from healthmesh.plugins.web.server import Server
from healthmesh.plugins.web.settings import WebSettings, parse_web_listen, url_of

#: Before the first round, a live view is rebuilt at most this often (seconds).
LIVE_TTL = 1.0
#: Builds of the page's data are spaced by this many times their own cost (at most 20% of a
#: core), and at most MAX_BUILD_GAP seconds apart when snapshots keep coming.
BUILD_SPACING = 4.0
MAX_BUILD_GAP = 5.0
#: Snapshot keys the agent endpoint passes on (the page's "this agent" panel).
AGENT_KEYS = ("timestamp", "interval_s", "local", "summary", "components", "round",
              "scheduler", "probe_kinds", "sources")


@dataclass
class Published:
    """One snapshot's matrix and documents, encoded once and served as bytes.

    The mesh contract is encoded at its first request only: at 1,000 × 1,000 it is about
    110 MB of JSON, which the page never asks for (it reads the compact matrix).
    """

    mesh_data: dict[str, Any]
    matrix: bytes
    snapshot: bytes
    agent: dict[str, Any]
    built: float = field(default_factory=time.monotonic)
    _mesh: bytes | None = None
    _mesh_lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def mesh(self) -> bytes:
        async with self._mesh_lock:  # concurrent requests share one encoding
            if self._mesh is None:
                self._mesh = await anyio.to_thread.run_sync(encode, self.mesh_data)
            return self._mesh

    def cell(self, observer: str, target: str) -> dict[str, Any] | None:
        return cell(self.mesh_data, observer, target)


def _agent_info(data: dict[str, Any], mesh: dict[str, Any], has_mesh: bool,
                http_port: int) -> dict[str, Any]:
    info = {k: data[k] for k in AGENT_KEYS if k in data}
    # Scheduler lag, under whatever top-level key the agent reports it ("lag_ms", ...).
    info.update({k: v for k, v in data.items() if "lag" in k and k not in info})
    summary = info.get("summary")
    if isinstance(summary, dict):  # per-cluster counts: the matrix has them, and long
        info["summary"] = {k: v for k, v in summary.items() if k != "clusters"}
    interval = float(data.get("interval_s") or 30.0)
    info["mesh_timestamp"] = mesh.get("timestamp")
    info["mesh_feature"] = has_mesh
    info["http_port"] = http_port
    # The page calls the data stale past three intervals (a round's timestamp is its start,
    # published at its end, so two intervals is the normal worst); the 2 s are for load.
    info["stale_after_s"] = round(3 * interval + 2.0, 3)
    info["poll_s"] = round(min(max(interval / 2, 1.0), 5.0), 3)
    return info


def _build(data: dict[str, Any], mesh: dict[str, Any], has_mesh: bool,
           http_port: int) -> Published:
    """Encode everything (CPU-bound at thousands of nodes: run it in a worker thread)."""
    return Published(mesh, encode(compact(mesh)), encode(data),
                     _agent_info(data, mesh, has_mesh, http_port))


class Store:
    """The newest published state and the history; what the routes read."""

    def __init__(self, context: AgentContext, settings: WebSettings) -> None:
        self.context = context
        self.history = History(float(settings.history), settings.max_points)
        self.current: Published | None = None
        self.builds = 0
        self._pending: dict[str, Any] | None = None
        self._wake = anyio.Event()
        self._live: Published | None = None
        self._lock = anyio.Lock()
        self._mesh_failed = False
        # The port the page names in "port 4240 filtered on n5" verdicts.
        http = getattr(context.config, "components", {}).get("probes.http")
        self.http_port = int(getattr(http, "port", 4240) or 4240)

    def _mesh_of(self, data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        mesh = getattr(self.context, "mesh", None)
        if not callable(mesh):
            return local_mesh(data), False
        try:
            found = mesh()
            if not isinstance(found, dict):
                raise TypeError(f"mesh() returned {type(found).__name__}, not a dict")
        except Exception as exc:  # the page still shows the local row
            if not self._mesh_failed:
                logger.warning("web: the agent's mesh failed ({}); showing the local row",
                               exc)
                self._mesh_failed = True
            return local_mesh(data), True
        self._mesh_failed = False
        return found, True

    def publish(self, snapshot: Snapshot, *, point: bool) -> None:
        """Take a snapshot: into the history now, into the page by the builder (``run``)."""
        self.history.record(snapshot.data, point=point)
        self._pending = snapshot.data
        self._wake.set()

    async def builder(self) -> None:
        """Build what the page serves from the newest snapshot, one build at a time.

        The agent hands snapshots to its outputs one output after another, so the output
        only records them and returns; building (a second at a million cells) happens here.
        Snapshots that arrive during a build are coalesced into the next one, and builds are
        spaced by BUILD_SPACING times their cost, so state changes arriving every 100 ms
        cannot keep a core busy.
        """
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            data, self._pending = self._pending, None
            if data is None:
                continue
            started = time.perf_counter()
            mesh, has_mesh = self._mesh_of(data)
            self.current = await anyio.to_thread.run_sync(_build, data, mesh, has_mesh,
                                                          self.http_port)
            self.builds += 1
            cost = time.perf_counter() - started
            await anyio.sleep(min(cost * BUILD_SPACING, MAX_BUILD_GAP))

    async def latest(self) -> Published:
        if self.current is not None:
            return self.current
        async with self._lock:  # before the first round: a live view, rebuilt at most 1/s
            live = self._live
            if live is None or time.monotonic() - live.built > LIVE_TTL:
                data = self.context.snapshot().data
                mesh, has_mesh = self._mesh_of(data)
                live = self._live = await anyio.to_thread.run_sync(
                    _build, data, mesh, has_mesh, self.http_port)
            return live

    def history_info(self) -> dict[str, Any]:
        h = self.history
        return {"seconds": h.history_s, "points_per_path": h.capacity, "paths": len(h.rings),
                "bytes": h.nbytes()}


class WebOutput(Output):
    """The web page: heatmap, verdicts, history and the agent's own health, over TCP."""

    name: ClassVar[str] = "web"
    Settings: ClassVar[type[ComponentSettings]] = WebSettings

    def __init__(self, settings: WebSettings, context: AgentContext) -> None:
        super().__init__(settings, context)
        self.store = Store(context, settings)
        self.app = WebApp(settings, self.store)
        self.server = Server(self.app, max_connections=settings.max_connections,
                             idle_timeout=float(settings.idle_timeout),
                             max_header_bytes=settings.max_header_bytes)
        self.url = ""

    @classmethod
    def validate_settings(cls, settings: WebSettings, config: Any) -> None:
        WebSettings.validate(settings)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen (OSError naming the address when it cannot), log the URL, serve."""
        host, port = parse_web_listen(self.settings.listen)
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise OSError(f"cannot listen on {self.settings.listen}: "
                          f"{exc.strerror or exc}") from None
        self.url = url_of(host, listener.extra(SocketAttribute.local_port))
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(self.store.builder)
            logger.info("web page: {}", self.url)
            task_status.started()
            await listener.serve(self.server.handle, tg)

    async def round_completed(self, snapshot: Snapshot) -> None:
        self.store.publish(snapshot, point=True)

    async def state_changed(self, snapshot: Snapshot) -> None:
        # A decided failure shows at once, not at the end of the round (no history point).
        self.store.publish(snapshot, point=False)

    async def events(self, batch: list[Any]) -> None:
        # Every path transition at its own time, even a flap between two snapshots.
        for event in batch:
            self.store.history.event(event)
