"""Throw-away network namespaces for tests: create, run commands inside, always delete."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

PREFIX = "hmt-"


def sh(*args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise with its stderr when it fails."""
    proc = subprocess.run(args, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class Netns:
    """One network namespace made by the test itself, with loopback up."""

    def __init__(self, name: str | None = None) -> None:
        # The creating process's pid is in the name, so that a later run cleans up only
        # namespaces whose creator is gone (never those of a test session still running).
        self.name = name or f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def create(self) -> Netns:
        sh("ip", "netns", "add", self.name)
        self.run("ip", "link", "set", "lo", "up")
        return self

    def delete(self) -> None:
        sh("ip", "netns", "pids", self.name, check=False)
        for pid in sh("ip", "netns", "pids", self.name, check=False).stdout.split():
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "delete", self.name, check=False)

    def cmd(self, *args: str) -> list[str]:
        """The argv that runs ``args`` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*self.cmd(*args), check=check)

    def popen(self, args: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.cmd(*args), **kw)  # type: ignore[call-overload]


@contextmanager
def netns() -> Iterator[Netns]:
    """A fresh namespace, deleted afterwards even when the test fails."""
    ns = Netns().create()
    try:
        yield ns
    finally:
        ns.delete()


def cleanup_leftovers() -> None:
    """Delete namespaces left by a killed earlier run (their creating process is gone)."""
    out = sh("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
            continue
        Netns(name).delete()


def have_root_net() -> str | None:
    """None when namespaces and iptables can be used here; else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command (apt-get install iproute2 iptables)"
    return None
