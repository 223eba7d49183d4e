"""``[outputs.webhook]``: where to POST events, how hard to try, how to sign them."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import msgspec

from healthmesh import ComponentSettings, Duration

EVENT_TYPES = ("path", "node", "component")
MAX_SECRET_BYTES = 4096


class WebhookSettings(ComponentSettings):
    """``[outputs.webhook]``."""

    #: Endpoints to POST to; each gets every event, through its own queue.
    urls: list[str] = msgspec.field(default_factory=list)
    #: Bound on one POST, from connecting to the response status.
    timeout: Duration = Duration(5.0)
    #: First retry delay; doubled per failed attempt up to ``retry_max`` (with jitter).
    retry_initial: Duration = Duration(0.5)
    retry_max: Duration = Duration(30.0)
    #: Attempts per batch before it is given up; 0 retries until it is delivered.
    max_attempts: int = 0
    #: Events waiting per URL; when full the oldest is dropped (and counted).
    queue: int = 10_000
    #: Events per POST at most.
    batch: int = 100
    #: HMAC-SHA256 key for the X-Healthmesh-Signature header ("" and no file: unsigned).
    secret: str = ""
    #: A file holding the key instead (trailing newline ignored); read at start.
    secret_file: str = ""
    #: Flapping fold: after an event for a path or node, later changes of it within this
    #: window are held and folded into one (0s: off). See docs/events.md.
    dedup_window: Duration = Duration(0.0)
    #: Event types to send.
    types: list[str] = msgspec.field(default_factory=lambda: list(EVENT_TYPES))
    #: Extra request headers (an Authorization token, for example).
    headers: dict[str, str] = msgspec.field(default_factory=dict)


def validate(s: WebhookSettings) -> None:
    """Raise ValueError naming the key when a value cannot work."""
    if not s.urls:
        raise ValueError("urls: at least one URL is required")
    for i, url in enumerate(s.urls):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"urls[{i}]: {redact(url)!r} is not an http:// or https:// URL")
    if len(set(s.urls)) != len(s.urls):
        raise ValueError("urls: a URL is listed twice")
    checks = [
        (not 0 < s.timeout <= 300, "timeout: must be between 0s and 5m"),
        (not 0 < s.retry_initial <= s.retry_max, "retry_initial: must be > 0 and <= retry_max"),
        (s.retry_max > 3600, "retry_max: must be at most 1h"),
        (s.max_attempts < 0, "max_attempts: must not be negative (0: until delivered)"),
        (not 1 <= s.queue <= 1_000_000, "queue: must be between 1 and 1000000"),
        (not 1 <= s.batch <= 10_000, "batch: must be between 1 and 10000"),
        (not 0 <= s.dedup_window <= 3600, "dedup_window: must be between 0s and 1h"),
        (bool(s.secret and s.secret_file), "secret_file: give secret or secret_file, not both"),
    ]
    for bad, message in checks:
        if bad:
            raise ValueError(message)
    for t in s.types:
        if t not in EVENT_TYPES:
            raise ValueError(f"types: {t!r} is not one of {', '.join(EVENT_TYPES)}")
    for name, value in s.headers.items():
        if not name or any(c in name for c in " :\r\n") or any(c in value for c in "\r\n"):
            raise ValueError(f"headers: {name!r} is not a valid header")
    if s.secret_file:
        read_secret(s.secret_file)


def read_secret(path: str) -> bytes:
    """The key in ``path``; ValueError naming the file when it cannot be used."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"secret_file: {path}: {(exc.strerror or str(exc)).lower()}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise ValueError(f"secret_file: {path}: longer than {MAX_SECRET_BYTES} bytes")
    key = data.rstrip(b"\r\n")
    if not key:
        raise ValueError(f"secret_file: {path}: is empty")
    if os.stat(path).st_mode & 0o004:
        from loguru import logger

        logger.warning("webhook: secret_file {} is readable by everyone", path)
    return key


def redact(url: str) -> str:
    """The URL without user info and query (they may hold credentials), for logs and stats."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
