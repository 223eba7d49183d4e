"""The page's routes: static assets shipped in the package, JSON endpoints, auth, headers.

Read-only: GET and HEAD; anything else gets 405. Every answer carries the safe headers
(a CSP allowing only this origin's own scripts, styles and fetches, no framing, no
sniffing, no referrer); JSON is never cached, the assets are revalidated.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

from healthmesh import __version__, json_encoder
from healthmesh.plugins.web.server import Request, Response
from healthmesh.plugins.web.settings import WebSettings

MAX_QUERY_BYTES = 2048

CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'"
)
SAFE_HEADERS = [
    (b"content-security-policy", CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
#: Static assets: URL path -> (file in static/, content type).
ASSETS = {
    "/": ("index.html", b"text/html; charset=utf-8"),
    "/index.html": ("index.html", b"text/html; charset=utf-8"),
    "/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/app.css": ("app.css", b"text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", b"image/svg+xml"),
}
JSON = b"application/json"


_encoder = json_encoder


def encode(obj: Any) -> bytes:
    """Compact JSON bytes."""
    return _encoder.encode(obj)


def load_assets() -> dict[str, tuple[bytes, bytes]]:
    """Every asset's bytes and content type, read once from the package."""
    files = resources.files(__package__).joinpath("static")
    return {path: (files.joinpath(name).read_bytes(), ctype)
            for path, (name, ctype) in ASSETS.items()}


class HttpError(Exception):
    """A client error: the status, one line, and extra headers."""

    def __init__(self, status: int, message: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class WebApp:
    """Routes requests; ``data`` is the output's published state (see output.py)."""

    def __init__(self, settings: WebSettings, data: Any) -> None:
        self.settings = settings
        self.data = data
        self.assets = load_assets()
        self.routes = {
            "/api/mesh": self.mesh,
            "/api/matrix": self.matrix,
            "/api/agent": self.agent,
            "/api/snapshot": self.snapshot,
            "/api/history": self.history,
            "/api/cell": self.cell,
        }
        self._basic = (settings.username.encode(), settings.password.encode())
        self._token = settings.token.encode()

    async def __call__(self, request: Request) -> Response:
        try:
            response = await self.dispatch(request)
        except HttpError as exc:
            response = Response(exc.status, encode({"error": exc.message}),
                                [(b"content-type", JSON), (b"cache-control", b"no-store"),
                                 *exc.headers])
        response.headers.extend(SAFE_HEADERS)
        return response

    async def dispatch(self, request: Request) -> Response:
        self.authorize(request)  # first: a stranger learns nothing, not even which paths exist
        path = request.path
        handler = self.routes.get(path)
        if handler is None and path not in self.assets:
            raise HttpError(404, f"no such path: {path[:200]}")
        if request.method not in ("GET", "HEAD"):
            raise HttpError(405, f"method {request.method[:20]} is not allowed; this page is "
                            "read-only (GET, HEAD)", [(b"allow", b"GET, HEAD")])
        if handler is None:
            body, ctype = self.assets[path]
            return Response(200, body, [(b"content-type", ctype),
                                        (b"cache-control", b"no-cache")])
        query = _query(request.query)
        return Response(200, await handler(query), [(b"content-type", JSON),
                                                    (b"cache-control", b"no-store")])

    def authorize(self, request: Request) -> None:
        """Check the configured credentials (constant-time); 401 when they do not match."""
        basic = bool(self._basic[0])
        if not basic and not self._token:
            return
        given = request.headers.get(b"authorization", b"")
        scheme, _, value = given.partition(b" ")
        scheme = scheme.lower()
        ok = False
        if scheme == b"bearer" and self._token:
            ok = hmac.compare_digest(value.strip(), self._token)
        elif scheme == b"basic" and basic:
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                user = password = b""
            # Both compared whatever the first gives, so timing tells nothing about either.
            ok_user = hmac.compare_digest(user, self._basic[0])
            ok_password = hmac.compare_digest(password, self._basic[1])
            ok = ok_user and ok_password
        if not ok:
            challenge = b'Basic realm="healthmesh", charset="UTF-8"' if basic else b"Bearer"
            raise HttpError(401, "authentication required", [(b"www-authenticate", challenge)])

    # -- JSON endpoints -----------------------------------------------------------------------

    async def mesh(self, query: dict[str, str]) -> bytes:
        return await (await self.data.latest()).mesh()

    async def matrix(self, query: dict[str, str]) -> bytes:
        return (await self.data.latest()).matrix

    async def snapshot(self, query: dict[str, str]) -> bytes:
        return (await self.data.latest()).snapshot

    async def agent(self, query: dict[str, str]) -> bytes:
        published = await self.data.latest()
        info = dict(published.agent)
        info["served_at"] = round(time.time(), 3)
        info["version"] = __version__
        info["history"] = self.data.history_info()
        return encode(info)

    async def history(self, query: dict[str, str]) -> bytes:
        node = query.get("node")
        if not node:
            raise HttpError(400, "node: required (cluster/name)")
        await self.data.latest()
        return encode({"node": node, "paths": self.data.history.of_node(node)})

    async def cell(self, query: dict[str, str]) -> bytes:
        observer, target = query.get("observer"), query.get("target")
        if not observer or not target:
            raise HttpError(400, "observer and target: both required (cluster/name)")
        found = (await self.data.latest()).cell(observer, target)
        if found is None:
            raise HttpError(404, f"no cell {observer[:100]} -> {target[:100]}")
        return encode({"observer": observer, "target": target, **found})


def _query(raw: bytes) -> dict[str, str]:
    if not raw:
        return {}
    if len(raw) > MAX_QUERY_BYTES:
        raise HttpError(414, f"query string over {MAX_QUERY_BYTES} bytes")
    try:
        return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True, errors="strict"))
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "query string is not valid UTF-8 percent-encoding") from None
