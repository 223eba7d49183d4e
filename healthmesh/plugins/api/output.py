"""Output ``api``: serves the local API on a unix socket, from before the first probe on."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import anyio
from anyio.abc import TaskGroup, TaskStatus
from loguru import logger

from healthmesh import AgentContext, ComponentSettings, Output, Snapshot
from healthmesh.plugins.api.app import ApiApp, HttpError, ProbeRunner
from healthmesh.plugins.api.listener import UnixListener
from healthmesh.plugins.api.protocol import ConnectionTable, protocol_class
from healthmesh.plugins.api.settings import ApiSettings, parse_mode, resolve_group
from healthmesh.plugins.api.views import Rendered, Views

#: Bound on closing connections and removing the socket at shutdown.
CLOSE_BOUND = 1.0


class ProbeRounds(ProbeRunner):
    """Runs on-demand probe rounds in the API's task group; concurrent callers share one."""

    def __init__(self, context: AgentContext, views: Views) -> None:
        self.context = context
        self.views = views
        self.tg: TaskGroup | None = None
        self._pending: tuple[anyio.Event, dict[str, Any]] | None = None

    async def probe(self) -> Rendered:
        """Probe every path now (bounded by the probe timeout) and return the fresh result."""
        if self._pending is None:
            if self.tg is None:
                raise RuntimeError("the API is not serving")
            pending = self._pending = (anyio.Event(), {})
            self.tg.start_soon(self._round, pending)
        event, box = self._pending
        await event.wait()
        if "error" in box:
            raise box["error"]
        if "rendered" not in box:
            # The round was cancelled: the agent is stopping (its task group is cancelled
            # before the server closes its connections), so answer that, not a 500.
            raise HttpError(
                503, "the agent is shutting down; the probe round did not finish",
                ((b"connection", b"close"),),
            )
        return box["rendered"]

    async def _round(self, pending: tuple[anyio.Event, dict[str, Any]]) -> None:
        event, box = pending
        try:
            box["rendered"] = await self.views.publish(await self.context.probe_round())
        except Exception as exc:
            box["error"] = exc
        finally:
            self._pending = None
            event.set()


class ApiOutput(Output):
    """The local API: Cilium's /v1beta and healthmesh's /v1 over a unix socket."""

    name: ClassVar[str] = "api"
    default_enabled: ClassVar[bool] = True
    Settings: ClassVar[type[ComponentSettings]] = ApiSettings

    def __init__(self, settings: ApiSettings, context: AgentContext) -> None:
        super().__init__(settings, context)
        self.views = Views(context)
        self.rounds = ProbeRounds(context, self.views)
        self.app = ApiApp(context, self.views, self.rounds, max_body=settings.max_body_bytes,
                          max_head=settings.max_header_bytes)
        self.path: str = settings.socket

    @classmethod
    def validate_settings(cls, settings: ApiSettings, config: Any) -> None:
        """Check the socket path, the mode and that the group exists."""
        ApiSettings.validate(settings)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket (OSError saying why not), report ready, serve until cancelled."""
        import uvicorn  # here, not at import: the CLI loads every plugin and needs none of it

        s: ApiSettings = self.settings
        table = ConnectionTable(s.max_connections, float(s.idle_timeout))
        config = _uvicorn_config(self.app, table, s.max_header_bytes)
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        listener = UnixListener.open(s.socket, parse_mode(s.mode), resolve_group(s.group))
        self.path = listener.path
        try:
            async with anyio.create_task_group() as tg:
                self.rounds.tg = tg
                await server.startup(sockets=[listener.sock])
                logger.info("api listening on unix://{}", listener.path)
                self.context.report(self, "ok", f"unix://{listener.path}")
                task_status.started()
                await server.main_loop()  # until cancelled (uvicorn's own exit flag is unused)
        finally:
            self.rounds.tg = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_BOUND):
                if server.started:
                    server.should_exit = True
                    await server.shutdown()
            listener.close()

    async def round_completed(self, snapshot: Snapshot) -> None:
        await self.views.publish(snapshot)

    async def state_changed(self, snapshot: Snapshot) -> None:
        # Serve a decided failure (or recovery) at once, not at the end of the round.
        await self.views.publish(snapshot)


def _uvicorn_config(app: ApiApp, table: ConnectionTable, max_header_bytes: int) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app,
        http=protocol_class(table),
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=max(1, round(table.idle_timeout)),  # the protocol uses the float
        timeout_graceful_shutdown=1,
        limit_concurrency=None,  # the connection table caps connections (and so requests)
        h11_max_incomplete_event_size=max_header_bytes,
    )
    config.load()
    # uvicorn logs through stdlib logging; the agent logs through loguru. Its warnings are
    # about clients (one per malformed request), which a client must not flood the log with;
    # its errors go to the agent's log in one line (stdlib's last-resort handler would print
    # a traceback on stderr).
    log = logging.getLogger("uvicorn.error")
    log.setLevel(logging.ERROR)
    log.propagate = False
    if not any(isinstance(h, _OneLine) for h in log.handlers):
        log.addHandler(_OneLine())
    return config


class _OneLine(logging.Handler):
    """uvicorn's error records as one line of the agent's log, without the traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        reason = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        logger.error("api: {}{}", record.getMessage().strip(), reason)
