"""Pipelining flood client: N connections each writing a burst of ``GET /hello`` requests.

A stand-alone script (standard library only) so that it runs in its own process, apart
from the responder under test and from the client that measures it:

    python tests/flooder.py --port 4240 --connections 10 --seconds 5 --mode read

Modes: ``read`` reads and discards the answers, ``noread`` never reads them, ``rst``
writes one burst, then resets the connection (SO_LINGER 0) and opens a new one.
Each connection writes the burst again whenever its socket takes it and reconnects when
the responder closes it. Traffic goes to the given loopback address only; the run ends
after ``--seconds``. Prints one JSON line of counts on stdout.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import struct
import time

REQUEST = b"GET /hello HTTP/1.1\r\nHost: flood\r\n\r\n"


class Flow:
    """One flooding connection; reopened whenever the responder closes it."""

    def __init__(self, sel: selectors.BaseSelector, host: str, port: int, burst: bytes,
                 mode: str, counts: dict[str, int]) -> None:
        self.sel, self.host, self.port, self.burst, self.mode = sel, host, port, burst, mode
        self.counts = counts
        self.sock: socket.socket | None = None
        self.pending = b""
        self.open()

    def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect((self.host, self.port))
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            self.counts["connect_errors"] += 1
            self.sock = None
            return
        self.sock = sock
        self.pending = self.burst
        self.counts["connections"] += 1
        events = selectors.EVENT_WRITE | (selectors.EVENT_READ if self.mode == "read" else 0)
        self.sel.register(sock, events, self)

    def reopen(self) -> None:
        if self.sock is not None:
            self.sel.unregister(self.sock)
            self.sock.close()
            self.sock = None
        self.open()

    def writable(self) -> None:
        assert self.sock is not None
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            return
        except OSError:
            self.counts["closed_by_server"] += 1
            self.reopen()
            return
        self.pending = self.pending[sent:]
        if self.pending:
            return
        self.counts["bursts"] += 1
        if self.mode == "rst":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.reopen()
            return
        self.pending = self.burst

    def readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.counts["closed_by_server"] += 1
            self.reopen()
            return
        self.counts["answer_bytes"] += len(data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--requests", type=int, default=2000, help="requests per write")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--mode", choices=("read", "noread", "rst"), default="read")
    a = ap.parse_args()
    if not a.host.startswith("127."):
        ap.error("--host: loopback (127.0.0.0/8) only")
    sel = selectors.DefaultSelector()
    counts = dict.fromkeys(
        ("connections", "bursts", "closed_by_server", "connect_errors", "answer_bytes"), 0
    )
    burst = REQUEST * a.requests
    flows = [Flow(sel, a.host, a.port, burst, a.mode, counts) for _ in range(a.connections)]
    end = time.monotonic() + a.seconds
    while (left := end - time.monotonic()) > 0:
        for flow in flows:
            if flow.sock is None:
                flow.open()
        for key, events in sel.select(min(left, 0.1)):
            flow = key.data
            if flow.sock is None or key.fileobj is not flow.sock:
                continue
            if events & selectors.EVENT_READ:
                flow.readable()
            writable = events & selectors.EVENT_WRITE
            if writable and flow.sock is not None and key.fileobj is flow.sock:
                flow.writable()
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
