"""Output ``metrics``: a Prometheus endpoint over TCP, read from the agent at scrape time."""

from __future__ import annotations

import base64
import gzip
import hmac
import time
from typing import Any, ClassVar

import anyio
from anyio.abc import SocketAttribute, TaskStatus
from loguru import logger

from healthmesh import AgentContext, ComponentSettings, Output, Snapshot, lazy_import
from healthmesh.plugins.metrics.server import MetricsServer, Reply
from healthmesh.plugins.metrics.settings import MetricsSettings, read_password, tls_context

#: Loaded when a metrics output is configured (with the collector module that uses it).
prometheus_client = lazy_import("prometheus_client", "exposition")

METRICS_PATH = "/metrics"


class MetricsOutput(Output):
    """``GET /metrics`` in the Prometheus text format, or OpenMetrics when asked."""

    name: ClassVar[str] = "metrics"
    Settings: ClassVar[type[ComponentSettings]] = MetricsSettings

    def __init__(self, settings: MetricsSettings, context: AgentContext) -> None:
        super().__init__(settings, context)
        self.latest: Snapshot | None = None
        self.address: tuple[str, int] | None = None  # bound, once serving
        from healthmesh.plugins.metrics.collector import HealthmeshCollector

        self.registry = prometheus_client.CollectorRegistry(auto_describe=False)
        self.collector = HealthmeshCollector(
            context,
            self._snapshot,
            per_peer=settings.per_peer,
            max_peers=settings.max_peers,
            cilium=settings.cilium_compat,
        )
        self.registry.register(self.collector)
        if settings.process:
            # The library's own collectors, registered in this registry (not its global one).
            pc = prometheus_client
            for lib in (pc.PROCESS_COLLECTOR, pc.PLATFORM_COLLECTOR, pc.GC_COLLECTOR):
                self.registry.register(lib)
        if settings.cilium_compat:
            context.telemetry.cilium_enabled = True  # only then does the core feed its histogram
        self.server = MetricsServer(
            self.handle,
            max_connections=settings.max_connections,
            header_timeout=settings.header_timeout,
            idle_timeout=settings.idle_timeout,
            ssl_context=tls_context(settings),
        )
        self._cache: dict[str, tuple[float, bytes, str]] = {}
        self._auth: bytes | None = None
        if settings.basic_auth_user:
            password = read_password(settings.basic_auth_password_file)
            secret = f"{settings.basic_auth_user}:{password}"
            self._auth = b"Basic " + base64.b64encode(secret.encode("utf-8"))

    @classmethod
    def validate_settings(cls, settings: MetricsSettings, config: Any) -> None:
        """Check the listen address and the limits."""
        MetricsSettings.validate(settings)

    def _snapshot(self) -> Snapshot:
        # The last snapshot handed over (each round, and soon after any change); building
        # one costs ~0.1 s at 5,000 peers, so only before the first one arrives.
        if self.latest is None:
            self.latest = self.context.snapshot()
        return self.latest

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind ``listen`` (OSError naming it), report ready, serve until cancelled."""
        host, port = MetricsSettings.validate(self.settings)
        try:
            listener = await self.server.bind(host, port)
        except OSError as exc:
            why = (exc.strerror or str(exc)).lower()
            raise OSError(f"cannot listen on {self.settings.listen}: {why}") from None
        addr = listener.extra(SocketAttribute.local_address)
        self.address = (str(addr[0]), int(addr[1]))
        scheme = "https" if self.settings.tls_cert_file else "http"
        logger.info("metrics listening on {}://{}{}", scheme, _fmt(*self.address), METRICS_PATH)
        self.context.report(self, "ok", f"{scheme}://{_fmt(*self.address)}{METRICS_PATH}")
        task_status.started()
        await self.server.serve(listener)

    async def round_completed(self, snapshot: Snapshot) -> None:
        self.latest = snapshot

    async def state_changed(self, snapshot: Snapshot) -> None:
        self.latest = snapshot

    # -- requests ---------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: dict[str, str]) -> Reply:
        """Answer one request: ``/metrics`` (query ignored), else 404."""
        if self._auth is not None and not hmac.compare_digest(
            headers.get("authorization", "").encode("latin-1"), self._auth
        ):
            return Reply(401, b"401 unauthorized\n", [
                ("content-type", "text/plain; charset=utf-8"),
                ("www-authenticate", 'Basic realm="healthmesh", charset="UTF-8"'),
            ])
        path = target.split("?", 1)[0]
        if path != METRICS_PATH:
            return Reply(404, b"404 not found: try /metrics\n",
                         [("content-type", "text/plain; charset=utf-8")])
        accept = headers.get("accept", "")
        gz = "gzip" in headers.get("accept-encoding", "").lower()
        body, ctype = self.render(accept)
        out = [("content-type", ctype), ("vary", "Accept, Accept-Encoding")]
        if gz:
            body = gzip.compress(body, compresslevel=1)
            out.append(("content-encoding", "gzip"))
        return Reply(200, body, out)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header: (body, content type), briefly cached."""
        encoder, ctype = prometheus_client.exposition.choose_encoder(accept)
        key = ctype
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.settings.cache:
            return hit[1], hit[2]
        started, cpu = time.perf_counter(), time.thread_time()
        body = encoder(self.registry)
        # Shown from the next scrape on: how long this one took, and CPU spent on all of them.
        self.collector.render_seconds = time.perf_counter() - started
        self.collector.render_cpu_seconds += time.thread_time() - cpu
        self._cache[key] = (now, body, ctype)
        return body, ctype


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
