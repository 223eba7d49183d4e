"""Exponential backoff with jitter for plugins that reconnect (etcd followers, API watches)."""

from __future__ import annotations

import random


class Backoff:
    """0.5 s, 1 s, 2 s, ... up to ``cap``, each cut by up to 20 % so agents do not retry in step."""

    def __init__(self, cap: float, first: float = 0.5) -> None:
        self.cap, self.first, self.attempt = cap, first, 0

    def next(self) -> float:
        """The pause before the next attempt."""
        base = min(self.cap, self.first * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 32)  # 2**32 × first is past any cap
        return base * random.uniform(0.8, 1.0)

    def reset(self) -> None:
        """After a success: the next failure waits ``first`` again."""
        self.attempt = 0
