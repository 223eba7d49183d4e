"""Peer source ``kubernetes`` against the API server double (tests/kube_double.py).

Every test runs the real source (httpx over a real socket, HTTP or HTTPS) feeding the real
membership; the double speaks the list/watch wire format and breaks it on demand.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from loguru import logger

from healthmesh import Node
from healthmesh.core.config import convert
from healthmesh.core.membership import Membership
from healthmesh.plugins.sources.kubernetes import kubeconfig as kubeconfig_module
from healthmesh.plugins.sources.kubernetes.source import KubernetesSettings, KubernetesSource
from tests.agentproc import free_port
from tests.etcd_fixtures import make_tls
from tests.kube_double import CILIUM, NODES, KubeDouble, cilium_node, node, write_kubeconfig

pytestmark = pytest.mark.anyio

LOCAL = Node(name="self", addresses=("127.0.0.1",))


@pytest.fixture
def double() -> Iterator[KubeDouble]:
    with KubeDouble() as d:
        yield d


@contextmanager
def log_lines(level: str = "INFO") -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(
        lambda m: lines.append(str(m).rstrip()), level=level, format="{level} {message}"
    )
    try:
        yield lines
    finally:
        logger.remove(sink)


@asynccontextmanager
async def running(
    tmp_path: Path, kubeconfig: str | None, **settings: Any
) -> AsyncIterator[tuple[KubernetesSource, Membership]]:
    """The source started (first list done) and feeding a membership; cancelled at the end."""
    raw = {"timeout": "2s", "retry_max": "500ms", **settings}
    if kubeconfig:
        raw["kubeconfig"] = kubeconfig
    conf = convert(raw, KubernetesSettings, "sources.kubernetes")
    ctx = SimpleNamespace(config=SimpleNamespace(path=str(tmp_path / "h.toml")), local_node=LOCAL)
    membership = Membership(local=LOCAL)
    src = KubernetesSource(conf, ctx)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(src.run, membership.feed("kubernetes"))
        yield src, membership
        tg.cancel_scope.cancel()


def kubeconfig_for(tmp_path: Path, d: KubeDouble, **kw: Any) -> str:
    return write_kubeconfig(str(tmp_path / "kubeconfig"), d.url, token=d.token, **kw)


def mesh(m: Membership) -> dict[str, Node]:
    return {n.id: n for n in m.nodes() if n.id != LOCAL.id}


async def until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``cond`` until true; the seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    try:
        with anyio.fail_after(timeout):
            while not cond():
                await anyio.sleep(0.005)
    except TimeoutError:
        pytest.fail(f"not within {timeout}s: {what}")
    return time.monotonic() - start


async def test_added_modified_deleted_and_not_ready_nodes_reach_the_mesh_within_a_second(
    tmp_path: Path, double: KubeDouble
) -> None:
    double.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
    async with running(tmp_path, kubeconfig_for(tmp_path, double)) as (_src, m):
        assert set(mesh(m)) == {"default/n1"}
        assert mesh(m)["default/n1"].addresses == ("127.0.0.2",)
        assert mesh(m)["default/n1"].info == {"ready": "True"}

        double.put(NODES, node("n2", ("InternalIP", "127.0.0.3"), ("InternalIP", "::1")))
        await until(lambda: "default/n2" in mesh(m), 1.0, "added node")
        assert mesh(m)["default/n2"].addresses == ("127.0.0.3", "::1")  # IPv4 and IPv6

        double.put(NODES, node("n1", ("InternalIP", "127.0.0.4")))
        await until(lambda: mesh(m)["default/n1"].addresses == ("127.0.0.4",), 1.0, "modified")

        double.put(NODES, node("n2", ("InternalIP", "127.0.0.3"), ready="False"))
        await until(lambda: mesh(m)["default/n2"].info.get("ready") == "False", 1.0, "NotReady")
        info = mesh(m)["default/n2"].info
        assert info["condition"] == "KubeletNotReady: container runtime network not ready"

        double.delete(NODES, "n1")
        await until(lambda: "default/n1" not in mesh(m), 1.0, "deleted node")
        assert set(mesh(m)) == {"default/n2"}
        assert double.list_count(NODES) == 1  # all of it by watch, no relist
        assert m.status["kubernetes"].stale is False


async def test_settings_choose_addresses_cluster_labels_and_readiness(
    tmp_path: Path, double: KubeDouble
) -> None:
    double.put(NODES, node("a", ("InternalIP", "127.0.0.2"), ("ExternalIP", "127.0.0.12"),
                           labels={"role": "worker"}))  # fmt: skip
    double.put(NODES, node("b", ("ExternalIP", "127.0.0.13"), labels={"role": "worker"},
                           ready="Unknown", reason="NodeStatusUnknown"))  # fmt: skip
    double.put(NODES, node("c", ("InternalIP", "127.0.0.4"), labels={"role": "control"}))
    double.put(NODES, node("self", ("InternalIP", "127.0.0.1")))  # this agent's own node
    kc = kubeconfig_for(tmp_path, double)
    async with running(
        tmp_path, kc, address_types=["ExternalIP", "InternalIP"], label_selector="role=worker",
        cluster="prod",
    ) as (_src, m):  # fmt: skip
        nodes = mesh(m)
        assert set(nodes) == {"prod/a", "prod/b"}
        assert nodes["prod/a"].addresses == ("127.0.0.12", "127.0.0.2")  # preference order
        assert nodes["prod/b"].info == {"ready": "Unknown", "condition": "NodeStatusUnknown: "
                                        "container runtime network not ready"}  # fmt: skip
    async with running(tmp_path, kc, skip_not_ready=True) as (_src, m):
        assert set(mesh(m)) == {"default/a", "default/c"}  # b not ready; self left out
        double.put(NODES, node("c", ("InternalIP", "127.0.0.4"), ready="False"))
        await until(lambda: "default/c" not in mesh(m), 1.0, "NotReady node left out")


async def test_a_relist_after_410_neither_loses_nor_duplicates_nodes(
    tmp_path: Path, double: KubeDouble
) -> None:
    double.put_many(NODES, [node(f"n{i}", ("InternalIP", f"127.0.1.{i}")) for i in range(1, 6)])
    replaced: list[list[str]] = []
    async with running(tmp_path, kubeconfig_for(tmp_path, double)) as (src, m):
        feed = m.feed("kubernetes")
        real = src.feed
        assert real is not None
        # Every node set handed to the mesh is recorded, to check for duplicates.
        src.feed = SimpleNamespace(
            replace=lambda nodes: (replaced.append([n.id for n in nodes]), feed.replace(nodes)),
            mark_stale=feed.mark_stale,
            mark_fresh=feed.mark_fresh,
        )
        double.silent = True  # the agent's watch sees none of what follows
        await anyio.sleep(0.3)
        double.delete(NODES, "n2")
        double.put(NODES, node("n3", ("InternalIP", "127.0.1.33")))
        double.put(NODES, node("n6", ("InternalIP", "127.0.1.6")))
        double.compact()  # ... and the history it would resume from is gone
        double.silent = False
        double.drop_watches()
        with log_lines() as lines:
            await until(lambda: double.list_count(NODES) == 2, 5.0, "relist after 410")
            await until(lambda: "default/n6" in mesh(m), 1.0, "state after the relist")
        assert any("too old resource version" in ln and "listing again" in ln for ln in lines)
        assert set(mesh(m)) == {f"default/n{i}" for i in (1, 3, 4, 5, 6)}
        assert mesh(m)["default/n3"].addresses == ("127.0.1.33",)
        # The first list may come from the server's cache (resourceVersion=0), the relist
        # after a 410 must not.
        lists = [p for r, v, p in double.requests if r == NODES and v == "list"]
        assert [p.get("resourceVersion") for p in lists] == ["0", None]
        assert replaced and all(len(ids) == len(set(ids)) for ids in replaced)


async def test_a_stream_cut_mid_line_resumes_from_the_last_version_without_a_relist(
    tmp_path: Path, double: KubeDouble
) -> None:
    double.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
    async with running(tmp_path, kubeconfig_for(tmp_path, double)) as (_src, m):
        watches = double.watch_count(NODES)
        double.cut_watches()  # the next line (a bookmark or an event) is cut in half
        await until(lambda: double.watch_count(NODES) > watches, 5.0, "watch again")
        for i in range(2, 6):
            double.put(NODES, node(f"n{i}", ("InternalIP", f"127.0.0.{i + 1}")))
        double.delete(NODES, "n1")
        want = {f"default/n{i}" for i in range(2, 6)}
        await until(lambda: set(mesh(m)) == want, 2.0, "changes after the cut")
        assert double.list_count(NODES) == 1
        watches = double.watch_count(NODES)
        double.cut_watches()
        await until(lambda: double.watch_count(NODES) > watches, 5.0, "watch again")
        resumed = [p for r, v, p in double.requests if r == NODES and v == "watch"][-1]
        assert resumed["resourceVersion"] == str(double.rv)  # the last event's version
        assert resumed["allowWatchBookmarks"] == "true"


async def test_server_restart_resumes_and_a_restart_that_lost_history_relists(
    tmp_path: Path, double: KubeDouble
) -> None:
    double.put_many(NODES, [node(f"n{i}", ("InternalIP", f"127.0.2.{i}")) for i in range(1, 4)])
    async with running(tmp_path, kubeconfig_for(tmp_path, double)) as (_src, m):
        double.restart()
        double.put(NODES, node("n4", ("InternalIP", "127.0.2.4")))
        await until(lambda: "default/n4" in mesh(m), 5.0, "node added after a restart")
        assert double.list_count(NODES) == 1  # resumed from the bookmark's version

        double.restart(forget_history=True)
        double.delete(NODES, "n1")
        await until(lambda: "default/n1" not in mesh(m), 5.0, "deletion across a lost history")
        assert double.list_count(NODES) == 2
        assert set(mesh(m)) == {"default/n2", "default/n3", "default/n4"}
        await until(lambda: not m.status["kubernetes"].stale, 2.0, "fresh again")


async def test_a_silent_watch_is_given_up_after_its_bound_and_resumed(
    tmp_path: Path, double: KubeDouble
) -> None:
    double.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
    kc = kubeconfig_for(tmp_path, double)
    async with running(tmp_path, kc, watch_timeout="1s", timeout="500ms") as (_src, m):
        double.silent = True
        await anyio.sleep(0.3)
        double.put(NODES, node("n2", ("InternalIP", "127.0.0.3")))
        watches = double.watch_count(NODES)
        await anyio.sleep(0.5)
        assert "default/n2" not in mesh(m)  # the hung stream delivers nothing
        double.silent = False
        # The read bound is watch_timeout + timeout = 1.5 s; then the watch resumes.
        await until(lambda: "default/n2" in mesh(m), 5.0, "change after the hung watch")
        assert double.watch_count(NODES) > watches
        assert double.list_count(NODES) == 1


async def test_a_thousand_nodes_are_listed_in_one_go(tmp_path: Path, double: KubeDouble) -> None:
    double.put_many(
        NODES,
        [
            node(f"node-{i:04d}", ("InternalIP", f"127.1.{i // 250}.{i % 250 + 1}"))
            for i in range(1000)
        ],
    )
    start = time.monotonic()
    async with running(tmp_path, kubeconfig_for(tmp_path, double)) as (_src, m):
        took = time.monotonic() - start
        nodes = mesh(m)
        assert len(nodes) == 1000
        assert len({a for n in nodes.values() for a in n.addresses}) == 1000
        pages = [p for r, v, p in double.requests if r == NODES and v == "list"]
        assert len(pages) == 2 and pages[0]["limit"] == "500"  # paged: bounded responses
        assert took < 5.0, took
        double.put(NODES, node("node-1000", ("InternalIP", "127.1.4.1")))
        await until(lambda: len(mesh(m)) == 1001, 1.0, "one more node among a thousand")


async def test_cilium_health_addresses_are_taken_and_follow_changes(
    tmp_path: Path, double: KubeDouble
) -> None:
    double.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
    double.put(NODES, node("n2", ("InternalIP", "127.0.0.3")))
    double.put(CILIUM, cilium_node("n1", ipv4="127.0.0.12", ipv6="::1"))
    async with running(tmp_path, kubeconfig_for(tmp_path, double)) as (_src, m):
        assert mesh(m)["default/n1"].health_addresses == ("127.0.0.12", "::1")
        assert mesh(m)["default/n2"].health_addresses == ()
        double.put(CILIUM, cilium_node("n2", ipv4="127.0.0.13"))
        await until(lambda: mesh(m)["default/n2"].health_addresses == ("127.0.0.13",), 1.0,
                    "health address of n2")  # fmt: skip
        double.delete(CILIUM, "n1")
        await until(lambda: mesh(m)["default/n1"].health_addresses == (), 1.0, "n1 health gone")


async def test_without_the_ciliumnode_crd_nodes_come_without_health_addresses(
    tmp_path: Path,
) -> None:
    with KubeDouble(cilium_crd=False) as d, log_lines() as lines:
        d.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
        async with running(tmp_path, kubeconfig_for(tmp_path, d)) as (_src, m):
            assert mesh(m)["default/n1"].health_addresses == ()
            assert m.status["kubernetes"].stale is False
            d.put(NODES, node("n2", ("InternalIP", "127.0.0.3")))
            await until(lambda: "default/n2" in mesh(m), 1.0, "nodes still watched")
    assert not [ln for ln in lines if ln.startswith(("WARNING", "ERROR"))], lines
    assert sum("ciliumnodes not served" in ln for ln in lines) == 1


async def test_403_gives_one_line_naming_the_rbac_verbs_and_resource(
    tmp_path: Path, double: KubeDouble
) -> None:
    double.forbidden = {NODES}
    with log_lines() as lines:
        async with running(tmp_path, kubeconfig_for(tmp_path, double)) as (_src, m):
            await until(lambda: double.list_count(NODES) >= 3, 5.0, "retries with backoff")
            assert m.status["kubernetes"].stale
            double.forbidden = set()
            await until(lambda: not m.status["kubernetes"].stale, 5.0, "granted")
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    assert len(errors) == 1, lines
    assert "list nodes: 403 Forbidden: RBAC does not allow 'list' on nodes" in errors[0]
    assert "grant get, list, watch" in errors[0]


async def test_a_rotated_token_file_is_read_again_after_a_401(
    tmp_path: Path, double: KubeDouble
) -> None:
    token = tmp_path / "token"
    token.write_text("test-token\n")
    kc = write_kubeconfig(str(tmp_path / "kc"), double.url, token_file=str(token))
    double.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
    with log_lines() as lines:
        async with running(tmp_path, kc) as (_src, m):
            double.token = "rotated"  # the server now only takes the new token
            double.cut_watches()
            await until(lambda: m.status["kubernetes"].stale, 5.0, "401 noticed")
            token.write_text("rotated\n")
            os.utime(token, (time.time() + 5, time.time() + 5))
            double.put(NODES, node("n2", ("InternalIP", "127.0.0.3")))
            await until(lambda: "default/n2" in mesh(m), 5.0, "back with the new token")
            # Both watches (nodes, ciliumnodes) recover; the source is fresh once both have.
            await until(lambda: not m.status["kubernetes"].stale, 5.0, "fresh again")
    # One line per refused watch, naming its resource, however often it was retried.
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    assert any("watch nodes: 401 Unauthorized" in e for e in errors), lines
    resources = [e.split("watch ", 1)[1].split(":", 1)[0] for e in errors]
    assert len(resources) == len(set(resources)) and set(resources) <= {"nodes", "ciliumnodes"}


async def test_https_with_the_cluster_ca_and_a_bearer_token(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    with KubeDouble(tls=tls) as d:
        d.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
        kc = kubeconfig_for(tmp_path, d, ca=tls["ca"])
        async with running(tmp_path, kc) as (_src, m):
            assert set(mesh(m)) == {"default/n1"}
            d.put(NODES, node("n2", ("InternalIP", "127.0.0.3")))
            await until(lambda: "default/n2" in mesh(m), 1.0, "watch over TLS")
        # Without the CA the server is not trusted: stale, with the reason, nothing listed.
        bad = write_kubeconfig(str(tmp_path / "bad"), d.url, token=d.token)
        async with running(tmp_path, bad) as (_src, m):
            assert mesh(m) == {}
            st = m.status["kubernetes"]
            assert st.stale and "CERTIFICATE_VERIFY_FAILED" in (st.reason or ""), st.reason


async def test_in_cluster_service_account_token_is_reread_as_it_rotates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = make_tls(tmp_path / "pki")
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(Path(tls["ca"]).read_bytes())
    (sa / "token").write_text("test-token")
    with KubeDouble(tls=tls) as d:
        d.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
        monkeypatch.setattr(kubeconfig_module, "SERVICE_ACCOUNT_DIR", str(sa))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(d.port))
        async with running(tmp_path, None) as (_src, m):
            assert set(mesh(m)) == {"default/n1"}
            # The kubelet rotates the projected token; the old one stops working at once.
            (sa / "token").write_text("second-token")
            os.utime(sa / "token", (time.time() + 5, time.time() + 5))
            d.token = "second-token"
            d.cut_watches()
            d.put(NODES, node("n2", ("InternalIP", "127.0.0.3")))
            await until(lambda: "default/n2" in mesh(m), 5.0, "watch with the rotated token")
            assert d.list_count(NODES) == 1


async def test_node_updates_that_change_nothing_shown_do_not_churn_the_mesh(
    tmp_path: Path, double: KubeDouble
) -> None:
    double.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
    async with running(tmp_path, kubeconfig_for(tmp_path, double)) as (src, m):
        updated = m.status["kubernetes"].updated_at
        # kubelet status updates: new resourceVersion, an unrelated label; nothing healthmesh shows.
        for i in range(5):
            double.put(NODES, node("n1", ("InternalIP", "127.0.0.2"), labels={"beat": str(i)}))
        double.put(NODES, node("n2", ("InternalIP", "127.0.0.3")))  # then a real change
        await until(lambda: "default/n2" in mesh(m), 1.0, "real change")
        assert m.status["kubernetes"].updated_at != updated
        updated = m.status["kubernetes"].updated_at
        double.put(NODES, node("n1", ("InternalIP", "127.0.0.2"), labels={"beat": "x"}))
        rv = double.rv
        reflector = src.nodes_reflector
        assert reflector is not None
        await until(lambda: reflector.resource_version == str(rv), 2.0, "event seen")
        assert m.status["kubernetes"].updated_at == updated


async def test_https_with_a_client_certificate_from_kubeconfig_data(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    data = {
        "client-certificate-data": base64.b64encode(Path(tls["client_cert"]).read_bytes()),
        "client-key-data": base64.b64encode(Path(tls["client_key"]).read_bytes()),
    }
    user = {k: v.decode() for k, v in data.items()}
    with KubeDouble(tls=tls, token=None, require_client_cert=True) as d:
        d.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
        kc = write_kubeconfig(str(tmp_path / "kc"), d.url, ca=tls["ca"], user=user)
        async with running(tmp_path, kc) as (_src, m):
            assert set(mesh(m)) == {"default/n1"}
        # The same server refuses a client without the certificate.
        bare = write_kubeconfig(str(tmp_path / "bare"), d.url, ca=tls["ca"])
        async with running(tmp_path, bare) as (_src, m):
            assert mesh(m) == {} and m.status["kubernetes"].stale


async def test_an_event_larger_than_its_bound_is_refused_not_buffered(
    tmp_path: Path, double: KubeDouble
) -> None:
    double.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
    kc = kubeconfig_for(tmp_path, double)
    with log_lines() as lines:
        async with running(tmp_path, kc, max_event_bytes=8192) as (_src, m):
            big = node("n2", ("InternalIP", "127.0.0.3"))
            big["metadata"]["annotations"] = {"huge": "x" * 20000}
            double.put(NODES, big)
            await until(lambda: m.status["kubernetes"].stale, 5.0, "stale on the big event")
            assert "default/n2" not in mesh(m) and "default/n1" in mesh(m)
    assert any("an event is longer than 8192 bytes" in ln for ln in lines), lines


async def test_watches_that_end_at_once_do_not_make_the_source_spin(
    tmp_path: Path, double: KubeDouble
) -> None:
    double.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
    double.end_watches_at_once = True
    async with running(tmp_path, kubeconfig_for(tmp_path, double), retry_max="1s") as (_s, m):
        before = double.watch_count(NODES)
        await anyio.sleep(2.0)
        # Backoff 0.5 s, 1 s, 1 s...: a handful, not thousands.
        assert double.watch_count(NODES) - before <= 6
        assert set(mesh(m)) == {"default/n1"} and not m.status["kubernetes"].stale
        double.end_watches_at_once = False
        double.put(NODES, node("n2", ("InternalIP", "127.0.0.3")))
        await until(lambda: "default/n2" in mesh(m), 3.0, "watching again")


async def test_max_nodes_bounds_what_the_watch_adds_too(
    tmp_path: Path, double: KubeDouble
) -> None:
    double.put_many(NODES, [node(f"n{i}", ("InternalIP", f"127.0.0.{i + 1}")) for i in (1, 2)])
    with log_lines() as lines:
        async with running(tmp_path, kubeconfig_for(tmp_path, double), max_nodes=3) as (_s, m):
            double.put(NODES, node("n3", ("InternalIP", "127.0.0.4")))
            double.put(NODES, node("n4", ("InternalIP", "127.0.0.5")))
            await until(lambda: any("skipping nodes n4" in ln for ln in lines), 2.0, "warning")
            assert set(mesh(m)) == {"default/n1", "default/n2", "default/n3"}
            double.delete(NODES, "n1")  # room again: the next change is taken
            double.put(NODES, node("n5", ("InternalIP", "127.0.0.6")))
            await until(lambda: "default/n5" in mesh(m), 1.0, "n5 after n1 left")


async def test_an_api_server_down_at_start_is_stale_then_followed_once_it_is_up(
    tmp_path: Path,
) -> None:
    port = free_port()
    kc = write_kubeconfig(str(tmp_path / "kc"), f"http://127.0.0.1:{port}", token="test-token")
    start = time.monotonic()
    async with running(tmp_path, kc, retry_max="1s") as (_src, m):
        assert time.monotonic() - start < 3.0  # started after one failed attempt, not hung
        assert mesh(m) == {} and m.status["kubernetes"].stale
        assert "kubernetes:" in (m.status["kubernetes"].reason or "")
        with KubeDouble(port=port) as d:
            d.put(NODES, node("n1", ("InternalIP", "127.0.0.2")))
            await until(lambda: "default/n1" in mesh(m), 5.0, "listed once the server is up")
            await until(lambda: not m.status["kubernetes"].stale, 2.0, "fresh")
