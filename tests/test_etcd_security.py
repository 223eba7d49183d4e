"""etcd with TLS client certificates and username/password: the source logs in, or says why not."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.etcd_fixtures import EtcdServer, make_tls, start_etcd
from tests.test_etcd_source import RecordingFeed, registration, source, wait_until

pytestmark = pytest.mark.anyio


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def enable_auth(server: EtcdServer) -> None:
    """root (for etcd) and user "agent" with read-write on healthmesh/ only."""
    server.call("/v3/auth/user/add", {"name": "root", "password": "rootpw"})
    server.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
    server.call("/v3/auth/role/add", {"name": "healthmesh"})
    perm = {"permType": "READWRITE", "key": b64("healthmesh/"), "range_end": b64("healthmesh0")}
    server.call("/v3/auth/role/grant", {"name": "healthmesh", "perm": perm})
    server.call("/v3/auth/user/add", {"name": "agent", "password": "s3cret"})
    server.call("/v3/auth/user/grant", {"user": "agent", "role": "healthmesh"})
    server.call("/v3/auth/enable", {})
    server.token = server.call(
        "/v3/auth/authenticate", {"name": "root", "password": "rootpw"}
    )["token"]


@pytest.fixture
def secure_etcd(tmp_path: Path) -> Iterator[tuple[EtcdServer, dict[str, str]]]:
    tls = make_tls(tmp_path / "pki")
    server = start_etcd(tmp_path, tls=tls)
    try:
        enable_auth(server)
        yield server, tls
    finally:
        server.stop()


async def run_briefly(server: EtcdServer, tmp_path: Path, **settings: Any) -> RecordingFeed:
    feed = RecordingFeed()
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(15):
            await tg.start(source(server, tmp_path, **settings).run, feed)
        tg.cancel_scope.cancel()
    return feed


async def test_client_certificate_and_password_file_log_in(
    secure_etcd: tuple[EtcdServer, dict[str, str]], tmp_path: Path
) -> None:
    server, tls = secure_etcd
    server.put("healthmesh/nodes/v1/c1/n2", registration("n2"))
    (tmp_path / "pw").write_text("s3cret\n")
    feed = RecordingFeed()
    src = source(
        server, tmp_path, username="agent", password_file="pw",
        tls={"ca": tls["ca"], "cert": tls["client_cert"], "key": tls["client_key"]},
    )  # fmt: skip
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(15):
            await tg.start(src.run, feed)
        assert feed.stale is None and set(feed.nodes) == {"c1/n2"}
        assert server.get("healthmesh/alive/v1/c1/n1") is not None
        server.put("healthmesh/nodes/v1/c1/n3", registration("n3", addr="127.0.0.3"))
        await wait_until(lambda: "c1/n3" in feed.nodes)  # the watch is authenticated too
        tg.cancel_scope.cancel()


async def test_wrong_password_and_missing_certificate_show_the_source_stale_with_the_reason(
    secure_etcd: tuple[EtcdServer, dict[str, str]], tmp_path: Path
) -> None:
    server, tls = secure_etcd
    client_tls = {"ca": tls["ca"], "cert": tls["client_cert"], "key": tls["client_key"]}
    feed = await run_briefly(server, tmp_path, username="agent", password="wrong", tls=client_tls)
    assert feed.stale is not None and "authentication failed" in feed.stale, feed.stale
    feed = await run_briefly(server, tmp_path, tls=client_tls)
    assert feed.stale is not None and "auth" in feed.stale, feed.stale
    feed = await run_briefly(server, tmp_path, username="agent", password="s3cret",
                             tls={"ca": tls["ca"]})  # fmt: skip
    assert feed.stale is not None and server.url in feed.stale, feed.stale
    assert "\n" not in feed.stale
