"""The webhook output: per-URL bounded queues, batched POSTs, retries with backoff, HMAC."""

from __future__ import annotations

import hashlib
import hmac
import random
import time
import uuid
from collections import deque
from typing import Any, ClassVar

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from healthmesh import (
    AgentContext,
    ComponentSettings,
    Event,
    Output,
    Snapshot,
    __version__,
    lazy_import,
)
from healthmesh.plugins.webhook.dedup import FlapFolder
from healthmesh.plugins.webhook.settings import WebhookSettings, read_secret, redact, validate

#: Loaded when the first webhook starts (most agents have none).
httpx = lazy_import("httpx")

SIGNATURE_HEADER = "X-Healthmesh-Signature"
DELIVERY_HEADER = "X-Healthmesh-Delivery"
#: Status codes worth retrying; any other non-2xx rejects the batch for good.
RETRY_STATUS = frozenset({408, 425, 429})
#: Drop warnings are logged at most this often per URL (with the running count).
DROP_LOG_EVERY = 10.0
#: Shutdown: one last attempt to deliver what is queued, bounded by this in total.
CLOSE_BOUND = 1.0

_encoder = msgspec.json.Encoder()


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def backoff(attempt: int, initial: float, cap: float) -> float:
    """Delay after failed attempt ``attempt`` (1-based): half to all of min(cap, initial·2ⁿ⁻¹)."""
    base = min(cap, initial * 2.0 ** min(attempt - 1, 60))
    return base / 2.0 + random.uniform(0.0, base / 2.0)


class Sink:
    """One URL: a bounded queue of events and the task that POSTs them in order."""

    def __init__(self, url: str, settings: WebhookSettings, secret: bytes | None) -> None:
        self.url = url
        self.name = redact(url)
        self.s = settings
        self.secret = secret
        self.queue: deque[Event] = deque()
        self.delivered = 0  # events acknowledged with a 2xx
        self.dropped = 0  # events pushed out of a full queue
        self.rejected = 0  # events in batches answered with a non-retryable status
        self.abandoned = 0  # events in batches that ran out of max_attempts
        self.failed_attempts = 0  # POSTs that failed (each retried or abandoned)
        self.last_error: str | None = None
        self._wake = anyio.Event()
        self._drop_logged = 0.0
        self._drops_unlogged = 0

    def put(self, events: list[Event]) -> None:
        cap = self.s.queue
        for ev in events:
            if len(self.queue) >= cap:
                self.queue.popleft()
                self.dropped += 1
                self._drops_unlogged += 1
            self.queue.append(ev)
        if self._drops_unlogged and time.monotonic() - self._drop_logged >= DROP_LOG_EVERY:
            logger.warning("webhook {}: queue full ({} events): dropped the {} oldest "
                           "({} in total)", self.name, cap, self._drops_unlogged, self.dropped)
            self._drop_logged, self._drops_unlogged = time.monotonic(), 0
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        return {"queued": len(self.queue), "delivered": self.delivered, "dropped": self.dropped,
                "rejected": self.rejected, "abandoned": self.abandoned,
                "failed_attempts": self.failed_attempts, "last_error": self.last_error}

    def take(self) -> list[Event]:
        n = min(self.s.batch, len(self.queue))
        return [self.queue.popleft() for _ in range(n)]

    async def run(self, client: httpx.AsyncClient) -> None:
        while True:
            if not self.queue:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            await self.deliver(client, self.take())

    def request(self, batch: list[Event]) -> tuple[bytes, dict[str, str]]:
        body = _encoder.encode({"events": batch})
        headers = {
            **self.s.headers,
            "content-type": "application/json",
            "user-agent": f"healthmesh/{__version__}",
            DELIVERY_HEADER: uuid.uuid4().hex,  # the same on every retry of this batch
        }
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        return body, headers

    async def deliver(self, client: httpx.AsyncClient, batch: list[Event]) -> bool:
        """POST ``batch`` until it is accepted, rejected or out of attempts."""
        body, headers = self.request(batch)
        attempt = 0
        while True:
            attempt += 1
            status, retry_after, error = await self.post(client, body, headers)
            if status is not None and 200 <= status < 300:
                self.delivered += len(batch)
                if self.last_error is not None:
                    logger.info("webhook {}: delivering again", self.name)
                self.last_error = None
                return True
            if status is not None and status < 500 and status not in RETRY_STATUS:
                self.rejected += len(batch)
                self.last_error = error
                logger.error("webhook {}: {}; {} events dropped", self.name, error, len(batch))
                return False
            self.failed_attempts += 1
            if self.last_error is None or attempt == 1:
                logger.warning("webhook {}: {}; retrying", self.name, error)
            self.last_error = error
            if self.s.max_attempts and attempt >= self.s.max_attempts:
                self.abandoned += len(batch)
                logger.error("webhook {}: {} events given up after {} attempts: {}",
                             self.name, len(batch), attempt, error)
                return False
            delay = backoff(attempt, self.s.retry_initial, self.s.retry_max)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.s.retry_max))
            await anyio.sleep(delay)

    async def post(
        self, client: httpx.AsyncClient, body: bytes, headers: dict[str, str]
    ) -> tuple[int | None, float | None, str]:
        """One attempt: (status or None, Retry-After seconds, error text)."""
        timeout = self.s.timeout
        try:
            with anyio.fail_after(timeout):
                async with client.stream("POST", self.url, content=body, headers=headers,
                                         timeout=timeout) as resp:
                    status = resp.status_code
                    retry = resp.headers.get("retry-after", "")
        except TimeoutError:
            return None, None, f"no answer within {timeout:g}s"
        except httpx.HTTPError as exc:
            return None, None, f"{type(exc).__name__}: {exc or 'connection failed'}"
        after = float(retry) if retry.isdigit() else None
        return status, after, f"HTTP {status}"


class WebhookOutput(Output):
    """POSTs events, in batches, to every configured URL."""

    name: ClassVar[str] = "webhook"
    Settings: ClassVar[type[ComponentSettings]] = WebhookSettings

    def __init__(self, settings: WebhookSettings, context: AgentContext) -> None:
        super().__init__(settings, context)
        self.types = frozenset(settings.types)
        self.secret: bytes | None = settings.secret.encode() if settings.secret else None
        self.sinks = [Sink(url, settings, self.secret) for url in settings.urls]
        self.folder = FlapFolder(float(settings.dedup_window))
        self.client: httpx.AsyncClient | None = None

    @classmethod
    def validate_settings(cls, settings: WebhookSettings, config: Any) -> None:
        validate(settings)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self.settings.secret_file:
            try:
                self.secret = read_secret(self.settings.secret_file)
            except ValueError as exc:
                raise OSError(str(exc)) from None
            for sink in self.sinks:
                sink.secret = self.secret
        # Proxies from the environment are not used: the URLs say where events go.
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as client:
            self.client = client
            try:
                async with anyio.create_task_group() as tg:
                    for sink in self.sinks:
                        tg.start_soon(sink.run, client)
                    if self.folder.window > 0:
                        tg.start_soon(self._fold_loop)
                    task_status.started()
            finally:
                self.client = None

    async def _fold_loop(self) -> None:
        tick = min(0.1, self.folder.window / 4)
        while True:
            await anyio.sleep(tick)
            self._put(self.folder.due(time.monotonic()))

    async def events(self, batch: list[Event]) -> None:
        now = time.monotonic()
        out: list[Event] = []
        for ev in batch:
            if ev.type in self.types:
                out.extend(self.folder.offer(ev, now))
        self._put(out)

    def _put(self, events: list[Event]) -> None:
        if events:
            for sink in self.sinks:
                sink.put(events)

    def stats(self) -> dict[str, Any]:
        return {"urls": {s.name: s.stats() for s in self.sinks},
                "suppressed": self.folder.suppressed}

    async def close(self, snapshot: Snapshot) -> None:
        """One last attempt each for what is still queued, bounded by ``CLOSE_BOUND``."""
        pending = [s for s in self.sinks if s.queue]
        if not pending:
            return
        with anyio.move_on_after(CLOSE_BOUND):
            async with httpx.AsyncClient(trust_env=False) as client:
                for sink in pending:
                    while sink.queue:
                        batch = sink.take()
                        body, headers = sink.request(batch)
                        status, _, _ = await sink.post(client, body, headers)
                        if status is None or not 200 <= status < 300:
                            break
                        sink.delivered += len(batch)
        left = sum(len(s.queue) for s in self.sinks)
        if left:
            logger.warning("webhook: {} queued events not delivered at shutdown", left)
