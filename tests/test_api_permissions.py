"""Only root and the socket's group can use the API: a user outside the group cannot connect."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.test_api_support import LIVE_PEER, AgentProcess, agent_config, free_port

pytestmark = pytest.mark.root

#: Runs as the unprivileged user: connect, send one request, print what happened.
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("refused", exc.errno)
    sys.exit(0)
s.sendall(b"GET /v1/healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print("answered", data.split(b"\\r\\n", 1)[0].decode())
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory everyone may traverse, so that only the socket's own mode decides."""
    require(None if os.geteuid() == 0 else "needs root (runs a client as another user)")
    path = Path(tempfile.mkdtemp(prefix="hm-api-perm-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_as_nobody(socket_path: Path, extra_groups: list[int]) -> str:
    python = shutil.which("python3", path="/usr/bin:/bin")
    require(None if python else "needs /usr/bin/python3 for the unprivileged client")
    nobody = pwd.getpwnam("nobody")
    proc = subprocess.run(
        [python, "-c", CLIENT, str(socket_path)],  # type: ignore[list-item]
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=extra_groups,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_user_outside_the_socket_group_cannot_connect(shared_dir: Path) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        require("needs the 'nobody' user")
        return
    group = next(
        (g for g in grp.getgrall() if g.gr_gid not in (0, nobody.pw_gid)
         and "nobody" not in g.gr_mem),
        None,
    )
    if group is None:
        require("needs a group that 'nobody' is not in")
        return
    sock = shared_dir / "health.sock"
    config = agent_config(str(sock), free_port(), peers=LIVE_PEER,
                          api_extra=f'group = "{group.gr_name}"\n')
    with AgentProcess(shared_dir, config, socket_path=sock) as agent:
        agent.wait_serving()
        st = os.lstat(sock)
        assert oct(st.st_mode & 0o777) == "0o660" and st.st_gid == group.gr_gid
        # Outside the group: the kernel refuses the connection (EACCES).
        assert run_as_nobody(sock, extra_groups=[]) == "refused 13"
        # The same user, given the socket's group, is served.
        assert run_as_nobody(sock, extra_groups=[group.gr_gid]) == "answered HTTP/1.1 200 OK"
