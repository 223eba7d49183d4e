"""The API's unix socket: one agent per path, a stale file replaced, mode and group set.

An exclusive ``flock`` on ``<socket>.lock``, held for the agent's lifetime, makes a second
agent on the same path refuse to start instead of unlinking the first one's socket; a
socket that still answers (an agent of another version, another program) is refused too.
The socket is bound inside a private directory, given its mode and group, then renamed
into place, so it is never reachable with looser permissions and a stale file is replaced
in one step.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import stat
import struct
import tempfile

from loguru import logger

_SUN_PATH_MAX = 107
_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)


class UnixListener:
    """A listening unix socket at ``path``, owned by this process until ``close``."""

    def __init__(self, path: str, sock: socket.socket, lock_fd: int, inode: int) -> None:
        self.path = path
        self.sock = sock
        self._lock_fd = lock_fd
        self._inode = inode

    @classmethod
    def open(cls, path: str, mode: int, gid: int | None, backlog: int = 128) -> UnixListener:
        """Take the path's lock, replace a stale socket, bind and listen; OSError saying why not."""
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise _error(f"cannot create the directory {parent}", exc) from None
        lock_fd = _take_lock(path)
        try:
            _check_existing(path)
            sock, inode = _bind(path, mode, gid, backlog)
        except BaseException:
            _release_lock(path, lock_fd)
            raise
        return cls(path, sock, lock_fd, inode)

    def close(self) -> None:
        """Stop listening; remove the socket file (if it is still ours) and the lock."""
        self.sock.close()
        try:
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        if self._lock_fd >= 0:
            _release_lock(self.path, self._lock_fd)
            self._lock_fd = -1


class SocketError(OSError):
    """A socket problem already worded for the operator, in one line."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _error(what: str, exc: OSError) -> SocketError:
    """A one-line error keeping the errno: ``what: reason``."""
    err = SocketError(f"{what}: {(exc.strerror or str(exc)).lower()}")
    err.errno = exc.errno
    return err


def _lock_path(path: str) -> str:
    return path + ".lock"


def _take_lock(path: str) -> int:
    lock = _lock_path(path)
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise _error(f"cannot open the lock file {lock}", exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f" (pid {holder})" if holder else ""
                raise SocketError(
                    errno.EADDRINUSE,
                    f"socket {path} is in use by another healthmesh agent{who}; stop it, or "
                    "give this agent another [outputs.api] socket",
                ) from None
            raise _error(f"cannot lock {lock}", exc) from None
        # The previous holder may have unlinked the file between our open and our lock.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise SocketError(errno.EAGAIN, f"cannot lock {lock}: it keeps being replaced")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _release_lock(path: str, fd: int) -> None:
    # Unlink while still holding the lock: whoever opens the name next gets a new file.
    with contextlib.suppress(OSError):
        os.unlink(_lock_path(path))
    os.close(fd)


def _check_existing(path: str) -> None:
    """Refuse a live socket or a non-socket file at ``path``; leave a stale one to replace."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(
            errno.EEXIST, f"{path} exists and is not a socket; remove it or choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        logger.info("api: replacing the stale socket {}", path)
        return
    except (TimeoutError, BlockingIOError):
        pass  # a full backlog: somebody is listening, just busy
    except OSError as exc:
        raise _error(f"cannot check whether {path} is in use", exc) from None
    else:
        pid = _peer_pid(probe)
        who = f" (pid {pid})" if pid else ""
        raise SocketError(
            errno.EADDRINUSE,
            f"socket {path} is in use by another process{who}; stop it, or give this agent "
            "another [outputs.api] socket",
        )
    finally:
        probe.close()
    raise SocketError(errno.EADDRINUSE, f"socket {path} is in use by another process (busy)")


def _peer_pid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", creds)[0]
    return pid or None


def _bind(path: str, mode: int, gid: int | None, backlog: int) -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        private = tempfile.mkdtemp(prefix=".hm", dir=os.path.dirname(path))
        try:
            tmp = os.path.join(private, "s")
            if len(os.fsencode(tmp)) <= _SUN_PATH_MAX:
                sock.bind(tmp)
                _set_owner(tmp, path, mode, gid)
                os.rename(tmp, path)
            else:
                _bind_in_place(sock, path, mode)
                _set_owner(path, path, mode, gid)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        sock.listen(backlog)
        sock.setblocking(False)
        inode = os.lstat(path).st_ino
    except OSError as exc:
        sock.close()
        if isinstance(exc, SocketError):
            raise
        raise _error(f"cannot listen on {path}", exc) from None
    return sock, inode


def _bind_in_place(sock: socket.socket, path: str, mode: int) -> None:
    """Bind at ``path`` itself (a path too long for the private-directory route)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)


def _set_owner(where: str, path: str, mode: int, gid: int | None) -> None:
    if gid is not None:
        try:
            os.chown(where, -1, gid)
        except OSError as exc:
            raise _error(f"cannot give {path} to group {gid}", exc) from None
    os.chmod(where, mode)
