"""A client of the local API over its unix socket, with errors worded for the operator."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from typing import Any

import httpx

from healthmesh.plugins.api.settings import default_socket


class AgentUnreachable(Exception):
    """No agent answered on the socket: one line naming the socket and what to do."""


class AgentRefused(Exception):
    """The agent answered with an error status (a bad query): the status and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def socket_from_uri(uri: str | None) -> str:
    """The socket path of ``unix:///path`` (or a bare path); ValueError for other schemes."""
    if uri is None or uri == "":
        return default_socket()
    if uri.startswith("unix://"):
        path = uri[len("unix://") :]
    elif uri.startswith("unix:"):
        path = uri[len("unix:") :]
    elif "://" in uri:
        raise ValueError(f"{uri!r}: only unix:///path URIs are supported")
    else:
        path = uri
    if not path.startswith("/"):
        raise ValueError(f"{uri!r}: the socket path must be absolute, e.g. unix:///run/x.sock")
    return path


class AgentClient:
    """Talks to one agent's API; every failure to get an answer is ``AgentUnreachable``."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def get(self, url: str) -> Any:
        """``GET url`` → the decoded JSON body."""
        return self._call("GET", url, self.timeout)

    def call(self, method: str, url: str, timeout: float) -> Any:
        """Any method, with its own timeout (a probe round takes longer than a GET)."""
        return self._call(method, url, timeout)

    def _call(self, method: str, url: str, timeout: float) -> Any:
        self._check_path()
        transport = httpx.HTTPTransport(uds=self.path)
        try:
            with httpx.Client(transport=transport, base_url="http://localhost",
                              timeout=timeout) as client:
                resp = client.request(method, url, headers={"accept": "application/json"})
        except httpx.TimeoutException:
            raise AgentUnreachable(
                f"the agent on {self.path} did not answer {method} {url} within {timeout:g}s"
            ) from None
        except httpx.TransportError as exc:
            raise AgentUnreachable(self._transport_message(exc)) from None
        if resp.status_code != 200:
            raise AgentUnreachable(
                f"the agent on {self.path} answered {method} {url} with "
                f"{resp.status_code}: {_error_text(resp)}"
            )
        try:
            return resp.json()
        except ValueError:
            raise AgentUnreachable(
                f"the agent on {self.path} answered {method} {url} with something not JSON"
            ) from None

    def stream_lines(self, url: str, read_timeout: float) -> Iterator[bytes]:
        """``GET url`` as a stream of lines (NDJSON); ``AgentUnreachable`` when it breaks."""
        self._check_path()
        transport = httpx.HTTPTransport(uds=self.path)
        timeout = httpx.Timeout(self.timeout, read=read_timeout)
        try:
            with httpx.Client(transport=transport, base_url="http://localhost",
                              timeout=timeout) as client, \
                    client.stream("GET", url, headers={"accept": "application/x-ndjson"}) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise AgentRefused(resp.status_code, _error_text(resp))
                for line in resp.iter_lines():
                    yield line.encode()
        except httpx.TimeoutException:
            raise AgentUnreachable(
                f"the agent on {self.path} sent nothing on {url} for {read_timeout:g}s"
            ) from None
        except httpx.TransportError as exc:
            raise AgentUnreachable(self._transport_message(exc)) from None

    def _check_path(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise AgentUnreachable(
                f"no agent is serving on {self.path} (no such socket); start one with "
                "`healthmesh run -c CONFIG`, or point -H / HEALTHMESH_SOCK at its socket"
            ) from None
        except PermissionError:
            raise AgentUnreachable(self._denied()) from None
        if not stat.S_ISSOCK(st.st_mode):
            raise AgentUnreachable(f"{self.path} is not a socket; is -H right?")

    def _denied(self) -> str:
        return (
            f"permission denied on {self.path}: run as root or as a member of the "
            "socket's group ([outputs.api] group)"
        )

    def _transport_message(self, exc: httpx.TransportError) -> str:
        code = _errno(exc)
        if code == errno.ENOENT:
            return (f"no agent is serving on {self.path} (no such socket); start one with "
                    "`healthmesh run -c CONFIG`")
        if code == errno.ECONNREFUSED:
            return (f"no agent is listening on {self.path} (a stale socket); start one with "
                    "`healthmesh run -c CONFIG`")
        if code in (errno.EACCES, errno.EPERM):
            return self._denied()
        return f"cannot talk to the agent on {self.path}: {exc or type(exc).__name__}"


def _errno(exc: BaseException) -> int | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur.errno
        cur = cur.__cause__ or cur.__context__
    text = str(exc)
    for code, word in ((errno.ECONNREFUSED, "Connection refused"),
                       (errno.EACCES, "Permission denied"),
                       (errno.ENOENT, "No such file")):
        if word in text:
            return code
    return None


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:200] or resp.reason_phrase
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body)[:200]
    return str(body)[:200]
