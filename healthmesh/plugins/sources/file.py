"""Peer source ``file``: a JSON or TOML node list, re-read when it changes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path as FsPath
from typing import Any

import anyio
from anyio.abc import TaskStatus
from loguru import logger

from healthmesh import (
    ComponentSettings,
    ConfigError,
    Duration,
    Node,
    PeerSource,
    SourceFeed,
    hookimpl,
    parse_nodes,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_FILE_BYTES = 16 * 1024 * 1024


class FileSettings(ComponentSettings, kw_only=True):
    """``[sources.file]``: ``path`` (relative to the config file) and ``poll`` interval."""

    path: str
    poll: Duration = Duration(1.0)


class FileSource(PeerSource):
    """Publishes the nodes of a file; a broken edit keeps the last good list."""

    name = "file"
    Settings = FileSettings

    @classmethod
    def validate_settings(cls, settings: FileSettings, config: Any) -> None:
        if settings.poll <= 0:
            raise ValueError("poll: must be greater than zero")
        path = _resolve(settings.path, config.path)
        load_node_file(path)  # a broken file at start-up is a config error

    def __init__(self, settings: FileSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.path = _resolve(settings.path, context.config.path)
        self._stamp: tuple[int, int, int] | None = None

    async def run(self, feed: SourceFeed, *, task_status: TaskStatus[None]) -> None:
        self._stamp = _stamp(self.path)
        feed.replace(load_node_file(self.path))
        task_status.started()
        while True:
            await anyio.sleep(self.settings.poll)
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                nodes = load_node_file(self.path)
            except ValueError as exc:
                logger.error("{}; keeping the last good node list", exc)
                feed.mark_stale(str(exc))
                continue
            logger.info("{}: {} nodes", self.path, len(nodes))
            feed.replace(nodes)
            feed.mark_fresh()


def _resolve(path: str, config_path: str) -> str:
    p = FsPath(path)
    if not p.is_absolute():
        p = FsPath(config_path).resolve().parent / p
    return str(p)


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_node_file(path: str) -> list[Node]:
    """Read a node file: JSON (``[...]`` or ``{"nodes": [...]}``) or TOML (``nodes = [...]``).

    Raises ValueError (ConfigError) naming the file and the key.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read node file: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: node file is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        data: Any = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
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
