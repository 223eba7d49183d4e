"""Shared fixtures; tests that need root or a binary skip on a laptop but fail under CI=true."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import Netns, cleanup_leftovers, have_root_net, netns

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(reason: str | None) -> None:
    """Skip with ``reason`` on a developer machine; fail under CI, where nothing may skip."""
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true but this test cannot run: {reason}")
    pytest.skip(reason)


def require_binary(name: str, package: str) -> str:
    """The path of ``name``, or skip (fail under CI) naming the Debian package."""
    path = shutil.which(name)
    require(None if path else f"needs {name} (apt-get install {package})")
    assert path is not None
    return path


@pytest.fixture
def root_net() -> None:
    """Require root and the iproute2/iptables tools."""
    require(have_root_net())


@pytest.fixture
def ns(root_net: None) -> Iterator[Netns]:
    """A fresh network namespace with loopback up, deleted afterwards."""
    with netns() as n:
        yield n


@pytest.fixture(scope="session", autouse=True)
def _clean_leftover_namespaces() -> None:
    if have_root_net() is None:
        cleanup_leftovers()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def healthmesh_cmd() -> list[str]:
    """The argv prefix that runs this checkout's CLI with the test interpreter."""
    return [sys.executable, "-m", "healthmesh"]


def run_cli(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``healthmesh ARGS`` in a subprocess and capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*healthmesh_cmd(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        input=input,
        cwd=ROOT,
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a test left a process behind (an agent whose config is a test's file).

    Runs once, in the controlling process, after every worker has finished: whatever still
    has an argument under this run's temporary directory was orphaned by a test. It is
    killed, named, and the run fails, so a leak cannot hide behind passing tests.
    """
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks
        return
    import time

    try:
        import psutil
    except ImportError:  # the Python 3.10 subset's venv: the full suite (which has it) checks
        return

    base = str(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]

    def leftovers() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            args = proc.info["cmdline"] or []
            if proc.pid != os.getpid() and any(a.startswith(base) for a in args):
                found.append(proc)
        return found

    deadline = time.monotonic() + 5  # processes being stopped at teardown may still be exiting
    left = leftovers()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = leftovers()
    if not left:
        return
    lines = []
    for proc in left:
        try:
            lines.append(f"  pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.Error:
            continue
    if lines:
        sys.stderr.write("\nprocesses left running by the tests (killed):\n")
        sys.stderr.write("\n".join(lines) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
