"""The webhook output against a real HTTP receiver on 127.0.0.1 that fails, is slow and restarts.

A real agent (subprocess) POSTs its events; the receiver is a stdlib HTTP server in the test.
What arrives is compared with the agent's own ring (GET /v1/events): nothing is lost beyond
the documented queue bound, duplicates come only from retried deliveries (same
X-Healthmesh-Delivery), every body's HMAC verifies, retries back off.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agentproc import free_port
from tests.events_support import (
    Responder,
    event_validator,
    fast_agent_config,
    is_change,
    ring,
    wait_ring,
)
from tests.test_api_support import AgentProcess

SECRET = b"s3cret-key\n"


class Receiver:
    """An HTTP server that records every POST and answers as ``plan`` says."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.posts: list[dict[str, Any]] = []
        self.plan: list[tuple[int, float]] = []  # (status, delay) for the next requests
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    status, delay = receiver.plan.pop(0) if receiver.plan else (200, 0.0)
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.posts.append({"t": time.monotonic(), "headers": headers,
                                           "body": body, "status": status})
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the client gave up (timeout)

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def events(self, ok_only: bool = False) -> list[dict[str, Any]]:
        with self.lock:
            posts = list(self.posts)
        return [e for p in posts if not ok_only or p["status"] == 200
                for e in json.loads(p["body"])["events"]]

    def wait_seqs(self, seqs: set[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if seqs <= {e["seq"] for e in self.events(ok_only=True)}:
                return
            time.sleep(0.05)
        got = {e["seq"] for e in self.events(ok_only=True)}
        raise AssertionError(f"seqs {sorted(seqs - got)} not delivered within {timeout}s")


class SwitchPeer:
    """A peer whose /hello answers 200 or 503 at the flip of a flag: flaps without delay."""

    def __init__(self, address: str, port: int) -> None:
        peer = self
        self.up = True

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if peer.up else 503)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def agent_config(sock: Path, port: int, peers: str, webhook: str) -> str:
    return fast_agent_config(
        sock, port, f"[sources.static]\nnodes = [{peers}]\n[outputs.webhook]\n{webhook}\n"
    )


def stats(sock: str) -> dict[str, Any]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://localhost",
                      timeout=5) as c:
        return c.get("/v1/status").json()["outputs"]["webhook"]


def verify(post: dict[str, Any]) -> bool:
    want = "sha256=" + hmac.new(SECRET.strip(), post["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(post["headers"]["x-healthmesh-signature"], want)


class Lab:
    def __init__(self, tmp: Path, webhook: str, peers: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.sock = str(tmp / "health.sock")
        self.agent = AgentProcess(tmp, agent_config(Path(self.sock), self.port, peers, webhook),
                                  socket_path=self.sock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port())
    yield r
    r.stop()


def test_failing_slow_and_restarting_receiver(tmp_path: Path, receiver: Receiver) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    peer_port = free_port()
    peer = Responder("127.0.0.3", peer_port, tmp_path / "peer.log").start()
    # Four 500s, then a request slower than the timeout, then success.
    receiver.plan = [(500, 0.0)] * 4 + [(200, 1.5)]
    receiver.start()
    webhook = (f'urls = ["{receiver.url}"]\ntimeout = "500ms"\nretry_initial = "200ms"\n'
               f'retry_max = "2s"\nsecret_file = "{secret}"\nbatch = 100')
    peers = '{name = "peer", addresses = ["127.0.0.3"]}'
    lab = Lab(tmp_path, webhook, peers, peer_port)  # the peer answers on the agent's port
    with lab.agent:
        try:
            lab.agent.wait_serving()
            first = wait_ring(lab.sock, lambda e: is_change(e, "peer", "reachable"))
            receiver.wait_seqs({e["seq"] for e in first}, 20)
            # The slow answer was recorded before the agent gave up on it: wait for the retry.
            deadline = time.monotonic() + 20
            while stats(lab.sock)["urls"][receiver.url]["delivered"] < len(first):
                assert time.monotonic() < deadline, stats(lab.sock)
                time.sleep(0.05)

            # Backoff: the first batch's attempts, same delivery id, ever further apart.
            first_id = receiver.posts[0]["headers"]["x-healthmesh-delivery"]
            tries = [p for p in receiver.posts
                     if p["headers"]["x-healthmesh-delivery"] == first_id]
            assert [p["status"] for p in tries] == [500, 500, 500, 500, 200, 200]
            gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(tries)]
            # Retry n waits half to all of min(2s, 200ms·2ⁿ⁻¹); the 5th attempt also timed out.
            for n, gap in enumerate(gaps[:4], start=1):
                assert gap >= min(2.0, 0.2 * 2 ** (n - 1)) / 2 - 0.02, gaps
            assert gaps[3] > gaps[0]
            assert gaps[4] >= 0.5 + min(2.0, 0.2 * 2**4) / 2 - 0.05, gaps  # timeout + backoff

            # Restart: the receiver goes away, the peer goes down, the receiver comes back.
            receiver.stop()
            peer.stop()
            down = wait_ring(lab.sock, lambda e: is_change(e, "peer", "unreachable"))
            time.sleep(1.0)  # a few failed attempts against a closed port
            receiver.start()
            receiver.wait_seqs({e["seq"] for e in down}, 20)
            peer.start()
            final = wait_ring(lab.sock, lambda e: e["seq"] > down[-1]["seq"]
                              and is_change(e, "peer", "reachable"))
            receiver.wait_seqs({e["seq"] for e in final}, 20)

            # Nothing lost; every event as the agent has it; duplicates only from retries.
            by_seq = {e["seq"]: e for e in final}
            validator = event_validator()
            got = receiver.events(ok_only=True)
            for ev in got:
                validator.validate(ev)
                assert ev == by_seq[ev["seq"]]
            assert {e["seq"] for e in got} == set(by_seq)
            ids: dict[int, set[str]] = {}
            for p in receiver.posts:
                if p["status"] != 200:
                    continue
                for ev in json.loads(p["body"])["events"]:
                    ids.setdefault(ev["seq"], set()).add(p["headers"]["x-healthmesh-delivery"])
            dupes = [s for s in ids if sum(1 for e in got if e["seq"] == s) > 1]
            assert all(len(ids[s]) == 1 for s in dupes)  # the same delivery, retried
            assert set(dupes) <= {e["seq"] for e in json.loads(tries[-1]["body"])["events"]}
            assert all(verify(p) for p in receiver.posts)
            assert all(p["headers"]["content-type"] == "application/json"
                       for p in receiver.posts)
            # The receiver records a POST before it answers: let the agent see the answer.
            deadline = time.monotonic() + 10
            while stats(lab.sock)["urls"][receiver.url]["delivered"] < len(by_seq):
                assert time.monotonic() < deadline, stats(lab.sock)
                time.sleep(0.05)
            st = stats(lab.sock)["urls"][receiver.url]
            assert st["dropped"] == 0 and st["failed_attempts"] >= 5
        finally:
            peer.stop()


def test_full_queue_drops_oldest_and_counts(tmp_path: Path, receiver: Receiver) -> None:
    # 30 dead peers: about 90 events in the first second, the receiver down, a queue of 20.
    dead = ", ".join(f'{{name = "d{i}", addresses = ["127.0.1.{i}"]}}' for i in range(1, 31))
    webhook = (f'urls = ["{receiver.url}"]\ntimeout = "500ms"\nretry_initial = "100ms"\n'
               'retry_max = "300ms"\nqueue = 20\nbatch = 5')
    lab = Lab(tmp_path, webhook, dead)
    with lab.agent:
        lab.agent.wait_serving()
        deadline = time.monotonic() + 20
        while True:
            events = ring(lab.sock)
            if sum(1 for x in events if x["type"] == "node" and x["to"] == "unreachable") >= 30:
                break
            assert time.monotonic() < deadline, events
            time.sleep(0.1)
        total = {e["seq"] for e in events}
        time.sleep(0.5)
        receiver.start()
        newest = sorted(total)[-20:]
        receiver.wait_seqs(set(newest), 20)
        deadline = time.monotonic() + 10
        while True:  # until every event is either acknowledged or counted as dropped
            st = stats(lab.sock)["urls"][receiver.url]
            if st["dropped"] + st["delivered"] >= len(total) and not st["queued"]:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        assert {e["seq"] for e in ring(lab.sock)} == total  # no event came after
        got = [e["seq"] for e in receiver.events(ok_only=True)]
        st = stats(lab.sock)["urls"][receiver.url]
        assert len(got) == len(set(got))  # no retries after a timeout, so no duplicates
        # Every event was delivered or counted as dropped; the newest were kept.
        assert st["dropped"] > 0
        assert st["dropped"] + st["delivered"] == len(total) == len(got) + st["dropped"]
        assert set(newest) <= set(got)
        # At most one batch in flight plus a full queue survived the outage.
        assert len(got) <= 20 + 5


def test_dedup_folds_flapping(tmp_path: Path, receiver: Receiver) -> None:
    window = 6.0
    receiver.start()
    peer_port = free_port()
    peer = SwitchPeer("127.0.0.3", peer_port)
    webhook = (f'urls = ["{receiver.url}"]\ndedup_window = "{window:g}s"\ntypes = ["path"]\n'
               'timeout = "1s"')
    lab = Lab(tmp_path, webhook, '{name = "peer", addresses = ["127.0.0.3"]}', peer_port)

    def sent_after(seq: int) -> list[dict[str, Any]]:
        return [e for e in receiver.events(ok_only=True)
                if e["path"] == "127.0.0.3" and e["seq"] > seq]

    def change(after: int, to: str) -> dict[str, Any]:
        events = wait_ring(lab.sock, lambda e: e["seq"] > after
                           and is_change(e, "peer", to, path="127.0.0.3"))
        return next(e for e in events if e["seq"] > after
                    and is_change(e, "peer", to, path="127.0.0.3"))

    with lab.agent:
        try:
            lab.agent.wait_serving()
            first = change(0, "reachable")
            receiver.wait_seqs({first["seq"]}, 10)
            time.sleep(window + 0.5)  # the first change's window closes
            # A flap within one window: down (sent at once), up, down again (both held).
            peer.up = False
            down = change(first["seq"], "unreachable")
            receiver.wait_seqs({down["seq"]}, 10)
            sent_at = time.monotonic()
            peer.up = True
            up = change(down["seq"], "reachable")
            peer.up = False
            again = change(up["seq"], "unreachable")
            assert time.monotonic() - sent_at < window - 1, "the flap took longer than the window"
            deadline = time.monotonic() + window + 10
            while stats(lab.sock)["suppressed"] < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            # Back where it was when the window opened: the held changes are never sent.
            assert stats(lab.sock)["suppressed"] == 2
            assert sent_after(first["seq"]) == [down]
            assert again["seq"] > up["seq"] > down["seq"]
            # A change in a fresh window goes out at once; one more within its window is
            # sent when the window closes, from the last state sent.
            peer.up = True
            back = change(again["seq"], "reachable")
            receiver.wait_seqs({back["seq"]}, 10)
            back_at = time.monotonic()
            peer.up = False
            last = change(back["seq"], "unreachable")
            receiver.wait_seqs({last["seq"]}, window + 10)
            assert time.monotonic() - back_at >= window - 0.5
            trailing = sent_after(back["seq"])
            assert len(trailing) == 1
            assert trailing[0] == {**last, "suppressed": 0}
        finally:
            peer.stop()


@pytest.mark.parametrize(("section", "message"), [
    ("", "outputs.webhook.urls: at least one URL is required"),
    ('urls = ["ftp://x/"]', "outputs.webhook.urls[0]: 'ftp://x/' is not an http:// or https://"),
    ('urls = ["http://u:pw@h/"]\nqueue = 0', "outputs.webhook.queue: must be between 1 and"),
    ('urls = ["http://h/"]\nsecret = "a"\nsecret_file = "/x"', "outputs.webhook.secret_file: "
     "give secret or secret_file, not both"),
    ('urls = ["http://h/"]\nsecret_file = "/nonexistent/key"', "outputs.webhook.secret_file: "
     "/nonexistent/key: no such file"),
    ('urls = ["http://h/"]\ntypes = ["paths"]', "outputs.webhook.types: 'paths' is not one of"),
    ('urls = ["http://h/"]\nretry = 3', "outputs.webhook.retry: unknown key"),
])
def test_bad_webhook_config_is_one_line_exit_2(tmp_path: Path, section: str,
                                               message: str) -> None:
    from tests.conftest import run_cli

    cfg = tmp_path / "c.toml"
    cfg.write_text(agent_config(tmp_path / "s.sock", 4240, '{name = "p", addresses = '
                                '["127.0.0.2"]}', section))
    proc = run_cli("config", "check", "-c", str(cfg))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "pw" not in proc.stderr
