"""Folding of flapping: later changes of one thing within a window become one event.

After an event for a key (a path and kind, or a node) is passed on, the key's window is open
for ``window`` seconds: changes arriving meanwhile are held. When the window closes, if the
key's latest state differs from the last state passed on, one event is passed on: the latest
held one, with ``from`` set to the last state passed on and ``suppressed`` counting the held
changes it stands for besides itself; that event opens a new window. If the key is back where
it was, nothing is passed on and the held changes are counted as suppressed.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from healthmesh import Event


@dataclass
class _Window:
    until: float
    sent_to: str
    held: Event | None = None
    count: int = 0


class FlapFolder:
    """Applies the window; the caller supplies the clock (monotonic seconds)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.suppressed = 0  # changes never passed on, in total
        self._open: dict[tuple[object, ...], _Window] = {}

    def offer(self, ev: Event, now: float) -> list[Event]:
        """Events to pass on now because ``ev`` arrived (due folds first, then ``ev``)."""
        if self.window <= 0:
            return [ev]
        out = self.due(now)
        w = self._open.get(ev.key)
        if w is None:
            self._open[ev.key] = _Window(now + self.window, ev.to)
            out.append(ev)
        else:
            w.held = ev
            w.count += 1
        return out

    def due(self, now: float) -> list[Event]:
        """Events of windows that have closed by ``now``."""
        out: list[Event] = []
        for key, w in list(self._open.items()):
            if now < w.until:
                continue
            if w.held is not None and w.held.to != w.sent_to:
                ev = msgspec.structs.replace(w.held, from_=w.sent_to, suppressed=w.count - 1)
                self.suppressed += w.count - 1
                self._open[key] = _Window(now + self.window, ev.to)
                out.append(ev)
            else:
                self.suppressed += w.count
                del self._open[key]
        return out

    def next_due(self) -> float | None:
        """When the earliest open window closes."""
        return min((w.until for w in self._open.values()), default=None)
