"""Peer source ``kubernetes``: the cluster's Node objects, with Cilium health addresses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from healthmesh import (
    ComponentSettings,
    ConfigError,
    Duration,
    Name,
    Node,
    PeerSource,
    SourceFeed,
    lazy_import,
)
from healthmesh.plugins.sources.kubernetes.api import CILIUM_NODES, NODES, Api, Limits
from healthmesh.plugins.sources.kubernetes.nodes import (
    NodeFacts,
    Skip,
    health_addresses,
    node_facts,
    to_node,
)
from healthmesh.plugins.sources.kubernetes.reflector import Reflector

#: httpx is loaded when this code first runs (most agents have no such source).
httpx = lazy_import("httpx")

ADDRESS_TYPES = ("InternalIP", "ExternalIP")


@dataclass(frozen=True)
class Built:
    """One Node object as last read: its version, facts, health addresses, and the node."""

    version: str
    facts: NodeFacts | None
    health: tuple[str, ...]
    node: Node | None  # None: skipped, not ready (with skip_not_ready), or this agent


class KubernetesSettings(ComponentSettings, kw_only=True):
    """``[sources.kubernetes]``: where the API server is and which nodes to take."""

    #: A kubeconfig file (relative to the config file). Unset: the pod's service account,
    #: then the first file of $KUBECONFIG, then ~/.kube/config.
    kubeconfig: str | None = None
    #: The kubeconfig context (default: its current-context).
    context: str | None = None
    #: Only nodes matching this selector (Kubernetes syntax, e.g. "role=worker").
    label_selector: str = ""
    #: Node address types probed, in order of preference; IPv4 and IPv6 both.
    address_types: list[str] = msgspec.field(default_factory=lambda: ["InternalIP"])
    #: Cluster name of the nodes (shown as cluster/node); default: [node] cluster.
    cluster: Name | None = None
    #: Leave out nodes whose Ready condition is not True (default: probe and show them).
    skip_not_ready: bool = False
    #: Health-endpoint addresses from Cilium's CiliumNode objects, where the CRD exists.
    cilium: bool = True
    #: Bound on connecting and on each list request.
    timeout: Duration = Duration(10.0)
    #: How long one watch request lasts (the server ends it; silence beyond it + timeout is
    #: an error).
    watch_timeout: Duration = Duration(300.0)
    #: Longest pause between attempts after errors (backoff starts at 0.5 s and doubles).
    retry_max: Duration = Duration(30.0)
    #: Objects per list page, the most objects kept, and byte bounds on responses.
    page_size: int = 500
    max_nodes: int = 20000
    max_response_bytes: int = 64 * 1024 * 1024
    max_event_bytes: int = 4 * 1024 * 1024


def check_settings(s: KubernetesSettings) -> None:
    """What ``config check`` can know without contacting the API server."""
    if not s.address_types:
        raise ValueError("address_types: list at least one (InternalIP, ExternalIP)")
    for i, kind in enumerate(s.address_types):
        if kind not in ADDRESS_TYPES:
            known = ", ".join(ADDRESS_TYPES)
            raise ValueError(f"address_types[{i}]: {kind!r} is not one of {known}")
    if len(set(s.address_types)) != len(s.address_types):
        raise ValueError("address_types: duplicate type")
    if not 0.1 <= s.timeout <= 300:
        raise ValueError("timeout: must be between 100ms and 5m")
    if not 1 <= s.watch_timeout <= 3600:
        raise ValueError("watch_timeout: must be between 1s and 1h")
    if not 0.5 <= s.retry_max <= 600:
        raise ValueError("retry_max: must be between 500ms and 10m")
    if not 1 <= s.page_size <= 10000:
        raise ValueError("page_size: must be between 1 and 10000")
    if not 1 <= s.max_nodes <= 1_000_000:
        raise ValueError("max_nodes: must be between 1 and 1000000")
    if not 64 * 1024 <= s.max_response_bytes <= 1024**3:
        raise ValueError("max_response_bytes: must be between 64 KiB and 1 GiB")
    if not 4096 <= s.max_event_bytes <= s.max_response_bytes:
        raise ValueError("max_event_bytes: must be between 4 KiB and max_response_bytes")
    if len(s.label_selector) > 4096:
        raise ValueError("label_selector: longer than 4096 characters")


class KubernetesSource(PeerSource):
    """Lists and watches Node objects (and CiliumNode objects, when Cilium is installed).

    While the API server cannot be reached the last node set is kept, probing goes on and the
    source is shown stale.
    """

    name = "kubernetes"
    Settings = KubernetesSettings

    @classmethod
    def validate_settings(cls, settings: KubernetesSettings, config: Any) -> None:
        check_settings(settings)
        if settings.kubeconfig:  # a named file must be readable now; the default chain is
            from healthmesh.plugins.sources.kubernetes.kubeconfig import load_api_config

            load_api_config(settings.kubeconfig, settings.context, config.path)  # run-time

    def __init__(self, settings: KubernetesSettings, context: Any) -> None:
        super().__init__(settings, context)
        local = context.local_node
        self.cluster = str(settings.cluster or local.cluster)
        self.exclude = local.id
        self.feed: SourceFeed | None = None
        self.nodes_reflector: Reflector | None = None
        self.cilium_reflector: Reflector | None = None
        #: name -> what was made of the Node object of that name (see _publish).
        self._built: dict[str, Built] = {}
        self._published: set[str] = set()
        self._health: dict[str, tuple[str, ...]] = {}
        self._skipped: set[str] = set()
        self._problem: dict[str, str] = {}

    async def run(self, feed: SourceFeed, *, task_status: TaskStatus[None]) -> None:
        self.feed = feed
        s = self.settings
        try:
            from healthmesh.plugins.sources.kubernetes.kubeconfig import load_api_config

            conf = load_api_config(s.kubeconfig, s.context, self.context.config.path)
        except ConfigError as exc:
            feed.mark_stale(f"kubernetes: {exc}")
            logger.error("sources.kubernetes: {}", exc)
            task_status.started()
            await anyio.sleep_forever()
        logger.info("sources.kubernetes: API server {} ({})", conf.server, conf.origin)
        limits = Limits(
            timeout=float(s.timeout),
            watch_timeout=float(s.watch_timeout),
            page_size=s.page_size,
            max_response_bytes=s.max_response_bytes,
            max_line_bytes=s.max_event_bytes,
            max_objects=s.max_nodes,
        )
        client = httpx.AsyncClient(
            base_url=conf.server,
            verify=conf.verify,
            auth=conf.auth,
            timeout=httpx.Timeout(float(s.timeout)),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
            trust_env=False,
        )
        api = Api(client, limits)
        self.nodes_reflector = Reflector(
            "sources.kubernetes",
            api,
            NODES,
            label_selector=s.label_selector,
            retry_max=float(s.retry_max),
            changed=self._publish,
            healthy=lambda reason: self._mark("nodes", reason),
        )
        if s.cilium:
            self.cilium_reflector = Reflector(
                "sources.kubernetes",
                api,
                CILIUM_NODES,
                label_selector="",
                retry_max=float(s.retry_max),
                changed=self._cilium_changed,
                healthy=lambda reason: self._mark("ciliumnodes", reason),
                absent_ok=True,
            )
        async with client, anyio.create_task_group() as tg:
            # Both at once, and started when both have listed or failed once (each attempt
            # is bounded by ``timeout``), so the first node set has its health addresses.
            waits = []
            for reflector in (self.cilium_reflector, self.nodes_reflector):
                if reflector is not None:
                    ready = anyio.Event()
                    waits.append(ready)
                    tg.start_soon(reflector.run, ready.set)
            for ready in waits:
                await ready.wait()
            task_status.started()

    def _cilium_changed(self) -> None:
        assert self.cilium_reflector is not None
        self._health = {
            name: health_addresses(obj) for name, obj in self.cilium_reflector.objects.items()
        }
        if self.nodes_reflector is not None and self.nodes_reflector.lists:
            self._publish()

    def _publish(self) -> None:
        """Hand the mesh the current node set, when what it shows changed.

        Kubelets update their Node objects often in ways that do not matter here; an object
        whose resourceVersion and health addresses are unchanged is not read again, and one
        that changed but says the same (same facts) does not count as a change.
        """
        assert self.nodes_reflector is not None and self.feed is not None
        built: dict[str, Built] = {}
        changed = False
        for name, obj in self.nodes_reflector.objects.items():
            version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            health = self._health.get(name, ())
            old = self._built.get(name)
            same_object = old is not None and bool(version) and old.version == version
            if same_object and old is not None and old.health == health:
                built[name] = old
                continue
            facts = old.facts if same_object and old is not None else self._facts_of(name, obj)
            node: Node | None = None
            if facts is not None and not (self.settings.skip_not_ready and facts.ready != "True"):
                node = to_node(facts, self.cluster, health)
                if node.id == self.exclude:
                    node = None
            if old is None or old.facts != facts or old.health != health or old.node != node:
                changed = True
            built[name] = Built(version, facts, health, node)
        gone = (n for n, b in self._built.items() if b.node is not None and n not in built)
        changed = changed or any(gone)
        self._built = built
        if not changed:
            return
        nodes = [b.node for b in built.values() if b.node is not None]
        ids = {n.id for n in nodes}
        _log_changes(self._published, ids)
        self._published = ids
        self.feed.replace(nodes)

    def _facts_of(self, name: str, obj: dict[str, Any]) -> NodeFacts | None:
        try:
            facts = node_facts(obj, self.settings.address_types)
        except Skip as exc:
            if name not in self._skipped:
                logger.warning("sources.kubernetes: skipping {}", exc)
                self._skipped.add(name)
            return None
        self._skipped.discard(name)
        return facts

    def _mark(self, what: str, reason: str | None) -> None:
        if self.feed is None:
            return
        before = dict(self._problem)
        if reason is None:
            self._problem.pop(what, None)
        else:
            self._problem[what] = reason
        if self._problem == before:
            return
        if self._problem:
            self.feed.mark_stale("kubernetes: " + "; ".join(self._problem.values()))
        else:
            self.feed.mark_fresh()


def _log_changes(before: set[str], after: set[str]) -> None:
    joined, left = sorted(after - before), sorted(before - after)
    if len(joined) + len(left) > 20:
        logger.info("sources.kubernetes: {} nodes joined, {} left", len(joined), len(left))
        return
    for node_id in joined:
        logger.info("sources.kubernetes: node {} joined", node_id)
    for node_id in left:
        logger.info("sources.kubernetes: node {} left", node_id)
