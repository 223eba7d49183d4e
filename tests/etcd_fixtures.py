"""A real etcd (Debian's etcd-server) for tests: free loopback ports, data in tmp_path.

``etcd`` skips on a laptop without etcd and fails under CI=true. The server can be paused
(SIGSTOP), resumed, killed and restarted on the same data dir, and given TLS or users.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agentproc import free_port
from tests.conftest import require_binary

ETCD_START_TIMEOUT = 20.0
#: Run by the test's interpreter inside a namespace: one gateway request from stdin's JSON.
_NETNS_CALL = (
    "import json, sys, httpx\n"
    "a = json.load(sys.stdin)\n"
    "r = httpx.post(a['url'], json=a['body'], headers=a['headers'], timeout=a['timeout'],"
    " trust_env=False)\n"
    "print(json.dumps({'status': r.status_code, 'data': r.json()}))\n"
)


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


class EtcdServer:
    """One etcd member on loopback; a small synchronous kv client for the test to write with."""

    def __init__(
        self,
        data_dir: Path,
        *,
        name: str = "etcd",
        tls: dict[str, str] | None = None,
        netns: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.binary = require_binary("etcd", "etcd-server")
        self.data_dir = data_dir
        self.name = name
        self.tls = tls
        #: Run inside this network namespace (a netlab's); the test then talks to it from there.
        self.netns = netns
        self.host = host
        self.client_port = 2379 if netns else free_port()
        self.peer_port = 2380 if netns else free_port()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://{host}:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.with_suffix(".log")
        self.token: str | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> EtcdServer:
        peer = f"http://{self.host}:{self.peer_port}"
        args = [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
        ]  # fmt: skip
        if self.tls:
            args += [
                "--cert-file", self.tls["cert"], "--key-file", self.tls["key"],
                "--trusted-ca-file", self.tls["ca"], "--client-cert-auth",
            ]  # fmt: skip
        log = open(self.log, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        if self.netns:  # ip netns exec execs etcd: the pid stays etcd's (for SIGSTOP)
            args = ["ip", "netns", "exec", self.netns, *args]
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=env)
        log.close()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = ETCD_START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"etcd exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                self.call("/v3/kv/range", {"key": _b64("probe")}, timeout=1.0)
                return
            except (httpx.HTTPError, AssertionError, ValueError, subprocess.SubprocessError):
                time.sleep(0.1)
        raise AssertionError(f"etcd not ready within {timeout}s:\n{self.log_text()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections hang instead of being refused."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- a tiny kv client for the tests -------------------------------------------------

    def _http(self, timeout: float) -> httpx.Client:
        if self.tls:
            import ssl

            ctx = ssl.create_default_context(cafile=self.tls["ca"])
            ctx.load_cert_chain(self.tls["client_cert"], self.tls["client_key"])
            return httpx.Client(verify=ctx, timeout=timeout, trust_env=False)
        return httpx.Client(timeout=timeout, trust_env=False)

    def call(self, path: str, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        headers = {"Authorization": self.token} if self.token else {}
        if self.netns:
            return self._call_in_netns(path, body, headers, timeout)
        with self._http(timeout) as http:
            resp = http.post(self.url + path, json=body, headers=headers)
        try:
            data = resp.json() if resp.content.strip() else {}
        except ValueError:
            raise AssertionError(f"{path}: HTTP {resp.status_code}: {resp.text[:300]}") from None
        assert resp.status_code == 200, data
        return data

    def _call_in_netns(
        self, path: str, body: dict[str, Any], headers: dict[str, str], timeout: float
    ) -> dict[str, Any]:
        request = {"url": self.url + path, "body": body, "headers": headers, "timeout": timeout}
        for _attempt in range(3):  # bounded: a spawn inside a namespace can fail transiently
            out = subprocess.run(
                ["ip", "netns", "exec", self.netns or "", sys.executable, "-c", _NETNS_CALL],
                input=json.dumps(request), capture_output=True, text=True, timeout=timeout + 15,
            )  # fmt: skip
            if out.returncode == 0:
                break
            time.sleep(0.2)
        assert out.returncode == 0, (out.returncode, out.stdout[-500:], out.stderr[-2000:])
        reply = json.loads(out.stdout)
        assert reply["status"] == 200, reply
        return reply["data"]

    def put(self, key: str, value: bytes | str | dict[str, Any], lease: int = 0) -> None:
        raw = json.dumps(value).encode() if isinstance(value, dict) else value
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(raw)}
        if lease:
            body["lease"] = str(lease)
        self.call("/v3/kv/put", body)

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Write many keys in few transactions (etcd allows 128 operations per transaction)."""
        for i in range(0, len(items), 100):
            ops = [
                {"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in items[i : i + 100]
            ]
            self.call("/v3/kv/txn", {"success": ops})

    def get(self, key: str) -> bytes | None:
        kvs = self.call("/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def keys(self, prefix: str) -> list[str]:
        body = {"key": _b64(prefix), "range_end": _end(prefix), "keys_only": True}
        kvs = self.call("/v3/kv/range", body).get("kvs", [])
        return [base64.b64decode(kv["key"]).decode() for kv in kvs]

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(key)})

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl against this server (for users and roles)."""
        ctl = require_binary("etcdctl", "etcd-client")
        cmd = [ctl, f"--endpoints={self.url}", *args]
        env = {**os.environ, "ETCDCTL_API": "3"}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout


def start_etcd(tmp_path: Path, name: str = "etcd", **kw: Any) -> EtcdServer:
    """Start one etcd with its data under ``tmp_path/name``."""
    data = tmp_path / f"{name}-data"
    return EtcdServer(data, name=name, **kw).start()


@pytest.fixture(name="etcd")
def etcd_fixture(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh etcd on free loopback ports, stopped afterwards."""
    server = start_etcd(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="etcd2")
def etcd2_fixture(tmp_path: Path) -> Iterator[EtcdServer]:
    """A second, independent etcd (another cluster's)."""
    server = start_etcd(tmp_path, name="etcd2")
    try:
        yield server
    finally:
        server.stop()


def make_tls(dir: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    openssl = require_binary("openssl", "openssl")
    dir.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        out = subprocess.run([openssl, *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr

    ca_key, ca = dir / "ca.key", dir / "ca.pem"
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    paths: dict[str, str] = {"ca": str(ca)}
    for role, ext in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        key, csr, cert = dir / f"{role}.key", dir / f"{role}.csr", dir / f"{role}.pem"
        extfile = dir / f"{role}.ext"
        extfile.write_text(ext + "\n")
        # No CommonName on the client certificate: with auth enabled, etcd's JSON gateway
        # refuses certificates that carry one (docs/etcd.md).
        subject = "/CN=server" if role == "server" else "/O=healthmesh-agent"
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
            "-keyout", str(key), "-out", str(csr))  # fmt: skip
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-extfile", str(extfile),
            "-out", str(cert))  # fmt: skip
        prefix = "" if role == "server" else "client_"
        paths[f"{prefix}cert"], paths[f"{prefix}key"] = str(cert), str(key)
    return paths
