"""Find the API server and credentials: in-cluster service account, $KUBECONFIG, ~/.kube/config.

Bearer tokens are read from a file when one is named (``tokenFile`` in a kubeconfig, the
projected service-account token in a pod) and re-read when the file changes, at most a minute
apart, and at once after a 401: the kubelet rotates projected tokens every hour or so.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import httpx
import yaml

from healthmesh import ConfigError

#: Where the kubelet mounts a pod's service-account token and the cluster CA.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_KUBECONFIG_BYTES = 1024 * 1024
MAX_TOKEN_BYTES = 64 * 1024
#: Re-read a token file at least this often even when its mtime did not change.
TOKEN_REREAD = 60.0


@dataclass
class ApiConfig:
    """Where the API server is and how to authenticate to it."""

    origin: str  # where the settings came from, for messages
    server: str
    verify: ssl.SSLContext | bool
    auth: httpx.Auth | None


class TokenAuth(httpx.Auth):
    """``Authorization: Bearer`` from a fixed token or a token file re-read as it rotates."""

    def __init__(self, token: str | None = None, token_file: str | None = None) -> None:
        self._token = token
        self._file = token_file
        self._stamp: tuple[int, int] | None = None
        self._read_at = 0.0
        if token_file:
            self._reload(force=True)

    def invalidate(self) -> None:
        """The server refused the token: read the file again before the next request."""
        self._read_at = 0.0
        self._stamp = None

    def _reload(self, force: bool = False) -> None:
        assert self._file is not None
        try:
            st = os.stat(self._file)
            stamp = (st.st_mtime_ns, st.st_size)
            fresh = time.monotonic() - self._read_at < TOKEN_REREAD
            if not force and stamp == self._stamp and fresh:
                return
            with open(self._file, "rb") as fh:
                raw = fh.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{self._file}: cannot read token file: {exc.strerror}") from None
        if len(raw) > MAX_TOKEN_BYTES:
            raise ConfigError(f"{self._file}: token file is larger than {MAX_TOKEN_BYTES} bytes")
        self._token = raw.decode("utf-8", "replace").strip()
        self._stamp, self._read_at = stamp, time.monotonic()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._file:
            self._reload()
        if self._token:
            request.headers["Authorization"] = f"Bearer {self._token}"
        response = yield request
        if response.status_code == 401:
            self.invalidate()


def load_api_config(kubeconfig: str | None, context: str | None, base: str) -> ApiConfig:
    """The API config from ``kubeconfig`` (relative to ``base``), else the default chain.

    Raises ConfigError naming the file and key.
    """
    if kubeconfig:
        path = FsPath(os.path.expanduser(kubeconfig))
        if not path.is_absolute():
            path = FsPath(base).resolve().parent / path
        return from_kubeconfig(str(path), context)
    sa = FsPath(SERVICE_ACCOUNT_DIR)
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (sa / "token").exists():
        return in_cluster(str(sa))
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), None)
    if first:
        return from_kubeconfig(first, context)
    home = FsPath.home() / ".kube" / "config"
    if home.exists():
        return from_kubeconfig(str(home), context)
    raise ConfigError(
        "no Kubernetes credentials: not in a pod (no KUBERNETES_SERVICE_HOST and service "
        f"account token in {SERVICE_ACCOUNT_DIR}), $KUBECONFIG unset and no ~/.kube/config; "
        "set kubeconfig"
    )


def in_cluster(sa_dir: str) -> ApiConfig:
    """The pod's service account: token file, CA, and the API server from the environment."""
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    ca = os.path.join(sa_dir, "ca.crt")
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{ca}: cannot load the cluster CA: {exc}") from None
    return ApiConfig(
        origin="in-cluster service account",
        server=f"https://{host}:{port}",
        verify=ctx,
        auth=TokenAuth(token_file=os.path.join(sa_dir, "token")),
    )


def from_kubeconfig(path: str, context: str | None) -> ApiConfig:
    """The cluster and user of ``context`` (default: current-context) of a kubeconfig file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_KUBECONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read kubeconfig: {exc.strerror}") from None
    if len(raw) > MAX_KUBECONFIG_BYTES:
        raise ConfigError(f"{path}: kubeconfig is larger than {MAX_KUBECONFIG_BYTES} bytes")
    try:
        doc = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a valid kubeconfig: {_yaml_reason(exc)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a valid kubeconfig: expected a mapping")
    base = FsPath(path).resolve().parent
    name = context or doc.get("current-context")
    if not name:
        raise ConfigError(
            f"{path}: current-context: not set; set context in [sources.kubernetes]"
        )
    ctx = _named(doc, "contexts", "context", str(name), path)
    cluster = _named(doc, "clusters", "cluster", str(ctx.get("cluster", "")), path)
    user = _named(doc, "users", "user", str(ctx.get("user", "")), path) if ctx.get("user") else {}
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise ConfigError(f"{path}: clusters[{ctx.get('cluster')}].server: not an http(s) URL")
    verify = _verify(cluster, user, base, path, server)
    auth: httpx.Auth | None = None
    if user.get("exec") or user.get("auth-provider"):
        raise ConfigError(
            f"{path}: users[{ctx.get('user')}]: exec and auth-provider credentials are not "
            "supported; use a token, tokenFile or client certificate"
        )
    if user.get("tokenFile"):
        auth = TokenAuth(token_file=str(_rel(user["tokenFile"], base)))
    elif user.get("token"):
        auth = TokenAuth(token=str(user["token"]))
    elif user.get("username"):
        auth = httpx.BasicAuth(str(user["username"]), str(user.get("password", "")))
    return ApiConfig(origin=path, server=server.rstrip("/"), verify=verify, auth=auth)


def _yaml_reason(exc: Exception) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"{exc.problem}{where}"
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _named(doc: dict[str, Any], key: str, inner: str, name: str, path: str) -> dict[str, Any]:
    for item in doc.get(key) or []:
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get(inner)
            if isinstance(value, dict):
                return value
            raise ConfigError(f"{path}: {key}[{name}].{inner}: expected a mapping")
    raise ConfigError(f"{path}: {key}: no entry named {name!r}")


def _rel(value: str, base: FsPath) -> FsPath:
    p = FsPath(os.path.expanduser(str(value)))
    return p if p.is_absolute() else base / p


def _verify(
    cluster: dict[str, Any], user: dict[str, Any], base: FsPath, path: str, server: str
) -> ssl.SSLContext | bool:
    if server.startswith("http://"):
        return False
    try:
        if cluster.get("insecure-skip-tls-verify"):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif cluster.get("certificate-authority-data"):
            pem = base64.b64decode(cluster["certificate-authority-data"]).decode()
            ctx = ssl.create_default_context(cadata=pem)
        elif cluster.get("certificate-authority"):
            ca = _rel(cluster["certificate-authority"], base)
            ctx = ssl.create_default_context(cafile=str(ca))
        else:
            ctx = ssl.create_default_context()
        _client_cert(ctx, user, base)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot set up TLS: {exc}") from None
    return ctx


def _client_cert(ctx: ssl.SSLContext, user: dict[str, Any], base: FsPath) -> None:
    if user.get("client-certificate"):
        key = user.get("client-key")
        cert = _rel(user["client-certificate"], base)
        ctx.load_cert_chain(cert, _rel(key, base) if key else None)
    elif user.get("client-certificate-data"):
        # ssl loads certificates only from files: a private temporary file, removed at once
        # (the context keeps what it loaded).
        with tempfile.TemporaryDirectory(prefix="healthmesh-kube-") as tmp:
            cert = os.path.join(tmp, "cert.pem")
            with open(os.open(cert, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as fh:
                fh.write(base64.b64decode(user["client-certificate-data"]))
                fh.write(b"\n" + base64.b64decode(user.get("client-key-data", "")))
            ctx.load_cert_chain(cert)
