"""A small etcd v3 client over etcd's JSON gateway (``/v3/...``) with httpx: kv, lease, watch, auth.

Every unary call is bounded by the connection's timeout and tried on each endpoint in turn;
a watch is one streaming POST whose newline-separated JSON responses are read with a bound
on the size of each.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from healthmesh import lazy_import
from healthmesh.plugins.clustermesh.connection import Connection

#: httpx is loaded when this code first runs (most agents have no such source).
httpx = lazy_import("httpx")

#: gRPC status codes etcd answers with (through the gateway's ``code`` field).
INVALID_ARGUMENT, DEADLINE_EXCEEDED, PERMISSION_DENIED = 3, 4, 7
OUT_OF_RANGE, UNAVAILABLE, UNAUTHENTICATED = 11, 14, 16

#: Largest single watch response read (etcd's own request limit is 1.5 MiB; batches of
#: events can be larger, so allow plenty, but never unbounded).
MAX_WATCH_MESSAGE = 64 * 1024 * 1024
MAX_ERROR_BODY = 4096


class EtcdError(Exception):
    """etcd refused a request or could not be reached; the text is one line for the operator."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time."""


class EtcdAuthError(EtcdError):
    """Authentication failed or is required."""


class EtcdCompacted(EtcdError):
    """The revision asked for was compacted away; the caller must load afresh."""


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd returned it."""

    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class WatchEvent:
    """A put or delete of one key."""

    type: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def _key_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


def _kv(item: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=_key_text(_unb64(item.get("key"))),
        value=_unb64(item.get("value")),
        mod_revision=int(item.get("mod_revision", 0)),
        lease=int(item.get("lease", 0)),
    )


class EtcdClient:
    """etcd v3 through its JSON gateway; use ``async with`` to own the HTTP connections."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._current = 0
        self._token: str | None = None
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> EtcdClient:
        try:
            verify: Any = self.conn.ssl_context() or True
        except OSError as exc:  # ssl.SSLError included
            raise EtcdError(f"cannot load TLS files: {exc}") from None
        self._http = httpx.AsyncClient(
            verify=verify,
            timeout=httpx.Timeout(self.conn.timeout),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=4),
            trust_env=False,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._http is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                await self._http.aclose()
            self._http = None

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to first."""
        return self.conn.endpoints[self._current]

    # -- kv ---------------------------------------------------------------------------

    async def range_prefix(
        self, prefix: str, *, limit: int = 0, revision: int = 0, end: str | None = None
    ) -> tuple[list[KeyValue], int, bool]:
        """Every key under ``prefix`` (or from ``prefix`` up to ``end``, excluded): (key-values,
        store revision, whether more were left)."""
        raw = prefix.encode()
        range_end = end.encode() if end else prefix_end(raw)
        body: dict[str, Any] = {"key": _b64(raw), "range_end": _b64(range_end)}
        if limit:
            body["limit"] = str(limit)
        if revision:
            body["revision"] = str(revision)
        out = await self._call("/v3/kv/range", body)
        kvs = [_kv(item) for item in out.get("kvs", [])]
        return kvs, int(out["header"]["revision"]), bool(out.get("more", False))

    async def get(self, key: str) -> KeyValue | None:
        """One key, or None."""
        out = await self._call("/v3/kv/range", {"key": _b64(key)})
        items = out.get("kvs", [])
        return _kv(items[0]) if items else None

    async def count(self, prefix: str) -> int:
        """How many keys are under ``prefix`` (a cheap liveness check too)."""
        raw = prefix.encode()
        body = {"key": _b64(raw), "range_end": _b64(prefix_end(raw)), "count_only": True}
        out = await self._call("/v3/kv/range", body)
        return int(out.get("count", 0))

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write a key (attached to ``lease`` when non-zero); returns the new revision."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        out = await self._call("/v3/kv/put", body)
        return int(out["header"]["revision"])

    async def delete(self, key: str) -> int:
        """Delete one key; returns how many were deleted (0 or 1)."""
        out = await self._call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(out.get("deleted", 0))

    # -- leases -----------------------------------------------------------------------

    async def grant(self, ttl: float) -> int:
        """A new lease of ``ttl`` seconds (rounded up); returns its id."""
        out = await self._call("/v3/lease/grant", {"TTL": str(max(1, int(-(-ttl // 1))))})
        if out.get("error"):
            raise EtcdError(f"lease grant refused: {out['error']}")
        return int(out["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew a lease; returns its remaining TTL in seconds (0: the lease is gone)."""
        out = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        result = out.get("result", out)
        return int(result.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """End a lease now, deleting its keys (a missing lease is not an error)."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "lease not found" not in str(exc):
                raise

    # -- watch ------------------------------------------------------------------------

    @asynccontextmanager
    async def watch(
        self, prefix: str, start_revision: int, end: str | None = None
    ) -> AsyncIterator[AsyncIterator[tuple[int, list[WatchEvent]]]]:
        """Watch every key under ``prefix`` (or up to ``end``) from ``start_revision``.

        Yields an iterator of (revision, events) batches; progress notifications come as
        empty batches. Raises EtcdCompacted when the revision is gone, EtcdError when the
        stream ends or the server cancels the watch.
        """
        await self._ensure_token()
        raw = prefix.encode()
        body = {
            "create_request": {
                "key": _b64(raw),
                "range_end": _b64(end.encode() if end else prefix_end(raw)),
                "start_revision": str(start_revision),
            }
        }
        http = self._client()
        endpoint = self.endpoint
        timeout = httpx.Timeout(self.conn.timeout, read=None)
        request = http.build_request(
            "POST", endpoint + "/v3/watch", json=body, headers=self._headers(), timeout=timeout
        )
        try:
            with anyio.fail_after(self.conn.timeout):
                response = await http.send(request, stream=True)
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            self._rotate()
            raise EtcdUnavailable(f"{endpoint}: watch: {_describe(exc)}") from None
        try:
            if response.status_code != 200:
                data = await _read_bounded(response, MAX_ERROR_BODY)
                raise self._error(endpoint, "watch", response.status_code, data)
            yield self._watch_batches(endpoint, response)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                await response.aclose()

    async def _watch_batches(
        self, endpoint: str, response: httpx.Response
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        try:
            async for line in _lines(response, MAX_WATCH_MESSAGE):
                try:
                    message = json.loads(line)
                except ValueError:
                    raise EtcdError(f"{endpoint}: watch: unreadable response") from None
                if "error" in message:
                    err = message["error"]
                    raise self._error(
                        endpoint, "watch", err.get("http_code", 500), err, code=err.get("grpc_code")
                    )
                result = message.get("result", {})
                if int(result.get("compact_revision", 0) or 0):
                    raise EtcdCompacted(
                        f"{endpoint}: watch: revision compacted (now {result['compact_revision']})"
                    )
                if result.get("canceled"):
                    reason = result.get("cancel_reason") or "canceled by the server"
                    raise EtcdError(f"{endpoint}: watch: {reason}")
                revision = int(result.get("header", {}).get("revision", 0))
                events = [
                    WatchEvent(
                        type="delete" if ev.get("type") == "DELETE" else "put",
                        key=_key_text(_unb64(ev.get("kv", {}).get("key"))),
                        value=_unb64(ev.get("kv", {}).get("value")),
                        mod_revision=int(ev.get("kv", {}).get("mod_revision", 0)),
                    )
                    for ev in result.get("events", [])
                ]
                yield revision, events
        except (httpx.HTTPError, OSError) as exc:
            self._rotate()
            raise EtcdUnavailable(f"{endpoint}: watch: {_describe(exc)}") from None
        self._rotate()
        raise EtcdUnavailable(f"{endpoint}: watch stream closed by the server")

    # -- plumbing ---------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("EtcdClient used outside 'async with'")
        return self._http

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    def _rotate(self) -> None:
        self._current = (self._current + 1) % len(self.conn.endpoints)

    async def _ensure_token(self) -> None:
        if self.conn.username is None or self._token is not None:
            return
        try:
            password = self.conn.read_password()
        except OSError as exc:
            raise EtcdAuthError(f"cannot read password_file: {exc.strerror}") from None
        body = {"name": self.conn.username, "password": password or ""}
        out = await self._call("/v3/auth/authenticate", body, auth=False)
        token = out.get("token")
        if not token:
            raise EtcdAuthError("authentication returned no token (is auth enabled in etcd?)")
        self._token = token

    async def _call(self, path: str, body: dict[str, Any], *, auth: bool = True) -> dict[str, Any]:
        """POST one request, trying each endpoint once; re-authenticate once when told to."""
        if auth:
            await self._ensure_token()
        reauthenticated = False
        last: EtcdError | None = None
        attempts = len(self.conn.endpoints)
        i = 0
        while i < attempts:
            endpoint = self.endpoint
            try:
                with anyio.fail_after(self.conn.timeout):
                    response = await self._client().post(
                        endpoint + path, json=body, headers=self._headers() if auth else {}
                    )
                    data = _json_or_text(response)
            except (httpx.HTTPError, TimeoutError, OSError) as exc:
                last = EtcdUnavailable(f"{endpoint}: {_describe(exc)}")
                self._rotate()
                i += 1
                continue
            if response.status_code == 200 and isinstance(data, dict):
                return data
            err = self._error(endpoint, path.rsplit("/", 1)[-1], response.status_code, data)
            if (
                isinstance(err, EtcdAuthError)
                and auth
                and self.conn.username is not None
                and not reauthenticated
            ):
                # Simple tokens expire (5 minutes by default): log in again, once.
                reauthenticated = True
                self._token = None
                await self._ensure_token()
                continue
            if isinstance(err, EtcdUnavailable):
                last = err
                self._rotate()
                i += 1
                continue
            raise err
        assert last is not None
        raise last

    def _error(
        self, endpoint: str, what: str, status: int, data: Any, code: Any = None
    ) -> EtcdError:
        message = ""
        if isinstance(data, dict):
            message = str(data.get("message") or data.get("error") or "")
            code = code if code is not None else data.get("code")
        elif isinstance(data, bytes | str):
            message = (data.decode(errors="replace") if isinstance(data, bytes) else data)[:200]
        message = message.replace("etcdserver: ", "").strip() or f"HTTP {status}"
        text = f"{endpoint}: {what}: {message}"
        try:
            code = int(code) if code is not None else None
        except (TypeError, ValueError):
            code = None
        if code == UNAUTHENTICATED or "invalid auth token" in message:
            return EtcdAuthError(text)
        needs_login = "user name is empty" in message or "authentication" in message
        if code == INVALID_ARGUMENT and needs_login:
            hint = "" if self.conn.username else " (etcd has auth enabled: set username/password)"
            return EtcdAuthError(text + hint)
        if "CommonName of client" in message:
            return EtcdAuthError(
                text + " (with auth enabled, etcd's JSON gateway refuses client certificates"
                " that carry a CommonName: use one without CN, see docs/etcd.md)"
            )
        if code == OUT_OF_RANGE and "compacted" in message:
            return EtcdCompacted(text)
        if code in (UNAVAILABLE, DEADLINE_EXCEEDED) or status in (502, 503, 504):
            return EtcdUnavailable(text)
        if code == PERMISSION_DENIED:
            return EtcdError(text + " (check the etcd user's role)")
        return EtcdError(text)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "no answer in time"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc) or "cannot connect"
        return f"cannot connect ({text})" if "connect" not in text.lower() else text
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _json_or_text(response: httpx.Response) -> Any:
    if not response.content.strip():
        return {}
    try:
        return response.json()
    except ValueError:
        return response.text[:300]


async def _read_bounded(response: httpx.Response, limit: int) -> Any:
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        if len(buf) > limit:
            break
    try:
        return json.loads(bytes(buf[:limit]))
    except ValueError:
        return bytes(buf[:limit])


async def _lines(response: httpx.Response, limit: int) -> AsyncIterator[bytes]:
    """Newline-separated messages of a streaming body, each at most ``limit`` bytes."""
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(buf[:nl]).strip()
            del buf[: nl + 1]
            if line:
                yield line
        if len(buf) > limit:
            raise EtcdError(f"watch: a response is larger than {limit} bytes")
    if buf.strip():
        yield bytes(buf).strip()
