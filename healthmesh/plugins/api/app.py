"""The ASGI application behind the socket: routes of /v1beta (Cilium's) and /v1 (ours).

Every answer is JSON. Unknown paths get 404, a known path with another method 405 (with
``Allow``), bad query values 400, a request body over the limit 413; an unexpected exception
is logged and answered with a JSON 500 that carries no traceback. (Errors found before a
request reaches the app, such as a malformed request, are answered in protocol.py.)
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

from loguru import logger

from healthmesh import AgentContext, __version__, format_duration, rfc3339
from healthmesh.plugins.api.cilium import health_response
from healthmesh.plugins.api.views import Rendered, Views, encode

STATES = ("reachable", "unreachable", "unknown")
MAX_QUERY_BYTES = 4096
#: Component states, best first: /v1/healthz's status is the worst of its components'.
COMPONENT_STATES = ("ok", "degraded", "failed")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def openapi_document() -> bytes:
    """The OpenAPI document of /v1, as kept in the package."""
    return resources.files(__package__).joinpath("openapi.json").read_bytes()


@dataclass
class Request:
    """What a handler needs of a request."""

    method: str
    path: str
    query: dict[str, str]
    params: dict[str, str]


@dataclass
class Answer:
    """A JSON response."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


class HttpError(Exception):
    """A client error: the status and one line saying what is wrong."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_body(path: str, status: int, message: str) -> bytes:
    """``{"error": ...}`` under /v1; go-swagger's ``{"code", "message"}`` under /v1beta."""
    if path.startswith("/v1beta/") or path == "/v1beta":
        return encode({"code": status, "message": message})
    return encode({"error": message})


Handler = Callable[[Request], Awaitable[Answer]]


class ProbeRunner:
    """What the app needs to run a probe round: returns the rendered fresh snapshot."""

    async def probe(self) -> Rendered:  # pragma: no cover - protocol
        raise NotImplementedError


class ApiApp:
    """Routes requests to handlers; one instance per agent."""

    def __init__(
        self,
        context: AgentContext,
        views: Views,
        runner: ProbeRunner,
        max_body: int = 4096,
        max_head: int = 16 * 1024,
    ) -> None:
        self.context = context
        self.views = views
        self.runner = runner
        self.max_body = max_body
        self.max_head = max_head
        self.openapi = openapi_document()
        from healthmesh.plugins.api.events import EventStreams  # it imports this module

        self.event_streams = EventStreams(context)
        self.routes: dict[str, dict[str, Handler]] = {
            "/v1beta/healthz": {"GET": self.beta_healthz},
            "/v1beta/status": {"GET": self.beta_status},
            "/v1beta/status/probe": {"PUT": self.beta_probe},
            "/v1/healthz": {"GET": self.healthz},
            "/v1/status": {"GET": self.status},
            "/v1/nodes": {"GET": self.nodes},
            "/v1/plugins": {"GET": self.plugins},
            "/v1/checks": {"GET": self.checks},
            "/v1/mesh": {"GET": self.mesh},
            "/v1/probe": {"POST": self.probe},
            "/v1/openapi.json": {"GET": self.openapi_json},
        }

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and websockets are not served
        path = scope.get("path", "")
        try:
            if path == "/v1/events":  # a stream, not one JSON answer
                await self.event_streams(scope, receive, send, _query(scope))
                return
            answer = await self.dispatch(scope)
        except HttpError as exc:
            answer = Answer(exc.status, error_body(path, exc.status, exc.message), exc.headers)
        except Exception as exc:
            logger.opt(exception=exc).error("api: {} {} failed", scope.get("method"), path)
            message = f"internal error ({type(exc).__name__}); see the agent's log"
            answer = Answer(500, error_body(path, 500, message))
        head_only = scope.get("method") == "HEAD"
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(answer.body)).encode()),
                    (b"cache-control", b"no-store"),
                    *answer.headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if head_only else answer.body})

    async def dispatch(self, scope: Scope) -> Answer:
        """Find the handler of a request and run it."""
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        methods = self.routes.get(path)
        params: dict[str, str] = {}
        if methods is None:
            methods, params = self._node_route(path)
        lookup = "GET" if method == "HEAD" else method
        handler = methods.get(lookup)
        if handler is None:
            allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
            raise HttpError(
                405,
                f"method {method} is not allowed on {path}; use {', '.join(allowed)}",
                ((b"allow", ", ".join(allowed).encode()),),
            )
        self._check_body(scope)
        request = Request(method, path, _query(scope), params)
        return await handler(request)

    def _check_body(self, scope: Scope) -> None:
        """Refuse a head over ``max_head`` and a body over ``max_body`` (and close, unread)."""
        close = ((b"connection", b"close"),)
        headers = scope.get("headers", ())
        # The parser enforces the limit only while a head is incomplete; a head that arrived
        # in one read is measured here (request line and "name: value\r\n" lines).
        size = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + 16
        size += sum(len(name) + len(value) + 4 for name, value in headers)
        if size > self.max_head:
            raise HttpError(431, f"request line and headers over {self.max_head} bytes", close)
        for name, value in headers:
            if name == b"transfer-encoding":
                raise HttpError(411, "request bodies must have a Content-Length", close)
            if name == b"content-length" and int(value) > self.max_body:
                raise HttpError(
                    413, f"request body of {int(value)} bytes; at most {self.max_body}", close
                )

    def _node_route(self, path: str) -> tuple[dict[str, Handler], dict[str, str]]:
        parts = path.split("/")
        # "", "v1", "nodes", cluster, name
        if len(parts) == 5 and parts[:3] == ["", "v1", "nodes"] and parts[3] and parts[4]:
            return {"GET": self.node}, {"cluster": parts[3], "name": parts[4]}
        raise HttpError(404, f"no such path: {path}")

    # -- /v1beta: Cilium's health API ------------------------------------------------------

    async def beta_healthz(self, request: Request) -> Answer:
        return Answer(200, encode(health_response(self.context.started_at)))

    async def beta_status(self, request: Request) -> Answer:
        return Answer(200, await (await self.views.latest()).beta_async())

    async def beta_probe(self, request: Request) -> Answer:
        return Answer(200, await (await self.runner.probe()).beta_async())

    # -- /v1: healthmesh's own -------------------------------------------------------------

    async def healthz(self, request: Request) -> Answer:
        components = self._components()
        status = max((c["state"] for c in components), key=COMPONENT_STATES.index, default="ok")
        body = {
            "status": status,
            "version": __version__,
            "node": {"name": self.context.local_node.name,
                     "cluster": self.context.local_node.cluster},
            "started_at": rfc3339(self.context.started_at),
            "uptime": format_duration(max(0, int(time.time() - self.context.started_at))),
            "uptime_s": round(max(0.0, time.time() - self.context.started_at), 3),
            "rounds_completed": self.views.rounds_completed,
            "components": components,
        }
        return Answer(200, encode(body))

    def _components(self) -> list[dict[str, Any]]:
        """The agent's component states, checked: an agent without them reports none."""
        # getattr: an agent (core) that does not offer components yet still serves healthz.
        source = getattr(self.context, "components", None)
        if source is None:
            return []
        out = []
        for c in source():
            state = c.get("state")
            if state not in COMPONENT_STATES:
                state = "failed"  # an unknown state is not a healthy one
            out.append({
                "name": str(c.get("name", "")),
                "state": state,
                "message": str(c.get("message") or ""),
                "since": str(c.get("since") or ""),
                "restarts": int(c.get("restarts") or 0),
            })
        return out

    async def status(self, request: Request) -> Answer:
        return Answer(200, (await self.views.latest()).status)

    async def nodes(self, request: Request) -> Answer:
        state = request.query.get("state")
        if state is not None and state not in STATES:
            raise HttpError(400, f"state: {state!r} is not one of {', '.join(STATES)}")
        cluster = request.query.get("cluster")
        rendered = await self.views.latest()
        return Answer(200, encode({"nodes": rendered.nodes(state, cluster)}))

    async def node(self, request: Request) -> Answer:
        cluster, name = request.params["cluster"], request.params["name"]
        found = (await self.views.latest()).node(cluster, name)
        if found is None:
            raise HttpError(404, f"no node {name!r} in cluster {cluster!r}")
        return Answer(200, encode(found))

    async def checks(self, request: Request) -> Answer:
        return Answer(200, encode({"checks": (await self.views.latest()).data.get("checks", [])}))

    async def mesh(self, request: Request) -> Answer:
        """The mesh matrix and its verdicts (docs/mesh.schema.json)."""
        build = getattr(self.context, "mesh_async", None)
        if build is not None:  # built off the agent's loop
            return Answer(200, encode(await build()))
        source = getattr(self.context, "mesh", None)
        if source is None:  # an agent (core) without the mesh matrix
            raise HttpError(404, "this agent does not build the mesh matrix")
        return Answer(200, encode(source()))

    async def plugins(self, request: Request) -> Answer:
        return Answer(200, encode({"plugins": self.context.plugins()}))

    async def probe(self, request: Request) -> Answer:
        return Answer(200, (await self.runner.probe()).status)

    async def openapi_json(self, request: Request) -> Answer:
        return Answer(200, self.openapi)


def _query(scope: Scope) -> dict[str, str]:
    raw: bytes = scope.get("query_string", b"")
    if not raw:
        return {}
    if len(raw) > MAX_QUERY_BYTES:
        raise HttpError(414, f"query string over {MAX_QUERY_BYTES} bytes")
    text = raw.decode("latin-1")
    try:
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "query string is not valid UTF-8 percent-encoding") from None
    return dict(pairs)  # the last of repeated keys wins

