"""A multi-host test bed: hosts as network namespaces on a bridge, each running a real agent.

``Lab(n)`` builds, all inside network namespaces it names ``hmlab-<id>-*``:

- a namespace holding only the bridge ``br0`` (the "switch"), with one veth port per host;
- ``n`` host namespaces ``h1..hn``, each with ``eth0`` on the bridge (10.231.0.i/24 and
  fdc7:4d2e:6a1b::i/64) and a real ``healthmesh run`` agent with its own config, log, NDJSON
  stream and API socket in ``/run/hmlab/<id>/h<i>/``;
- optionally per host a health-endpoint namespace behind a veth (``lxc_health`` on the host
  side, like Cilium's), 10.231.i.2/24 and fdc7:4d2e:6a1b:i::2/64, running
  ``healthmesh responder``; every host routes to every other host's endpoint subnet.

No address is ever configured outside these namespaces and no traffic leaves them. Faults are
iptables rules in per-host chains (``HMLAB-IN``/``-OUT``/``-FWD``), link state changes and
signals, and ``heal()`` reverts them all. Teardown kills every process inside the namespaces
and deletes them, even after a failure; agents die with the process that started them
(``PR_SET_PDEATHSIG``) unless the lab is persistent (``python -m tests.netlab up``); a lab
whose owner died is removed by the next ``Lab`` (``cleanup_leftovers``).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
PREFIX = "hmlab-"
STATE_ROOT = Path(os.environ.get("HEALTHMESH_NETLAB_DIR", "/run/hmlab"))
NET4 = "10.231"
NET6 = "fdc7:4d2e:6a1b"
PORT = 4240
MAX_HOSTS = 250
CHAINS = {"INPUT": "HMLAB-IN", "OUTPUT": "HMLAB-OUT", "FORWARD": "HMLAB-FWD"}
#: Bound on any single command the lab runs.
CMD_TIMEOUT = 20.0

Json = dict[str, Any]


class LabError(RuntimeError):
    """A lab operation failed; the message names the command and its error output."""


class Unsupported(LabError):
    """This kernel or machine cannot do what was asked (for example netem delay)."""


# --- commands ------------------------------------------------------------------------------


def sh(
    *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command with a bound on its time; raise LabError with its stderr on failure."""
    try:
        proc = subprocess.run(
            args, capture_output=True, text=True, input=stdin, timeout=CMD_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(args)}: no answer within {CMD_TIMEOUT:g}s") from None
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """None when this machine can build a lab; else why not (root, tools)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables", "ip6tables", "iptables-restore", "ip6tables-restore"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command (apt-get install iproute2 iptables)"
    return None


_NETEM: str | bool | None = False


def netem_unavailable() -> str | None:
    """None when ``tc qdisc ... netem`` works here; else the reason (this kernel lacks it)."""
    global _NETEM
    if _NETEM is False:
        ns = f"{PREFIX}netem-{uuid.uuid4().hex[:6]}"
        try:
            sh("ip", "netns", "add", ns)
            proc = sh(
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                "delay", "1ms", check=False,
            )
            _NETEM = None if proc.returncode == 0 else (
                f"the kernel has no sch_netem ({proc.stderr.strip() or 'tc failed'}), "
                "so delay and jitter cannot be injected"
            )
        except LabError as exc:
            _NETEM = str(exc)
        finally:
            sh("ip", "netns", "delete", ns, check=False)
    return _NETEM if isinstance(_NETEM, str) else None


_PLUGINS: set[str] | None = None


def loaded_plugins() -> set[str]:
    """Names of the plugins this checkout's ``healthmesh plugins --json`` lists as loaded."""
    global _PLUGINS
    if _PLUGINS is None:
        proc = subprocess.run(
            [sys.executable, "-m", "healthmesh", "plugins", "--json"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        try:
            listing = json.loads(proc.stdout)
        except ValueError:
            raise LabError(f"healthmesh plugins --json failed: {proc.stderr.strip()}") from None
        _PLUGINS = {p["name"] for p in listing if p.get("status") == "loaded"}
    return _PLUGINS


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Make the child die with its parent, so an interrupted test leaves no agent behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def parse_time(text: str | None) -> float | None:
    """RFC 3339 (as in snapshots) to seconds since the epoch."""
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- unix-socket API client ---------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def api_get(sock_path: Path, url: str, timeout: float = 3.0) -> Any:
    """``GET url`` on an agent's unix socket; the JSON body (LabError when none)."""
    conn = _UnixConnection(str(sock_path), timeout)
    try:
        conn.request("GET", url, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        raise LabError(f"GET {url} on {sock_path}: {exc}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise LabError(f"GET {url} on {sock_path}: HTTP {resp.status}")
    return json.loads(body)


# --- one agent process -------------------------------------------------------------------


class AgentProcess:
    """``healthmesh run -c CONFIG -o json`` inside a host namespace.

    Snapshots (NDJSON on stdout) are kept with the time they arrived; stderr goes to the
    host's ``agent.log``. A persistent agent writes its NDJSON to ``snapshots.ndjson``
    instead and outlives the process that started it.
    """

    def __init__(self, host: Host, *, persistent: bool = False) -> None:
        self.host = host
        self.persistent = persistent
        self.snapshots: deque[tuple[float, Json]] = deque(maxlen=2000)
        self.latest: Json | None = None
        self.changed = threading.Event()
        host.dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            host.socket.unlink()
        log = open(host.log, "ab")
        out: Any = subprocess.PIPE
        if persistent:
            out = open(host.dir / "snapshots.ndjson", "ab")
        try:
            self.proc = subprocess.Popen(
                [
                    "ip", "netns", "exec", host.ns,
                    sys.executable, "-m", "healthmesh", "run", "-c", str(host.config),
                    "-o", "json",
                ],
                stdout=out,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
                preexec_fn=None if persistent else _pdeathsig,
            )
        finally:
            log.close()
            if persistent:
                out.close()
        (host.dir / "agent.pid").write_text(str(self.proc.pid))
        if not persistent:
            threading.Thread(target=self._read, daemon=True, name=f"netlab-{host.name}").start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            self.snapshots.append((time.time(), doc))
            self.latest = doc
            self.changed.set()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 5.0) -> None:
        """Send ``sig`` and wait (bounded) for the process to end."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- hosts and the lab ---------------------------------------------------------------------


@dataclass
class Host:
    """One host of the lab: its namespace, addresses, endpoint and agent."""

    lab_id: str
    index: int
    root: Path
    endpoint: bool
    agent: AgentProcess | None = field(default=None, repr=False)
    responder: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"h{self.index}"

    @property
    def ns(self) -> str:
        return f"{PREFIX}{self.lab_id}-{self.name}"

    @property
    def ep_ns(self) -> str:
        return f"{PREFIX}{self.lab_id}-{self.name}e"

    @property
    def addr4(self) -> str:
        return f"{NET4}.0.{self.index}"

    @property
    def addr6(self) -> str:
        return f"{NET6}::{self.index:x}"

    @property
    def addresses(self) -> list[str]:
        return [self.addr4, self.addr6]

    @property
    def ep4(self) -> str:
        return f"{NET4}.{self.index}.2"

    @property
    def ep6(self) -> str:
        return f"{NET6}:{self.index:x}::2"

    @property
    def health_addresses(self) -> list[str]:
        return [self.ep4, self.ep6] if self.endpoint else []

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def config(self) -> Path:
        return self.dir / "healthmesh.toml"

    @property
    def log(self) -> Path:
        return self.dir / "agent.log"

    @property
    def socket(self) -> Path:
        return self.dir / "health.sock"

    def run(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        """Run a command inside this host's namespace; its stdout."""
        return sh("ip", "netns", "exec", self.ns, *args, check=check, stdin=stdin).stdout

    def node_entry(self) -> Json:
        """This host as a node in a peers file."""
        entry: Json = {"name": self.name, "addresses": self.addresses}
        if self.endpoint:
            entry["health_addresses"] = self.health_addresses
        return entry


class Lab:
    """N hosts on one bridge, each with an agent; use as a context manager.

    ``probing`` overrides keys of the agents' ``[probing]`` section (durations as strings);
    ``kinds`` are the probe kinds to run (default: icmp and http, as loaded).
    """

    def __init__(
        self,
        hosts: int = 4,
        *,
        endpoints: bool = True,
        probing: dict[str, Any] | None = None,
        kinds: Iterable[str] | None = None,
        api: bool | None = None,
        persistent: bool = False,
        lab_id: str | None = None,
    ) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts: must be between 1 and {MAX_HOSTS}")
        self.id = lab_id or uuid.uuid4().hex[:6]
        self.root = STATE_ROOT / self.id
        self.persistent = persistent
        self.probing: dict[str, Any] = {"interval": "1s", "timeout": "500ms", **(probing or {})}
        plugins = loaded_plugins()
        wanted = list(kinds) if kinds is not None else ["icmp", "http"]
        self.kinds = [k for k in wanted if k in plugins]
        if "http" not in plugins:
            raise LabError("the http plugin is not loaded; the lab needs its responder")
        self.api = ("api" in plugins) if api is None else api
        self.hosts = [Host(self.id, i, self.root, endpoints) for i in range(1, hosts + 1)]
        self.bridge_ns = f"{PREFIX}{self.id}-br"
        self.peers_file = self.root / "peers.json"
        self._built = False

    # -- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def start(self, ready_timeout: float = 30.0) -> None:
        """Build the network, start every responder and agent, wait until all are up."""
        reason = unavailable_reason()
        if reason:
            raise Unsupported(reason)
        cleanup_leftovers()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "lab.json").write_text(json.dumps(self.describe()))
        self._built = True
        self._build_network()
        self.write_peers(self.hosts)
        for host in self.hosts:
            self._write_config(host)
            if host.endpoint:
                self._start_responder(host)
        for host in self.hosts:
            host.agent = AgentProcess(host, persistent=self.persistent)
        self.wait_ready(ready_timeout)

    def describe(self) -> Json:
        """What ``lab.json`` records: owner, hosts, namespaces."""
        return {
            "id": self.id,
            "owner": None if self.persistent else os.getpid(),
            "persistent": self.persistent,
            "created": time.time(),
            "hosts": [
                {"name": h.name, "ns": h.ns, "endpoint_ns": h.ep_ns if h.endpoint else None,
                 "addresses": h.addresses, "health_addresses": h.health_addresses}
                for h in self.hosts
            ],
            "bridge_ns": self.bridge_ns,
            "api": self.api,
            "kinds": self.kinds,
        }

    def teardown(self) -> None:
        """Stop every process and delete every namespace and file of this lab."""
        # Signal every agent first and then wait: their shutdowns overlap, so a lab of n
        # hosts stops in the time of its slowest agent, not the sum of all of them.
        for host in self.hosts:
            if host.agent is not None and host.agent.alive:
                with contextlib.suppress(Exception):
                    host.agent.proc.send_signal(signal.SIGTERM)
        for host in self.hosts:
            if host.agent is not None:
                with contextlib.suppress(Exception):
                    host.agent.kill(signal.SIGTERM, timeout=3.0)
            if host.responder is not None:
                with contextlib.suppress(Exception):
                    _stop(host.responder)
        remove_lab(self.id)

    def _build_network(self) -> None:
        br = self.bridge_ns
        sh("ip", "netns", "add", br)
        batch = [
            "link set lo up",
            "link add br0 type bridge stp_state 0 mcast_snooping 0",
            "link set br0 up",
        ]
        for host in self.hosts:
            sh("ip", "netns", "add", host.ns)
            batch += [
                f"link add {host.name} type veth peer name eth0 netns {host.ns}",
                f"link set {host.name} master br0",
                f"link set {host.name} up",
            ]
        _batch(br, batch)
        for host in self.hosts:
            self._build_host(host)

    def _build_host(self, host: Host) -> None:
        _sysctl(host.ns, {
            "net.ipv4.ip_forward": "1",
            "net.ipv6.conf.all.forwarding": "1",
            "net.ipv6.conf.all.keep_addr_on_down": "1",
            "net.ipv6.conf.default.keep_addr_on_down": "1",
            "net.ipv6.conf.default.accept_dad": "0",
        })
        cmds = [
            "link set lo up",
            f"addr add {host.addr4}/24 dev eth0",
            f"addr add {host.addr6}/64 dev eth0 nodad",
            "link set eth0 up",
        ]
        cmds += self._routes(host)
        if host.endpoint:
            sh("ip", "netns", "add", host.ep_ns)
            _sysctl(host.ep_ns, {
                "net.ipv6.conf.all.keep_addr_on_down": "1",
                "net.ipv6.conf.default.keep_addr_on_down": "1",
                "net.ipv6.conf.default.accept_dad": "0",
            })
            cmds += [
                f"link add lxc_health type veth peer name eth0 netns {host.ep_ns}",
                f"addr add {NET4}.{host.index}.1/24 dev lxc_health",
                f"addr add {NET6}:{host.index:x}::1/64 dev lxc_health nodad",
                "link set lxc_health up",
            ]
        _batch(host.ns, cmds)
        # Interfaces made before the sysctls above keep the kernel's defaults: no duplicate
        # address detection on them either, or IPv6 lags IPv4 by a second after a link flap.
        no_dad = {"net.ipv6.conf.eth0.accept_dad": "0"}
        if host.endpoint:
            no_dad["net.ipv6.conf.lxc_health.accept_dad"] = "0"
            _sysctl(host.ep_ns, {"net.ipv6.conf.eth0.accept_dad": "0"})
        _sysctl(host.ns, no_dad)
        if host.endpoint:
            _batch(host.ep_ns, [
                "link set lo up",
                f"addr add {host.ep4}/24 dev eth0",
                f"addr add {host.ep6}/64 dev eth0 nodad",
                "link set eth0 up",
                f"route add default via {NET4}.{host.index}.1",
                f"route add ::/0 via {NET6}:{host.index:x}::1",
            ])
        self._reset_firewall(host)

    def _routes(self, host: Host) -> list[str]:
        """Routes to every other host's endpoint subnet (the kernel drops them on link down)."""
        cmds = []
        for other in self.hosts:
            if other is not host and other.endpoint:
                cmds += [
                    f"route replace {NET4}.{other.index}.0/24 via {other.addr4}",
                    f"route replace {NET6}:{other.index:x}::/64 via {other.addr6}",
                ]
        return cmds

    def _reset_firewall(self, host: Host) -> None:
        ruleset = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ruleset += "".join(f":{chain} - [0:0]\n" for chain in CHAINS.values())
        ruleset += "".join(f"-A {base} -j {chain}\n" for base, chain in CHAINS.items())
        ruleset += "COMMIT\n"
        for tool in ("iptables-restore", "ip6tables-restore"):
            host.run(tool, stdin=ruleset)

    def _write_config(self, host: Host) -> None:
        host.dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "# written by tests/netlab for one lab host",
            "[node]",
            f'name = "{host.name}"',
            f"addresses = {json.dumps(host.addresses)}",
            f"health_addresses = {json.dumps(host.health_addresses)}",
            "[probing]",
        ]
        for key, value in self.probing.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines += [
            "[responder]",
            f'listen = ["0.0.0.0:{PORT}", "[::]:{PORT}"]',
            "[sources.file]",
            f'path = "{self.peers_file}"',
            'poll = "250ms"',
        ]
        for kind in sorted({"icmp", "http"} & loaded_plugins()):
            if kind not in self.kinds:
                lines += [f"[probes.{kind}]", "enabled = false"]
        if self.api:
            lines += ["[outputs.api]", f'socket = "{host.socket}"']
        host.config.write_text("\n".join(lines) + "\n")

    def _start_responder(self, host: Host) -> None:
        log = open(host.dir / "responder.log", "ab")
        try:
            host.responder = subprocess.Popen(
                [
                    "ip", "netns", "exec", host.ep_ns, sys.executable, "-m", "healthmesh",
                    "responder", "-l", f"0.0.0.0:{PORT}", "-l", f"[::]:{PORT}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
                preexec_fn=None if self.persistent else _pdeathsig,
            )
        finally:
            log.close()

    # -- reading the agents ----------------------------------------------------------------

    def host(self, name: str | int) -> Host:
        """A host by name (``"h2"``) or index (2)."""
        index = int(str(name).lstrip("h"))
        return self.hosts[index - 1]

    def view(self, host: Host | str) -> Json | None:
        """The agent's current snapshot: fresh from its API, else its latest NDJSON round."""
        h = host if isinstance(host, Host) else self.host(host)
        if h.agent is None or not h.agent.alive:
            return None
        if self.api and h.socket.exists():
            try:
                return api_get(h.socket, "/v1/status")
            except (LabError, ValueError):
                pass
        return h.agent.latest

    def views(self, hosts: Iterable[Host] | None = None) -> dict[str, Json | None]:
        """``{host name: view}`` for ``hosts`` (default: every host)."""
        return {h.name: self.view(h) for h in (hosts or self.hosts)}

    def wait_until(
        self,
        predicate: Callable[[Json], bool],
        hosts: Iterable[Host] | None = None,
        timeout: float = 10.0,
        poll: float = 0.05,
    ) -> dict[str, float]:
        """Wait until ``predicate(view)`` holds for every host's view.

        Returns ``{host name: time it first held}``; LabError naming the hosts that
        never got there (with their last views) after ``timeout`` seconds.
        """
        targets = list(hosts or self.hosts)
        met: dict[str, float] = {}
        last: dict[str, Json | None] = {}
        deadline = time.monotonic() + timeout
        while True:
            for h in targets:
                if h.name in met:
                    continue
                v = last[h.name] = self.view(h)
                if v is not None and predicate(v):
                    met[h.name] = time.time()
            if len(met) == len(targets):
                return met
            if time.monotonic() >= deadline:
                missing = [h.name for h in targets if h.name not in met]
                summary = {n: summarize(last.get(n)) for n in missing}
                raise LabError(f"not reached within {timeout:g}s on {missing}: {summary}")
            time.sleep(poll)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every agent sees every node (and path) reachable."""
        deadline = time.monotonic() + timeout
        for h in self.hosts:
            while h.agent is not None and h.agent.alive and self.view(h) is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if h.agent is not None and not h.agent.alive:
                raise LabError(f"agent {h.name} exited at start:\n{tail(h.log)}")
        names = {h.name for h in self.hosts}
        self.wait_until(
            lambda v: all_reachable(v, names, self.kinds),
            timeout=max(1.0, deadline - time.monotonic()),
        )

    def transitions(self, host: Host | str, since: float = 0.0) -> list[Transition]:
        """State changes the agent logged (``path ... a -> b``) at or after ``since``."""
        h = host if isinstance(host, Host) else self.host(host)
        return [t for t in read_transitions(h.log) if t.time >= since]

    # -- membership ------------------------------------------------------------------------

    def write_peers(self, hosts: Iterable[Host]) -> None:
        """Replace the shared peers file (``sources.file``) with ``hosts``, atomically."""
        tmp = self.peers_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"nodes": [h.node_entry() for h in hosts]}, indent=1))
        os.replace(tmp, self.peers_file)

    # -- faults ------------------------------------------------------------------------------

    def _rule(self, host: Host, chain: str, rule: str, families: Iterable[int] = (4, 6)) -> None:
        for fam in families:
            tool = "iptables" if fam == 4 else "ip6tables"
            host.run(tool, "-A", CHAINS[chain], *rule.replace("{icmp}", _ICMP[fam]).split())

    def kill_agent(self, host: Host, sig: int = signal.SIGKILL) -> None:
        """Kill the host's agent (SIGKILL by default) while the host stays up."""
        if host.agent is not None:
            host.agent.kill(sig)

    def start_agent(self, host: Host) -> None:
        """Start the host's agent again (after ``kill_agent``)."""
        if host.agent is None or not host.agent.alive:
            host.agent = AgentProcess(host, persistent=self.persistent)

    def link_down(self, host: Host) -> None:
        """Take the host's only link (``eth0``) down."""
        host.run("ip", "link", "set", "eth0", "down")

    def link_up(self, host: Host) -> None:
        """Bring the host's link back, with the routes the kernel removed when it went down."""
        _batch(host.ns, ["link set eth0 up", *self._routes(host)])

    def endpoint_down(self, host: Host) -> None:
        """Take the host's health endpoint off the network (``lxc_health`` down)."""
        host.run("ip", "link", "set", "lxc_health", "down")

    def endpoint_up(self, host: Host) -> None:
        host.run("ip", "link", "set", "lxc_health", "up")

    def drop(self, src: Host, dst: Host, *, both: bool = False) -> None:
        """Drop every packet from ``src`` (and its endpoint) to ``dst`` (and its endpoint).

        The rules sit on ``src``'s way out (OUTPUT and FORWARD to eth0). With ``both``,
        the same from ``dst`` to ``src``.
        """
        for a, b in [(src, dst), (dst, src)] if both else [(src, dst)]:
            for fam, addrs in ((4, [b.addr4, *b.health_addresses[:1]]),
                               (6, [b.addr6, *b.health_addresses[1:]])):
                for addr in addrs:
                    self._rule(a, "OUTPUT", f"-o eth0 -d {addr} -j DROP", [fam])
                    self._rule(a, "FORWARD", f"-o eth0 -d {addr} -j DROP", [fam])

    def block_tcp(self, host: Host, port: int = PORT, *, endpoint: bool = False) -> None:
        """Drop TCP to ``port`` on the host (a firewall); also to its endpoint with ``endpoint``."""
        self._rule(host, "INPUT", f"-i eth0 -p tcp --dport {port} -j DROP")
        if endpoint:
            self._rule(host, "FORWARD", f"-i eth0 -p tcp --dport {port} -j DROP")

    def drop_icmp(self, host: Host, *, endpoint: bool = False) -> None:
        """Drop ICMP echo requests to the host (a cloud security group); NDP keeps working."""
        self._rule(host, "INPUT", "-i eth0 -p {icmp} -j DROP")
        if endpoint:
            self._rule(host, "FORWARD", "-i eth0 -p {icmp} -j DROP")

    def loss(self, host: Host, probability: float) -> None:
        """Drop each packet arriving at the host (or its endpoint) with ``probability``."""
        if not 0.0 < probability < 1.0:
            raise ValueError("probability: must be between 0 and 1")
        stat = f"-i eth0 -m statistic --mode random --probability {probability:.6f} -j DROP"
        self._rule(host, "INPUT", stat)
        self._rule(host, "FORWARD", stat)

    def delay(self, host: Host, ms: float, jitter_ms: float = 0.0) -> None:
        """Delay the host's outgoing packets with netem (Unsupported where the kernel lacks it)."""
        reason = netem_unavailable()
        if reason:
            raise Unsupported(reason)
        host.run("tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay",
                 f"{ms}ms", f"{jitter_ms}ms")

    def heal(self, timeout: float = 15.0) -> None:
        """Revert every fault: rules, links, endpoints, agents, peers file; wait until healthy."""
        for host in self.hosts:
            self._reset_firewall(host)
            host.run("tc", "qdisc", "del", "dev", "eth0", "root", check=False)
            self.link_up(host)
            if host.endpoint:
                self.endpoint_up(host)
                if host.responder is None or host.responder.poll() is not None:
                    self._start_responder(host)
            self.start_agent(host)
        self.write_peers(self.hosts)
        self.wait_ready(timeout)


_ICMP = {4: "icmp --icmp-type echo-request", 6: "ipv6-icmp --icmpv6-type echo-request"}


def _batch(ns: str, commands: list[str]) -> None:
    sh("ip", "-n", ns, "-batch", "-", stdin="\n".join(commands) + "\n")


def _sysctl(ns: str, values: dict[str, str]) -> None:
    sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items()))


def _stop(proc: subprocess.Popen[bytes], timeout: float = 3.0) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file ('' when missing)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- snapshot helpers ---------------------------------------------------------------------


def find_node(view: Json, name: str) -> Json | None:
    """The node called ``name`` in a snapshot, or None."""
    for n in view.get("nodes", []):
        if n["name"] == name:
            return n
    return None


def probe_entries(node: Json, role: str | None = None, kind: str | None = None) -> list[Json]:
    """Every per-kind probe entry of a node (``address``/``role``/``kind`` added)."""
    out = []
    for p in node["paths"]:
        if role is not None and p["role"] != role:
            continue
        for k, entry in p["probes"].items():
            if kind is None or k == kind:
                out.append({**entry, "address": p["address"], "role": p["role"], "kind": k})
    return out


def all_reachable(view: Json, names: Iterable[str], kinds: Iterable[str]) -> bool:
    """Every node in ``names`` is present and every path of it reachable by every kind."""
    wanted = set(kinds)
    for name in names:
        node = find_node(view, name)
        if node is None or node["state"] != "reachable":
            return False
        for p in node["paths"]:
            if not wanted <= set(p["probes"]):
                return False
            if any(e["state"] != "reachable" for e in p["probes"].values()):
                return False
    return True


def node_state(view: Json | None, name: str) -> str | None:
    """The state of node ``name`` in ``view`` (None when absent)."""
    if view is None:
        return None
    node = find_node(view, name)
    return None if node is None else node["state"]


def change_time(view: Json, name: str, state: str) -> float | None:
    """When the agent decided that node ``name`` became ``state``.

    Unreachable: the first of its paths' changes to unreachable; reachable: the last of its
    paths' changes to reachable (a node is reachable once every path is).
    """
    node = find_node(view, name)
    if node is None or node["state"] != state:
        return None
    times = [
        parse_time(e.get("last_change"))
        for e in probe_entries(node)
        if e["state"] == state and e.get("last_change")
    ]
    stamps = [t for t in times if t is not None]
    if not stamps:
        return None
    return min(stamps) if state == "unreachable" else max(stamps)


def entries_change(
    view: Json,
    name: str,
    state: str,
    *,
    role: str | None = None,
    kind: str | None = None,
) -> float | None:
    """When the selected probe entries of node ``name`` all reached ``state``.

    For ``unreachable`` the first change among them (one failing path already makes the node
    unreachable); for ``reachable`` the last one. None unless every selected entry is in
    ``state``.
    """
    node = find_node(view, name)
    if node is None:
        return None
    entries = probe_entries(node, role, kind)
    if not entries or any(e["state"] != state for e in entries):
        return None
    stamps = [parse_time(e.get("last_change")) for e in entries]
    known = [t for t in stamps if t is not None]
    if not known:
        return None
    return min(known) if state == "unreachable" else max(known)


def entries_state(
    view: Json | None, name: str, *, role: str | None = None, kind: str | None = None
) -> set[str]:
    """The set of states of the selected probe entries of node ``name`` (empty when absent)."""
    if view is None:
        return set()
    node = find_node(view, name)
    if node is None:
        return set()
    return {e["state"] for e in probe_entries(node, role, kind)}


def summarize(view: Json | None) -> Json | str:
    """A short text of every node's and path's state, for error messages."""
    if view is None:
        return "no view"
    out: Json = {}
    for n in view.get("nodes", []):
        out[n["name"]] = {
            f"{e['role']} {e['address']} {e['kind']}": e["state"]
            + (f" ({e['error']})" if e.get("error") else "")
            for e in probe_entries(n)
            if e["state"] != "reachable"
        } or n["state"]
    return out


# --- transition log -------------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    """One ``path NODE ROLE ADDRESS KIND: OLD -> NEW[: error]`` line of an agent's log."""

    time: float
    node: str
    role: str
    address: str
    kind: str
    old: str
    new: str
    error: str


def read_transitions(log: Path) -> list[Transition]:
    """Every state change an agent logged (times in local wall clock, as loguru wrote them)."""
    out: list[Transition] = []
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3 or not parts[2].startswith("path "):
            continue
        try:
            head, rest = parts[2][5:].split(": ", 1)
            node, role, address, kind = head.split(" ")
            states, _, error = rest.partition(": ")
            old, new = states.split(" -> ")
            when = datetime.fromisoformat(parts[0]).timestamp()
        except ValueError:
            continue
        out.append(Transition(when, node.split("/")[-1], role, address, kind, old, new, error))
    return out


# --- leftovers ------------------------------------------------------------------------------


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lab_namespaces() -> dict[str, list[str]]:
    """``{lab id: [namespace, ...]}`` of every ``hmlab-`` namespace on this machine."""
    out: dict[str, list[str]] = {}
    listing = sh("ip", "netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split(" ", 1)[0]
        if name.startswith(PREFIX):
            lab_id = name[len(PREFIX):].split("-", 1)[0]
            out.setdefault(lab_id, []).append(name)
    return out


def read_lab(lab_id: str) -> Json | None:
    """A lab's ``lab.json``, or None."""
    try:
        return json.loads((STATE_ROOT / lab_id / "lab.json").read_text())
    except (OSError, ValueError):
        return None


def remove_lab(lab_id: str) -> None:
    """Kill every process in a lab's namespaces, delete them and its state directory."""
    for ns in sorted(lab_namespaces().get(lab_id, [])):
        _delete_ns(ns)
    shutil.rmtree(STATE_ROOT / lab_id, ignore_errors=True)


def _delete_ns(ns: str) -> None:
    for _ in range(3):  # a process may fork while we kill; bounded retries
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.05)
    sh("ip", "netns", "delete", ns, check=False)


def cleanup_leftovers() -> list[str]:
    """Remove labs whose owner process is gone (not persistent ones); return their ids."""
    removed = []
    ids = set(lab_namespaces())
    if STATE_ROOT.is_dir():
        ids |= {p.name for p in STATE_ROOT.iterdir() if p.is_dir()}
    for lab_id in sorted(ids):
        info = read_lab(lab_id)
        if info is not None and (info.get("persistent") or _pid_alive(info.get("owner"))):
            continue
        if info is None and (STATE_ROOT / lab_id).is_dir():
            # Being created right now by another process, or half-written by a killed one:
            # only an old directory is a leftover.
            age = time.time() - (STATE_ROOT / lab_id).stat().st_mtime
            if age < 60:
                continue
        remove_lab(lab_id)
        removed.append(lab_id)
    return removed


@contextlib.contextmanager
def lab(hosts: int = 4, **kw: Any) -> Iterator[Lab]:
    """A started lab, torn down on exit (also on SIGTERM while it is open)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm_to_exit)
    try:
        with Lab(hosts, **kw) as the_lab:
            yield the_lab
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_to_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


__all__ = [
    "Host", "Lab", "LabError", "Transition", "Unsupported", "all_reachable", "api_get",
    "change_time", "cleanup_leftovers", "entries_change", "entries_state", "find_node", "lab",
    "loaded_plugins", "netem_unavailable", "node_state", "probe_entries", "read_transitions",
    "remove_lab", "summarize", "unavailable_reason",
]
