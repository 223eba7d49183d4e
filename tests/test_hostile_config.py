"""Hostile configs: every broken config file or value is one line and exit 2, and no setting
can push the scheduler into an unbounded backlog."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_binary, run_cli

VALID = """
[node]
name = "n1"
addresses = ["127.0.0.1"]

[probing]
interval = "2s"
timeout = "500ms"

[sources.static]
nodes = [{name = "n2", addresses = ["127.0.0.2"]}]
"""

COMMANDS = [("config", "check", "-c"), ("run", "--once", "-c"), ("run", "-c")]


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert exit 2 and exactly one stderr line ``healthmesh: error: ...`` holding ``needles``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("healthmesh: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- config files that are not regular, readable files -------------------------------------


def _symlink_loop(tmp: Path) -> Path:
    a, b = tmp / "a.toml", tmp / "b.toml"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def _under_a_file(tmp: Path) -> Path:
    base = tmp / "base.toml"
    base.write_text(VALID)
    return base / "x"


def _fifo(tmp: Path) -> Path:
    path = tmp / "fifo.toml"
    os.mkfifo(path)
    return path


def _directory(tmp: Path) -> Path:
    path = tmp / "dir.toml"
    path.mkdir()
    return path


def _too_big(tmp: Path) -> Path:
    path = tmp / "big.toml"
    with open(path, "w") as fh:
        fh.write(VALID)
        fh.write(("# padding " + "x" * 100 + "\n") * 50_000)  # about 5.5 MB of comments
    return path


FILES = [
    ("symlink loop", _symlink_loop, "symbolic links"),
    ("path under a file", _under_a_file, "not a directory"),
    ("character device", lambda tmp: Path("/dev/zero"), "not a regular file"),
    ("fifo", _fifo, "not a regular file"),
    ("directory", _directory, "directory"),
    ("too big", _too_big, "limit"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:-1]))
@pytest.mark.parametrize("what,make,needle", FILES, ids=[f[0] for f in FILES])
def test_a_config_path_that_is_no_regular_file_is_one_line_and_exit_2(
    tmp_path: Path, command: tuple[str, ...], what: str, make: object, needle: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    # A hang (the FIFO today) is a failure too: the bound is far above a normal start.
    proc = run_cli(*command, str(path), timeout=20)
    _one_line_error(proc, str(path), needle)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:-1]))
def test_an_unreadable_config_is_one_line_and_exit_2(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    setpriv = require_binary("setpriv", "util-linux")
    path = tmp_path / "secret.toml"
    path.write_text(VALID)
    path.chmod(0)
    # Tests run as root here: drop the capabilities that let root read any file, so the
    # permission bits apply as they do to an unprivileged agent.
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "healthmesh", *command, str(path)],
        capture_output=True, text=True, timeout=20, cwd=ROOT,
    )
    _one_line_error(proc, str(path), "permission denied")


# --- values that parse but cannot work -------------------------------------------------------


def _set(key_line: str) -> str:
    return VALID.replace('timeout = "500ms"', f'timeout = "500ms"\n{key_line}')


VALUES = [
    ("interval far below a probe", VALID.replace('"2s"', '"100us"').replace('"500ms"', '"50us"'),
     "probing.interval"),
    ("interval of one nanosecond", VALID.replace('"2s"', '"1ns"').replace('"500ms"', '"1ns"'),
     "probing.interval"),
    ("timeout below a millisecond", VALID.replace('"500ms"', '"10us"'), "probing.timeout"),
    ("duration beyond any clock", VALID.replace('"2s"', '"99999999999999999999h"'),
     "probing.interval"),
    ("duration over a day", VALID.replace('"2s"', '"25h"'), "probing.interval"),
    ("confirm_spacing over a day", _set('confirm_spacing = "48h"'), "probing.confirm_spacing"),
    ("tick over a second", _set('tick = "2s"'), "probing.tick"),
    ("window too large", _set("window = 100000000"), "probing.window"),
    ("max_rate absurd", _set("max_rate = 1e12"), "probing.max_rate"),
    ("max_rate not a number", _set("max_rate = nan"), "probing.max_rate"),
    ("failure_threshold huge", _set("failure_threshold = 1000000000"),
     "probing.failure_threshold"),
    ("confirm_probes negative", _set("confirm_probes = -1"), "probing.confirm_probes"),
    ("no re-probe ever allowed in flight", _set("confirm_max_inflight = 0"),
     "probing.confirm_max_inflight"),
    ("re-probes per round absurd", _set("confirm_max_per_round = 100000000000"),
     "probing.confirm_max_per_round"),
    ("jitter not a number", _set("jitter = nan"), "probing.jitter"),
    ("plugin duration over a day", VALID + '\n[sources.file]\npath = "x.json"\npoll = "30h"\n',
     "sources.file.poll"),
    ("peer with this node's name", VALID.replace('{name = "n2"', '{name = "n1"'),
     "sources.static.nodes[0].name"),
    ("peer at this node's address", VALID.replace('"127.0.0.2"]}', '"127.0.0.1"]}'),
     "sources.static.nodes[0].addresses[0]"),
    ("two peers at one address", VALID.replace(
        'nodes = [{name = "n2", addresses = ["127.0.0.2"]}]',
        'nodes = [{name = "n2", addresses = ["127.0.0.2"]},'
        ' {name = "n3", addresses = ["127.0.0.3", "127.0.0.2"]}]'),
     "sources.static.nodes[1].addresses[1]"),
]


@pytest.mark.parametrize("what,text,key", VALUES, ids=[v[0] for v in VALUES])
def test_a_value_that_cannot_work_is_refused_naming_the_key(
    tmp_path: Path, what: str, text: str, key: str
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    proc = run_cli("config", "check", "-c", str(cfg), timeout=20)
    _one_line_error(proc, str(cfg), key)


def test_the_bounds_themselves_are_accepted(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(VALID.replace('"2s"', '"100ms"').replace('"500ms"', '"1ms"')
                   + '\n[sources.file]\npath = "peers.json"\npoll = "24h"\n')
    # A node file shared by every agent lists this node too, with its own addresses: fine.
    (tmp_path / "peers.json").write_text('[{"name": "n1", "addresses": ["127.0.0.1"]},'
                                         ' {"name": "n3", "addresses": ["127.0.0.3"]}]')
    proc = run_cli("config", "check", "-c", str(cfg), timeout=20)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:-1]))
@pytest.mark.parametrize("what", ["fifo", "this node's name", "this node's address"])
def test_a_node_file_that_cannot_work_at_start_up_is_one_line_and_exit_2(
    tmp_path: Path, command: tuple[str, ...], what: str
) -> None:
    peers = tmp_path / "peers.json"
    if what == "fifo":
        os.mkfifo(peers)  # read on start-up, it used to hang every command
        needles = ["sources.file", str(peers), "not a regular file"]
    elif what == "this node's name":
        peers.write_text('[{"name": "n1", "addresses": ["127.0.0.9"]}]')
        needles = ["sources.file.path", "nodes[0].name", "own name"]
    else:
        peers.write_text('[{"name": "n9", "addresses": ["127.0.0.9", "127.0.0.1"]}]')
        needles = ["sources.file.path", "nodes[0].addresses[1]", "127.0.0.1"]
    cfg = tmp_path / "c.toml"
    cfg.write_text(VALID.split("[sources.static]")[0] + '[sources.file]\npath = "peers.json"\n')
    proc = run_cli(*command, str(cfg), timeout=20)
    _one_line_error(proc, str(cfg), *needles)


# --- relative paths resolve against the config file ------------------------------------------


def test_a_relative_api_socket_resolves_against_the_config_file(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "peers.json").write_text('[{"name": "n2", "addresses": ["127.0.0.2"]}]')
    cfg = conf_dir / "hm.toml"
    cfg.write_text(VALID.split("[sources.static]")[0] + """
[sources.file]
path = "peers.json"
[outputs.api]
socket = "run/health.sock"
""")
    (conf_dir / "run").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "healthmesh", "config", "check", "--show", "-c", str(cfg)],
        capture_output=True, text=True, timeout=20, cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert f'socket = "{conf_dir / "run" / "health.sock"}"' in proc.stdout, proc.stdout


# --- no setting can make the scheduler pile up probes ----------------------------------------

SCHEDULER_SCRIPT = r"""
import json, sys, anyio, resource
from healthmesh.core.agent import Agent
from healthmesh.core.config import Duration, load_raw
from healthmesh.core.plugins import load_plugins
from healthmesh.core.resolve import resolve

raw = load_raw(sys.argv[1])
p = raw.core.probing
# Past the config's bounds on purpose: the scheduler itself must hold whatever it is given.
p.interval, p.timeout = Duration(1e-4), Duration(0.3)
p.confirm_spacing, p.tick, p.max_rate, p.jitter = Duration(0.0), Duration(0.0), 1e9, 0.0
p.confirm_probes = 100
registry = load_plugins(set(raw.core.plugins.disable))
config = resolve(raw, registry)
agent = Agent(config, registry, once=False, console="json")

def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20

async def monitor():
    while True:
        s = agent.scheduler
        print(json.dumps({"inflight": s.inflight, "skipped": s.skipped, "rss": rss_mb(),
                          "slots": len(s.slots)}), file=sys.stderr, flush=True)
        await anyio.sleep(0.2)

async def main():
    async with anyio.create_task_group() as tg:
        tg.start_soon(monitor)
        code = await agent.run()
        tg.cancel_scope.cancel()
    return code

sys.exit(anyio.run(main))
"""


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A TCP listener on 127.0.0.2 that accepts connections and never answers: slow probes."""
    srv = socket.socket()
    srv.bind(("127.0.0.2", 0))
    srv.listen(1024)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set() and len(held) < 5000:
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for c in held:
            c.close()
        srv.close()


def test_a_tiny_interval_with_slow_probes_keeps_the_backlog_bounded(
    tmp_path: Path, silent_peer: int
) -> None:
    port = silent_peer
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[node]
name = "n1"
addresses = ["127.0.0.1"]
[probing]
interval = "1s"
timeout = "300ms"
[responder]
listen = ["127.0.0.1:{port}"]
[probes.http]
port = {port}
[outputs.api]
socket = "{tmp_path / 'api.sock'}"
[sources.static]
nodes = [{{name = "slow", addresses = ["127.0.0.2"]}},
         {{name = "refused", addresses = ["127.0.0.3"]}}]
""")
    proc = subprocess.Popen(
        [sys.executable, "-c", SCHEDULER_SCRIPT, str(cfg)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    samples: list[dict[str, float]] = []
    other: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            try:
                samples.append(json.loads(line))
            except ValueError:
                other.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # Four seconds of a 100 µs interval: 40,000 rounds' worth of starts.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (samples and samples[-1]["slots"] > 0):
            time.sleep(0.1)
        assert samples and samples[-1]["slots"] > 0, "".join(other)[-2000:]
        first = len(samples)
        time.sleep(4)
        window = samples[first:]
        # The loop is not starved: the monitor keeps reporting about every 0.2 s.
        assert len(window) >= 8, (len(window), "".join(other)[-2000:])
        slots = max(s["slots"] for s in samples)
        # Two scheduled probes per slot (MAX_SCHEDULED), one confirmation run and at most
        # confirm_probes (100) re-probes in flight.
        assert max(s["inflight"] for s in samples) <= slots * 103, samples[-1]
        assert samples[-1]["skipped"] > 0, samples[-1]
        growth = max(s["rss"] for s in window) - window[0]["rss"]
        assert growth < 40, (growth, window[0], window[-1])
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(5)
        took = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait(10)
        reader.join(5)
    print(f"slots {slots}, max in flight {max(s['inflight'] for s in samples)}, "
          f"skipped {samples[-1]['skipped']}, RSS growth {growth:.1f} MB, SIGTERM {took:.2f}s")
    assert code == 0, "".join(other)[-2000:]
    assert took < 5
    assert not any("Traceback" in line for line in other), "".join(other)[-3000:]


def test_the_scheduler_reports_itself_degraded_when_the_interval_cannot_be_kept(
    tmp_path: Path,
) -> None:
    """3,000 peers every 100 ms is more than one agent can probe: the scheduler says so.

    60,000 probes a second, five times what this agent reaches on a 2-core machine; with 600
    peers (12,000 a second) a quiet machine kept up once the agent got cheaper per probe.
    """
    from tests.test_api_support import AgentProcess

    sock = tmp_path / "api.sock"
    nodes = tmp_path / "nodes.json"
    # Loopback addresses nothing listens on: each probe is refused at once, but there are
    # 60,000 a second to start (icmp and http).
    nodes.write_text(json.dumps({"nodes": [
        {"name": f"p{i}", "addresses": [f"127.3.{i // 250}.{i % 250 + 1}"]} for i in range(3000)
    ]}))
    agent = AgentProcess(tmp_path, f"""
[node]
name = "n1"
addresses = ["127.0.0.1"]
[probing]
interval = "100ms"
timeout = "100ms"
confirm_probes = 0
[responder]
listen = ["127.0.0.1:0"]
[probes.http]
port = 9
[outputs.api]
socket = "{sock}"
[sources.file]
path = "{nodes}"
""", socket_path=sock)
    agent.start()
    try:
        agent.wait_serving()
        deadline = time.monotonic() + 20
        scheduler: dict[str, object] = {}
        while time.monotonic() < deadline:
            with agent.client() as c:
                comps = c.get("/v1/healthz").json()["components"]
            scheduler = next(x for x in comps if x["name"] == "scheduler")
            if scheduler["state"] == "degraded":
                break
            time.sleep(0.3)
        assert scheduler["state"] == "degraded", scheduler
        message = str(scheduler["message"])
        assert any(w in message for w in ("late", "skipped", "round took")), message
        # `status` shows it in the component block (its state may change every round). Until
        # a round completes, the status snapshot is rebuilt at most once per ten times its
        # last build took, so on a loaded machine the first answer may still say "starting".
        line = ""
        while time.monotonic() < deadline + 20:
            proc = run_cli("status", "-H", f"unix://{sock}", env={"COLUMNS": "300"})
            assert proc.returncode == 1, proc.stderr  # the peers are unreachable
            line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("Scheduler:"))
            if "Degraded" in line or "lag p99" in line:
                break
            time.sleep(0.5)
        assert "Degraded" in line or "lag p99" in line, line
    finally:
        if agent.proc is not None:
            agent.proc.send_signal(signal.SIGTERM)
            agent.proc.wait(10)
