"""A Kubernetes API server double: Node and CiliumNode list/watch over real HTTP(S).

It speaks the wire format clients see from a real API server, as far as healthmesh uses it:

- ``GET /api/v1/nodes`` (and ``/apis/cilium.io/v2/ciliumnodes``): a JSON list with
  ``metadata.resourceVersion``, paged by ``limit``/``continue`` from one snapshot;
  ``labelSelector`` (``k=v``, ``k!=v``, ``k``, ``!k``, comma-separated).
- ``?watch=true&resourceVersion=N``: a chunked stream of ``{"type", "object"}`` lines for
  every change after N, ``BOOKMARK`` events when ``allowWatchBookmarks=true``, the stream
  ended after ``timeoutSeconds``; a version older than the compacted history gets an
  in-stream ``ERROR`` event with a ``410`` Status, as the real server sends it.
- Bearer-token authentication (401), per-resource RBAC refusal (403), an absent CRD (404),
  each with a ``Status`` body.

Failure modes a test can switch on: cut every open watch mid-line, keep watches silent (no
events, no bookmarks), restart the server on the same port (optionally forgetting history,
so old versions get 410), compact the history.

The server runs on its own event loop in a thread, so an agent in the test's loop or in a
subprocess talks to it over a real socket; every mutation is run on that loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

NODES = "nodes"
CILIUM = "ciliumnodes"
PATHS = {"/api/v1/nodes": NODES, "/apis/cilium.io/v2/ciliumnodes": CILIUM}
KINDS = {NODES: ("Node", "v1"), CILIUM: ("CiliumNode", "cilium.io/v2")}
MAX_HEADER_BYTES = 64 * 1024


class KubeDouble:
    """One fake API server; ``url`` once started. Use as a context manager."""

    def __init__(
        self,
        *,
        token: str | None = "test-token",
        tls: dict[str, str] | None = None,
        cilium_crd: bool = True,
        bookmark_interval: float = 0.25,
        host: str = "127.0.0.1",
        require_client_cert: bool = False,
        port: int = 0,
    ) -> None:
        self.token = token
        self.tls = tls
        self.require_client_cert = require_client_cert
        self.cilium_crd = cilium_crd
        self.bookmark_interval = bookmark_interval
        self.host = host
        self.port = port
        self.rv = 100
        self.objects: dict[str, dict[str, dict[str, Any]]] = {NODES: {}, CILIUM: {}}
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []
        self.compacted = 0  # watches from a version below this get 410
        self.forbidden: set[str] = set()
        self.silent = False
        self.end_watches_at_once = False  # a proxy that closes every watch straight away
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (resource, verb, params)
        self._snapshots: dict[str, list[dict[str, Any]]] = {}
        self._changed = asyncio.Event()
        self._cut: set[asyncio.StreamWriter] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def __enter__(self) -> KubeDouble:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._listen)

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._close)
        self._call(self._cancel_all)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(5)
        self._loop.close()
        self._loop = None

    def restart(self, *, forget_history: bool = False, down_for: float = 0.3) -> None:
        """Close every connection and the listener, wait, listen again on the same port."""
        self._call(self._close)
        time.sleep(down_for)
        if forget_history:
            self._call(self._compact)
        self._call(self._listen)

    async def _listen(self) -> None:
        ctx = None
        if self.tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.tls["cert"], self.tls["key"])
            ctx.load_verify_locations(self.tls["ca"])
            # Client certificates accepted, or required (the kubeconfig's client-certificate).
            ctx.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, ssl=ctx, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        self._wake()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None

        async def run() -> Any:
            out = fn(*args)
            if asyncio.iscoroutine(out):
                out = await out
            return out

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    # -- state --------------------------------------------------------------------------

    def put(self, resource: str, obj: dict[str, Any]) -> int:
        """Create or replace an object (ADDED or MODIFIED); its new resourceVersion."""
        return self._call(self._put, resource, obj)

    def delete(self, resource: str, name: str) -> int:
        return self._call(self._delete, resource, name)

    def put_many(self, resource: str, objs: list[dict[str, Any]]) -> None:
        self._call(lambda: [self._put(resource, o) for o in objs])

    def compact(self) -> None:
        """Forget the history: a watch from any version seen so far gets 410."""
        self._call(self._compact)

    def cut_watches(self) -> None:
        """Every open watch gets half of its next line, then the connection is dropped."""
        self._call(lambda: self._cut.update(self._watchers()))
        self._call(self._wake)

    def drop_watches(self) -> None:
        """Close every open watch connection at once (no end of stream)."""

        def drop() -> None:
            for w in self._watchers():
                w.transport.abort()
            self._wake()

        self._call(drop)

    def watch_count(self, resource: str) -> int:
        return sum(1 for r, v, _ in list(self.requests) if r == resource and v == "watch")

    def list_count(self, resource: str) -> int:
        return sum(
            1
            for r, v, p in list(self.requests)
            if r == resource and v == "list" and not p.get("continue")
        )

    def _put(self, resource: str, obj: dict[str, Any]) -> int:
        obj = json.loads(json.dumps(obj))
        meta = obj.setdefault("metadata", {})
        name = meta["name"]
        kind, api_version = KINDS[resource]
        obj.setdefault("kind", kind)
        obj.setdefault("apiVersion", api_version)
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        etype = "MODIFIED" if name in self.objects[resource] else "ADDED"
        self.objects[resource][name] = obj
        self.history.append((self.rv, resource, etype, obj))
        self._wake()
        return self.rv

    def _delete(self, resource: str, name: str) -> int:
        obj = self.objects[resource].pop(name)
        self.rv += 1
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
        self.history.append((self.rv, resource, "DELETED", obj))
        self._wake()
        return self.rv

    def _compact(self) -> None:
        self.rv += 1
        self.compacted = self.rv
        self.history.clear()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _watchers(self) -> set[asyncio.StreamWriter]:
        return {w for w in self._writers if getattr(w, "_kube_watch", False)}

    # -- HTTP ---------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                if len(head) > MAX_HEADER_BYTES:
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
                }
                keep = await self._request(method, target, headers, writer)
                if not keep:
                    return
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            self._writers.discard(writer)
            self._cut.discard(writer)
            writer.transport.abort()

    async def _request(
        self, method: str, target: str, headers: dict[str, str], writer: asyncio.StreamWriter
    ) -> bool:
        url = urlsplit(target)
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        resource = PATHS.get(url.path)
        watch = params.get("watch") in ("true", "1")
        self.requests.append((resource or url.path, "watch" if watch else "list", params))
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            return await self._status(writer, 401, "Unauthorized", "Unauthorized")
        if method != "GET" or resource is None or (resource == CILIUM and not self.cilium_crd):
            return await self._status(
                writer, 404, "NotFound", "the server could not find the requested resource"
            )
        if resource in self.forbidden:
            verb = "watch" if watch else "list"
            group = "cilium.io" if resource == CILIUM else ""
            return await self._status(
                writer,
                403,
                "Forbidden",
                f'{resource} is forbidden: User "system:serviceaccount:kube-system:healthmesh" '
                f'cannot {verb} resource "{resource}" in API group "{group}" at the cluster scope',
            )
        if watch:
            await self._watch(resource, params, writer)
            return False
        return await self._list(resource, params, writer)

    async def _status(
        self, writer: asyncio.StreamWriter, code: int, reason: str, message: str
    ) -> bool:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        await self._send(writer, code, reason, json.dumps(body).encode())
        return True

    async def _send(
        self, writer: asyncio.StreamWriter, code: int, reason: str, body: bytes
    ) -> None:
        writer.write(
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    async def _list(
        self, resource: str, params: dict[str, str], writer: asyncio.StreamWriter
    ) -> bool:
        cont = params.get("continue", "")
        if cont:
            token = json.loads(base64.urlsafe_b64decode(cont))
            rv, start, items = token["rv"], token["start"], self._snapshots.get(token["id"], [])
        else:
            selector = params.get("labelSelector", "")
            items = [
                o
                for _, o in sorted(self.objects[resource].items())
                if matches(selector, o)
            ]
            rv, start = self.rv, 0
        limit = int(params.get("limit", "0") or 0) or len(items) or 1
        page = items[start : start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if start + limit < len(items):
            snap = f"s{len(self._snapshots)}"
            self._snapshots[snap] = items
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps({"rv": rv, "start": start + limit, "id": snap}).encode()
            ).decode()
        kind, api_version = KINDS[resource]
        body = {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta, "items": page}
        await self._send(writer, 200, "OK", json.dumps(body).encode())
        return True

    async def _watch(
        self, resource: str, params: dict[str, str], writer: asyncio.StreamWriter
    ) -> None:
        writer._kube_watch = True  # type: ignore[attr-defined]
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        selector = params.get("labelSelector", "")
        bookmarks = params.get("allowWatchBookmarks") == "true"
        deadline = time.monotonic() + float(params.get("timeoutSeconds", "1800"))
        since = int(params.get("resourceVersion", "0") or 0)
        kind, api_version = KINDS[resource]
        if self.end_watches_at_once:
            await self._end(writer)
            return
        if since and since < self.compacted:
            await self._chunk(writer, {"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f"too old resource version: {since} ({self.compacted})",
                "reason": "Expired", "code": 410}})  # fmt: skip
            await self._end(writer)
            return
        if not since:  # "any": synthetic ADDED events of the current state first
            for _, obj in sorted(self.objects[resource].items()):
                if matches(selector, obj):
                    await self._chunk(writer, {"type": "ADDED", "object": obj})
            since = self.rv
        next_bookmark = time.monotonic() + self.bookmark_interval
        hung = False
        while not writer.transport.is_closing():
            changed = self._changed
            hung = hung or self.silent
            if hung:  # a hung stream: nothing at all, ever, not even its end
                deadline = max(deadline, time.monotonic() + 1.0)
            else:
                for rv, res, etype, obj in list(self.history):
                    if rv <= since or res != resource:
                        continue
                    since = rv
                    if matches(selector, obj):
                        await self._chunk(writer, {"type": etype, "object": obj})
                if bookmarks and time.monotonic() >= next_bookmark:
                    since = max(since, self.rv)
                    await self._chunk(writer, {"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": str(since)}}})  # fmt: skip
                    next_bookmark = time.monotonic() + self.bookmark_interval
            now = time.monotonic()
            if now >= deadline:
                await self._end(writer)
                return
            wait = min(deadline, next_bookmark if bookmarks else deadline) - now
            try:
                await asyncio.wait_for(changed.wait(), max(0.01, wait))
            except asyncio.TimeoutError:
                pass

    async def _chunk(self, writer: asyncio.StreamWriter, event: dict[str, Any]) -> None:
        line = json.dumps(event).encode() + b"\n"
        if writer in self._cut:
            half = line[: len(line) // 2]
            writer.write(f"{len(half):x}\r\n".encode() + half + b"\r\n")
            await writer.drain()
            raise ConnectionResetError("cut by the test")
        writer.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        await writer.drain()

    async def _end(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def matches(selector: str, obj: dict[str, Any]) -> bool:
    """Equality-based label selector: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def node(
    name: str,
    *addresses: tuple[str, str],
    ready: str = "True",
    labels: dict[str, str] | None = None,
    reason: str = "",
) -> dict[str, Any]:
    """A Node object as the API server shows it (the fields healthmesh reads, and a few more)."""
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {"podCIDR": "10.0.0.0/24"},
        "status": {
            "addresses": [{"type": t, "address": a} for t, a in addresses]
            + [{"type": "Hostname", "address": name}],
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasNoPressure"},
                {
                    "type": "Ready",
                    "status": ready,
                    "reason": reason or ("KubeletReady" if ready == "True" else "KubeletNotReady"),
                    "message": "kubelet is posting ready status"
                    if ready == "True"
                    else "container runtime network not ready",
                },
            ],
        },
    }


def cilium_node(name: str, ipv4: str = "", ipv6: str = "") -> dict[str, Any]:
    """A CiliumNode object with its health-endpoint addresses."""
    health: dict[str, str] = {}
    if ipv4:
        health["ipv4"] = ipv4
    if ipv6:
        health["ipv6"] = ipv6
    return {"metadata": {"name": name}, "spec": {"health": health, "addresses": []}}


def write_kubeconfig(path: str, server: str, *, token: str | None = None,
                     token_file: str | None = None, ca: str | None = None,
                     user: dict[str, Any] | None = None) -> str:  # fmt: skip
    """A kubeconfig with one context for ``server``; returns ``path``."""
    user = dict(user or {})
    if token:
        user["token"] = token
    if token_file:
        user["tokenFile"] = token_file
    cluster: dict[str, Any] = {"server": server}
    if ca:
        cluster["certificate-authority"] = ca
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "contexts": [{"name": "test", "context": {"cluster": "double", "user": "agent"}}],
        "clusters": [{"name": "double", "cluster": cluster}],
        "users": [{"name": "agent", "user": user}],
    }
    with open(path, "w") as fh:
        json.dump(doc, fh)  # JSON is YAML
    return path
