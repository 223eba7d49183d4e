"""The tcp, http and https check kinds against real servers on loopback (TLS made by openssl)."""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from healthmesh.plugins.checks.http import cert_days_left, cert_not_after
from tests.checks_support import build_check
from tests.conftest import require_binary

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate it signed (20 days, for 127.0.0.1 and localhost), a stranger."""
    openssl = require_binary("openssl", "openssl")
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "30", "-subj", "/CN=healthmesh test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
        "-subj", "/CN=localhost")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "srv.pem", "-days", "20", "-extfile", "ext")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out",
        "other.pem", "-days", "5", "-subj", "/CN=stranger")
    return {name: d / name for name in ("ca.pem", "srv.pem", "srv.key", "other.pem")}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = {"/down": 503, "/moved": 302}.get(self.path, 200)
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_HEAD(self) -> None:
        self.send_response(204 if self.path == "/head" else 405)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return


def serve(context: ssl.SSLContext | None = None) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def https_port(tls: dict[str, Path]) -> Iterator[int]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls["srv.pem"], tls["srv.key"])
    yield from serve(ctx)


@pytest.fixture
def http_port() -> Iterator[int]:
    yield from serve()


async def check(section: str, target: str, timeout: float = 2.0) -> Any:
    obj = build_check(section)
    async with obj:
        with anyio.fail_after(timeout + 5):
            return await obj.check(target, timeout)


def https(targets: str, extra: str = "") -> str:
    return f'[checks.web]\nkind = "https"\ntargets = [{targets}]\ntimeout = "2s"\n{extra}'


async def test_https_with_ca_file_reports_tls_time_and_certificate_days(
    tls: dict[str, Path], https_port: int
) -> None:
    url = f"https://127.0.0.1:{https_port}/"
    result = await check(https(f'"{url}"', f'ca_file = "{tls["ca.pem"]}"'), url)
    assert result.ok, result.error
    assert result.details["status"] == 200
    assert result.details["tls_ms"] > 0 and result.details["connect_ms"] > 0
    assert 19.9 < result.details["cert_expiry_days"] <= 20.0
    assert result.rtt * 1000 >= result.details["tls_ms"]
    by_name = f"https://localhost:{https_port}/"
    assert (await check(https(f'"{by_name}"', f'ca_file = "{tls["ca.pem"]}"'), by_name)).ok


async def test_https_untrusted_insecure_and_certificate_too_young(
    tls: dict[str, Path], https_port: int
) -> None:
    url = f"https://127.0.0.1:{https_port}/"
    untrusted = await check(https(f'"{url}"'), url)  # the system CAs do not know our CA
    assert not untrusted.ok
    assert untrusted.error.startswith("TLS: certificate verify failed"), untrusted.error
    insecure = await check(https(f'"{url}"', "insecure = true"), url)
    assert insecure.ok and 19.9 < insecure.details["cert_expiry_days"] <= 20.0
    young = await check(https(f'"{url}"', f'ca_file = "{tls["ca.pem"]}"\nmin_cert_days = 30'),
                        url)
    assert not young.ok
    assert young.error.startswith("certificate expires in 20.0 days (min_cert_days = 30)")
    wrong_ca = await check(https(f'"{url}"', f'ca_file = "{tls["other.pem"]}"'), url)
    assert not wrong_ca.ok and "certificate verify failed" in wrong_ca.error


async def test_http_status_expectations_and_head(http_port: int) -> None:
    base = f"http://127.0.0.1:{http_port}"
    section = f'[checks.web]\nkind = "http"\ntargets = ["{base}/"]\n'
    ok = await check(section, f"{base}/")
    assert ok.ok and ok.details["status"] == 200 and "tls_ms" not in ok.details
    down = await check(section, f"{base}/down")
    assert not down.ok and down.error == "status 503, expected 2xx or 3xx"
    assert down.details["status"] == 503
    assert (await check(section, f"{base}/moved")).ok  # 3xx counts as up; not followed
    wanted = await check(section + "expect_status = [503]\n", f"{base}/down")
    assert wanted.ok
    head = await check(section + 'method = "HEAD"\nexpect_status = [204]\n', f"{base}/head")
    assert head.ok and head.details["status"] == 204


async def test_http_against_servers_that_are_not_http(http_port: int) -> None:
    # An https URL to a plain HTTP server: the TLS handshake fails.
    url = f"https://127.0.0.1:{http_port}/"
    result = await check(https(f'"{url}"', "insecure = true"), url)
    assert not result.ok and result.error.startswith("TLS: "), result.error
    # A TCP server that answers garbage and closes.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        port = srv.getsockname()[1]

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"\x00\x01 not http\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        target = f"http://127.0.0.1:{port}/"
        result = await check(f'[checks.web]\nkind = "http"\ntargets = ["{target}"]\n', target)
        thread.join(5)
    assert not result.ok and result.error.startswith("request: bad or no HTTP answer")


async def test_tcp_connect_time_refused_and_timeout() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        section = f'[checks.api]\nkind = "tcp"\ntargets = ["127.0.0.1:{port}"]\n'
        ok = await check(section, f"127.0.0.1:{port}")
        assert ok.ok and 0 < ok.rtt < 1.0
        assert (await check(section, f"localhost:{port}")).ok
    refused = await check(section, f"127.0.0.1:{port}")
    assert not refused.ok and refused.error == "connection refused"
    # A listener whose accept queue is full drops new SYNs: the connect hangs, then times out.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                fillers.append(s)
            await anyio.sleep(0.1)
            result = await check(section, f"127.0.0.1:{port}", timeout=0.3)
        finally:
            for s in fillers:
                s.close()
    assert not result.ok and result.error == "timeout: not connected within 300ms"


def test_certificate_expiry_is_read_from_der(tls: dict[str, Path]) -> None:
    der = ssl.PEM_cert_to_DER_cert(tls["srv.pem"].read_text())
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(tls["srv.pem"])],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    want = ssl.cert_time_to_seconds(out.strip().removeprefix("notAfter="))
    assert cert_not_after(der).timestamp() == want
    assert cert_days_left(der, now=want - 86400 * 2) == pytest.approx(2.0)


async def test_an_unreadable_ca_file_makes_the_check_unavailable(tmp_path: Path) -> None:
    from healthmesh import CheckUnavailable

    missing = tmp_path / "nope.pem"
    obj = build_check(https('"https://127.0.0.1:1/"', f'ca_file = "{missing}"'))
    with pytest.raises(CheckUnavailable, match=f"ca_file {missing}: "):
        async with obj:
            pass
