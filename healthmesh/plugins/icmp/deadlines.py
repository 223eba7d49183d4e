"""Probe deadlines on one event-loop timer instead of one timer per probe.

Probes share a timeout, so their deadlines arrive in the order they were set: a FIFO queue
with a single timer armed for its head costs O(1) per probe, where a timer each would mean a
heap push and pop per probe. A deadline earlier than the queue's tail (a probe with a
shorter timeout) gets its own timer.
"""

from __future__ import annotations

import asyncio
from collections import deque


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Deadlines:
    """Resolves each future (with None) when its deadline on the loop's clock passes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queue: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, deadline: float, future: asyncio.Future[None]) -> None:
        """Resolve ``future`` at ``deadline`` unless it is done by then."""
        queue = self._queue
        if queue and deadline < queue[-1][0]:
            self.loop.call_at(deadline, _expire, future)
            return
        queue.append((deadline, future))
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        queue = self._queue
        now = self.loop.time() + 1e-4  # asyncio may run a timer a hair early
        while queue and queue[0][0] <= now:
            _expire(queue.popleft()[1])
        self._timer = self.loop.call_at(queue[0][0], self._fire) if queue else None

    def close(self) -> None:
        """Resolve everything still waiting (the probe is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            _expire(self._queue.popleft()[1])

    def __len__(self) -> int:
        return len(self._queue)
