"""Peer source ``file``: a JSON or TOML node list, re-read when it changes."""

from __future__ import annotations

import os
import stat
import sys
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from healthmesh import (
    ComponentSettings,
    ConfigError,
    ConfigPath,
    Duration,
    Node,
    PeerSource,
    SourceFeed,
    check_against_local,
    hookimpl,
    parse_nodes,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Default bound on a node file: 1 MiB, some 20,000 plain or 5,000 labelled nodes of JSON.
#: A bigger file is refused unread: parsing JSON holds the GIL, so the agent's loop waits
#: for the parse even from a worker thread (about 40 ms per MiB measured on 2 shared cores),
#: and a peer's /hello must stay well under its probe timeout.
DEFAULT_MAX_BYTES = 1024 * 1024
MAX_MAX_BYTES = 256 * 1024 * 1024
MIN_POLL = 0.01


class FileSettings(ComponentSettings, kw_only=True):
    """``[sources.file]``: ``path`` (relative to the config file), ``poll`` interval and
    ``max_bytes``, the size limit of the file."""

    path: ConfigPath
    poll: Duration = Duration(1.0)
    max_bytes: int = DEFAULT_MAX_BYTES


class FileSource(PeerSource):
    """Publishes the nodes of a file; a broken edit keeps the last good list.

    The file is read and parsed in a worker thread, so that a slow file system or a big
    file never holds up the responder or the API; FIFOs, devices and files over
    ``max_bytes`` are refused without reading them.
    """

    name = "file"
    Settings = FileSettings

    @classmethod
    def validate_settings(cls, settings: FileSettings, config: Any) -> None:
        if not settings.poll >= MIN_POLL:
            raise ValueError("poll: must be at least 10ms")
        if not 1024 <= settings.max_bytes <= MAX_MAX_BYTES:
            raise ValueError(f"max_bytes: must be between 1024 and {MAX_MAX_BYTES}")
        # A broken file at start-up is a config error, and so is a peer that is this node.
        nodes = load_node_file(settings.path, settings.max_bytes)
        try:
            # A list shared by every agent names this node too: fine if it really is it.
            check_against_local(nodes, config.core.node, "nodes", allow_self=True)
        except ConfigError as exc:
            raise ConfigError(f"path: {settings.path}: {exc}") from None

    def __init__(self, settings: FileSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.path = str(settings.path)
        self._stamp: tuple[int, int, int] | None = None

    async def _load(self) -> list[Node]:
        # abandon_on_cancel: a read stuck in the kernel (a hung network file system) must
        # not hold up shutdown; the thread ends on its own when the read returns.
        return await anyio.to_thread.run_sync(
            load_node_file, self.path, self.settings.max_bytes, abandon_on_cancel=True
        )

    async def run(self, feed: SourceFeed, *, task_status: TaskStatus[None]) -> None:
        self._stamp = _stamp(self.path)
        feed.replace(await self._load())
        task_status.started()
        while True:
            await anyio.sleep(self.settings.poll)
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                nodes = await self._load()
            except ValueError as exc:
                logger.error("source file: {}; keeping the last good node list", exc)
                feed.mark_stale(str(exc))
                continue
            logger.info("{}: {} nodes", self.path, len(nodes))
            feed.replace(nodes)
            feed.mark_fresh()


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_node_file(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Node]:
    """Read a node file: JSON (``[...]`` or ``{"nodes": [...]}``) or TOML (``nodes = [...]``).

    Only a regular file of at most ``max_bytes`` is read. Raises ValueError (ConfigError)
    naming the file and the key. Blocking: call it from a worker thread in the agent.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read node file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: node file is not a regular file")
        if st.st_size > max_bytes:
            raise ConfigError(
                f"{path}: node file is {st.st_size} bytes, over the limit of {max_bytes} "
                "(sources.file.max_bytes)"
            )
        with os.fdopen(os.dup(fd), "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read node file: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > max_bytes:
        raise ConfigError(
            f"{path}: node file is over the limit of {max_bytes} bytes (sources.file.max_bytes)"
        )
    try:
        # msgspec's JSON parser: about twice as fast as json's, and it matters, because
        # either holds the GIL (and so stalls the agent's loop) for the whole document.
        data: Any = (
            tomllib.loads(raw.decode("utf-8"))
            if path.endswith(".toml")
            else msgspec.json.decode(raw)
        )
    except (UnicodeDecodeError, ValueError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse node file: {exc}") from None
    where = "nodes"
    if isinstance(data, dict):
        if set(data) - {"nodes"}:
            extra = sorted(set(data) - {"nodes"})[0]
            raise ConfigError(f"{path}: {extra}: unknown key")
        data = data.get("nodes", [])
    try:
        return parse_nodes(data, where)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@hookimpl
def register_peer_sources(register: Any) -> None:
    register(FileSource)
