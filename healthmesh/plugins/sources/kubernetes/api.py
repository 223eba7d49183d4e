"""List and watch one Kubernetes resource over httpx, bounded in size and time.

The list is paged (``limit``/``continue``) so no single response is unbounded; the watch is a
chunked stream of one JSON event per line, read with a bound on each line and on the silence
between reads. Errors come back as ``ApiError`` carrying the HTTP status (410 for an expired
``resourceVersion``, in a response or as an in-stream ``ERROR`` event).
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from healthmesh import lazy_import

#: httpx is loaded when this code first runs (most agents have no such source).
httpx = lazy_import("httpx")


#: Largest error body read (a ``Status`` object is a few hundred bytes).
MAX_ERROR_BYTES = 64 * 1024


class ApiError(Exception):
    """The API server answered with an error status (or the stream broke its protocol)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Resource:
    """A cluster-scoped resource: its list URL and the RBAC name used in messages."""

    path: str  # e.g. /api/v1/nodes
    plural: str  # nodes
    group: str  # "" for core

    @property
    def rbac(self) -> str:
        group = self.group or 'core ("")'
        return f"{self.plural} (API group {group})"


NODES = Resource("/api/v1/nodes", "nodes", "")
CILIUM_NODES = Resource("/apis/cilium.io/v2/ciliumnodes", "ciliumnodes", "cilium.io")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one list or watch may cost."""

    timeout: float  # connect, and each read of a list
    watch_timeout: float  # asked of the server; the stream's read bound adds ``timeout``
    page_size: int
    max_response_bytes: int
    max_line_bytes: int
    max_objects: int


@dataclass
class Event:
    """One watch event: ADDED, MODIFIED, DELETED or BOOKMARK, and its object."""

    type: str
    object: dict[str, Any]

    @property
    def resource_version(self) -> str:
        return str((self.object.get("metadata") or {}).get("resourceVersion") or "")


class Api:
    """Lists and watches resources on one API server."""

    def __init__(self, client: httpx.AsyncClient, limits: Limits) -> None:
        self.client = client
        self.limits = limits

    async def list(
        self, res: Resource, label_selector: str = "", *, cached: bool = False
    ) -> tuple[list[dict[str, Any]], str]:
        """Every object (all pages) and the list's ``resourceVersion``.

        ``cached``: ``resourceVersion=0``, served from the API server's watch cache instead of
        a quorum read of etcd; what a DaemonSet's agents starting together should ask for.
        """
        items: list[dict[str, Any]] = []
        cont = ""
        while True:
            params: dict[str, Any] = {"limit": self.limits.page_size}
            if label_selector:
                params["labelSelector"] = label_selector
            if cont:
                params["continue"] = cont
            elif cached:
                params["resourceVersion"] = "0"
            body = await self._get_json(res, params)
            page = body.get("items")
            meta = body.get("metadata")
            if not isinstance(page, list) or not isinstance(meta, dict):
                raise ApiError(0, f"list {res.plural}: not a list response")
            items.extend(o for o in page if isinstance(o, dict))
            if len(items) > self.limits.max_objects:
                raise ApiError(0, f"list {res.plural}: more than {self.limits.max_objects} objects")
            cont = str(meta.get("continue") or "")
            if not cont:
                return items, str(meta.get("resourceVersion") or "")

    async def _get_json(self, res: Resource, params: dict[str, Any]) -> dict[str, Any]:
        timeout = httpx.Timeout(self.limits.timeout)
        async with self.client.stream("GET", res.path, params=params, timeout=timeout) as resp:
            if resp.status_code != 200:
                raise await _error(resp, res, "list")
            raw = await _read_bounded(resp, self.limits.max_response_bytes, f"list {res.plural}")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ApiError(0, f"list {res.plural}: response is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(0, f"list {res.plural}: response is not a JSON object")
        return body

    async def watch(
        self,
        res: Resource,
        resource_version: str,
        label_selector: str = "",
        opened: Callable[[], None] = lambda: None,
    ) -> AsyncIterator[tuple[Event, bool]]:
        """Events after ``resource_version``, each with whether another is already buffered.

        Ends when the server closes the stream cleanly (its ``timeoutSeconds``); raises
        ApiError for an error status or an ``ERROR`` event, httpx errors for transport
        failures and silence longer than the read bound. ``opened`` is called once the server
        has accepted the watch.
        """
        lim = self.limits
        params: dict[str, Any] = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            # Spread over 80-100% so that the agents of a cluster do not all come back at once.
            "timeoutSeconds": max(1, round(lim.watch_timeout * random.uniform(0.8, 1.0))),
        }
        if label_selector:
            params["labelSelector"] = label_selector
        timeout = httpx.Timeout(lim.timeout, read=lim.watch_timeout + lim.timeout)
        async with self.client.stream("GET", res.path, params=params, timeout=timeout) as resp:
            if resp.status_code != 200:
                raise await _error(resp, res, "watch")
            opened()
            buf = bytearray()
            async for chunk in resp.aiter_bytes():
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    if nl > lim.max_line_bytes:
                        raise _too_long(res, lim.max_line_bytes)
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if not line.strip():
                        continue
                    yield _event(line, res), b"\n" in buf
                if len(buf) > lim.max_line_bytes:
                    raise _too_long(res, lim.max_line_bytes)
            if buf.strip():
                raise httpx.RemoteProtocolError(f"watch {res.plural}: stream cut mid-event")


def _too_long(res: Resource, limit: int) -> ApiError:
    return ApiError(0, f"watch {res.plural}: an event is longer than {limit} bytes")


def _event(line: bytes, res: Resource) -> Event:
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ApiError(0, f"watch {res.plural}: event is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise ApiError(0, f"watch {res.plural}: event without an object")
    kind = str(data.get("type"))
    obj = data["object"]
    if kind == "ERROR":
        code = obj.get("code")
        raise ApiError(
            code if isinstance(code, int) else 0,
            f"watch {res.plural}: {str(obj.get('message') or obj.get('reason') or 'error')[:300]}",
        )
    if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
        raise ApiError(0, f"watch {res.plural}: unknown event type {kind[:40]!r}")
    return Event(kind, obj)


async def _read_bounded(resp: httpx.Response, limit: int, what: str) -> bytes:
    out = bytearray()
    async for chunk in resp.aiter_bytes():
        out += chunk
        if len(out) > limit:
            raise ApiError(0, f"{what}: response is larger than {limit} bytes")
    return bytes(out)


async def _error(resp: httpx.Response, res: Resource, verb: str) -> ApiError:
    try:
        raw = await _read_bounded(resp, MAX_ERROR_BYTES, f"{verb} {res.plural}")
        status = json.loads(raw)
        message = str(status.get("message") or "")[:300] if isinstance(status, dict) else ""
    except (ApiError, ValueError, httpx.HTTPError):
        message = ""
    code = resp.status_code
    said = f"; server said: {message}" if message else ""
    if code == 401:
        message = (
            f"{verb} {res.plural}: 401 Unauthorized: the API server did not accept the "
            f"credentials (an expired or rotated token?){said}"
        )
    elif code == 403:
        message = (
            f"{verb} {res.plural}: 403 Forbidden: RBAC does not allow {verb!r} on {res.rbac}; "
            f"grant get, list, watch on it (deploy/rbac.yaml){said}"
        )
    else:
        message = f"{verb} {res.plural}: HTTP {code}" + (f": {message}" if message else "")
    return ApiError(code, message)
