"""State-change events: the Event type, a bounded ring with replay, and fan-out to followers.

Every path transition (per kind), every change of a node's combined state and every node
added or removed by membership becomes one ``Event`` with a sequence number that grows by one
per event. The ``EventLog`` keeps the last ``ring`` events for replay and hands each new one to
its followers through bounded memory streams: ``emit`` never waits. A follower that falls
``buffer`` events behind is cut from the live feed and catches up from the ring; if the ring
has already overwritten what it missed it gets a ``Gap`` saying how many events it lost.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Literal

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger

from healthmesh.core.model import Node, Path, PathState, ProbeResult
from healthmesh.core.state import StateStore, combine, rfc3339

#: The state of a node before it was added and after it was removed.
ABSENT = "absent"
EventType = Literal["path", "node", "component"]


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One state change, as served on /v1/events and handed to ``Output.events``.

    ``path``, ``role`` and ``kind`` are null for node (and component) events. ``component``
    is set only on component events (ok/degraded/failed of the agent's own parts);
    ``suppressed`` only by a sink that folds flapping into one event (the webhook's dedup).
    """

    seq: int
    time: str
    type: EventType
    node: str
    cluster: str
    path: str | None
    role: str | None
    kind: str | None
    from_: str = msgspec.field(name="from")
    to: str
    reason: str
    observer: str
    component: str | None = None
    suppressed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this event."""
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    @property
    def key(self) -> tuple[str, str, str, str | None, str | None, str | None, str | None]:
        """What the event is about: the same key for successive changes of one thing."""
        return (self.type, self.cluster, self.node, self.path, self.role, self.kind,
                self.component)


class Gap(msgspec.Struct, kw_only=True, tag_field="type", tag="gap"):
    """Events a follower lost: seqs ``after + 1`` to ``next - 1`` are no longer in the ring."""

    after: int
    next: int
    missed: int
    reason: str


class EventLog:
    """The agent's events: a bounded ring for replay and bounded fan-out to followers."""

    def __init__(self, observer: str, *, ring: int = 10_000, buffer: int = 1_000) -> None:
        self.observer = str(observer)
        self.buffer = buffer
        self._ring: deque[Event] = deque(maxlen=ring)
        self._times: deque[float] = deque(maxlen=ring)
        self._subs: set[MemoryObjectSendStream[Event]] = set()
        #: The seq of the last event emitted (0 before the first).
        self.seq = 0
        #: Followers cut from the live feed because they fell ``buffer`` events behind.
        self.overflows = 0

    @property
    def ring_size(self) -> int:
        return self._ring.maxlen or 0

    def __len__(self) -> int:
        return len(self._ring)

    def emit(
        self,
        type: EventType,
        *,
        node: str,
        cluster: str,
        from_: str,
        to: str,
        reason: str,
        path: str | None = None,
        role: str | None = None,
        kind: str | None = None,
        component: str | None = None,
        now: float | None = None,
    ) -> Event:
        """Record an event and offer it to every follower without waiting."""
        now = time.time() if now is None else now
        self.seq += 1
        ev = Event(
            seq=self.seq, time=rfc3339(now) or "", type=type, node=str(node), cluster=str(cluster),
            path=None if path is None else str(path), role=role, kind=kind,
            from_=str(from_), to=str(to), reason=str(reason),
            observer=self.observer, component=component,
        )
        self._ring.append(ev)
        self._times.append(now)
        for send in list(self._subs):
            try:
                send.send_nowait(ev)
            except anyio.WouldBlock:
                # Never wait for a follower: cut it off; it catches up from the ring.
                self._subs.discard(send)
                send.close()
                self.overflows += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subs.discard(send)
        return ev

    def replay(self, after: int = 0) -> list[Event]:
        """The events still in the ring with ``seq > after``, oldest first."""
        ring = self._ring
        if not ring or ring[-1].seq <= after:
            return []
        start = max(0, after + 1 - ring[0].seq)  # seqs in the ring are consecutive
        return [ring[i] for i in range(start, len(ring))]

    def after_time(self, since: float) -> int:
        """The ``after`` seq that replays every event in the ring at or after ``since``."""
        for ev, ts in zip(self._ring, self._times):
            if ts >= since:
                return ev.seq - 1
        return self.seq

    def follow(self, after: int = 0) -> Follower:
        """A follower of the events after ``after`` (replayed from the ring), then live ones."""
        return Follower(self, after)

    def _subscribe(self) -> tuple[MemoryObjectSendStream[Event], MemoryObjectReceiveStream[Event]]:
        send, recv = anyio.create_memory_object_stream[Event](self.buffer)
        self._subs.add(send)
        return send, recv

    def _unsubscribe(self, send: MemoryObjectSendStream[Event]) -> None:
        self._subs.discard(send)
        send.close()


class Follower:
    """Reads the events after a seq, in order, each once; gaps show as ``Gap``.

    Use as a context manager (``with log.follow(n) as f``), so that it stops receiving.
    """

    def __init__(self, log: EventLog, after: int) -> None:
        self.log = log
        self.last = after
        self._pending: deque[Event | Gap] = deque()
        if after > log.seq:
            self._pending.append(Gap(
                after=after, next=1, missed=0,
                reason=f"seq {after} is ahead of the agent's last seq {log.seq}: "
                "the agent restarted; replaying from its start",
            ))
            self.last = 0
        self._send, self._recv = log._subscribe()
        self._from_ring = deque(log.replay(self.last))
        self._head: Event | None = None  # received live, not handed out yet

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.log._unsubscribe(self._send)
        self._recv.close()

    def _reattach(self) -> None:
        """Cut off (or out of order): subscribe again and take what was missed from the ring."""
        self.log._unsubscribe(self._send)
        self._recv.close()
        self._send, self._recv = self.log._subscribe()
        self._from_ring = deque(self.log.replay(self.last))
        self._head = None

    def receive_nowait(self) -> Event | Gap | None:
        """The next event (or gap) if one is ready, else None."""
        if self._pending:
            item = self._pending.popleft()
            if isinstance(item, Event):
                self.last = item.seq
            return item
        while self._from_ring:
            ev = self._from_ring.popleft()
            if ev.seq <= self.last:
                continue
            if ev.seq > self.last + 1:
                # The ring no longer holds what came between: a real loss.
                gap = Gap(after=self.last, next=ev.seq, missed=ev.seq - self.last - 1,
                          reason="the ring overwrote these events before they were read")
                self._from_ring.appendleft(ev)
                self.last = ev.seq - 1
                return gap
            self.last = ev.seq
            return ev
        while True:
            try:
                if self._head is not None:
                    ev, self._head = self._head, None
                else:
                    ev = self._recv.receive_nowait()
            except anyio.WouldBlock:
                if self.log.seq > self.last:
                    # Emitted but not in the stream: handed to a receive() that was then
                    # cancelled. The ring still has it.
                    self._reattach()
                    return self.receive_nowait() if self._from_ring else None
                return None
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                self._reattach()
                return self.receive_nowait() if self._from_ring else None
            if ev.seq <= self.last:
                continue
            if ev.seq > self.last + 1:
                self._reattach()  # the ring has the missing ones (or says they are lost)
                return self.receive_nowait()
            self.last = ev.seq
            return ev

    async def receive(self) -> Event | Gap:
        """The next event (or gap), waiting for one."""
        while True:
            item = self.receive_nowait()
            if item is not None:
                return item
            try:
                ev = await self._recv.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                self._reattach()
                continue
            self._head = ev  # receive_nowait checks its order

    def batch(self, first: Event | Gap, limit: int) -> list[Event | Gap]:
        """``first`` and whatever else is ready now, up to ``limit`` items."""
        items = [first]
        while len(items) < limit:
            item = self.receive_nowait()
            if item is None:
                break
            items.append(item)
        return items


class StateEvents:
    """Turns path transitions and membership changes into path and node events."""

    def __init__(
        self,
        log: EventLog,
        nodes: Callable[[], Iterable[Node]],
        paths_of: Callable[[Node], Iterable[Path]],
        store: StateStore,
        kinds: Callable[[], Iterable[str]],
    ) -> None:
        self.log = log
        self._nodes = nodes
        self._paths_of = paths_of
        self.store = store
        self._kinds = kinds
        self._known: dict[str, Node] = {}
        self._state: dict[str, str] = {}  # node id -> combined state last reported

    def node_state(self, node: Node) -> PathState:
        """The node's combined state, as the snapshot computes it."""
        kinds = list(self._kinds())
        states: list[PathState] = []
        for path in self._paths_of(node):
            for kind in kinds:
                st = self.store.get(path.key, kind)
                if st is not None:
                    states.append(st.state)
        return combine(states)

    def path_changed(
        self, path: Path, kind: str, old: PathState, new: PathState, result: ProbeResult
    ) -> None:
        """A path changed state for ``kind``: its event, then its node's if that changed."""
        try:
            self._path_changed(path, kind, old, new, result)
        except Exception as exc:  # called from the scheduler: never take a probe task down
            logger.opt(exception=exc).error("events: recording a path change failed: {}", exc)

    def _path_changed(
        self, path: Path, kind: str, old: PathState, new: PathState, result: ProbeResult
    ) -> None:
        node = self._known.get(path.node_id)
        if node is not None:  # the node's own strings: the ring holds thousands of events
            cluster, name = node.cluster, node.name
        else:
            cluster, _, name = path.node_id.partition("/")
        if result.ok:
            reason = "recovered" if old is PathState.UNREACHABLE else "first probe succeeded"
        else:
            reason = _one_line(result.error or "probe failed")
        self.log.emit(
            "path", node=name, cluster=cluster, path=path.address, role=path.role, kind=kind,
            from_=old.value, to=new.value, reason=reason,
        )
        if node is not None:
            self._check(node, f"{path.role} {path.address} {kind}: {reason}")

    def membership_changed(self) -> None:
        """Nodes added or removed (from/to ``absent``), and nodes whose paths changed."""
        current = {n.id: n for n in self._nodes()}
        for node_id, node in self._known.items():
            if node_id not in current:
                self.log.emit(
                    "node", node=node.name, cluster=node.cluster,
                    from_=self._state.pop(node_id, PathState.UNKNOWN.value), to=ABSENT,
                    reason="removed from membership",
                )
        for node_id, node in current.items():
            if node_id not in self._known:
                state = self.node_state(node).value
                self._state[node_id] = state
                self.log.emit(
                    "node", node=node.name, cluster=node.cluster, from_=ABSENT, to=state,
                    reason="added to membership",
                )
            else:
                self._check(node, "its paths changed")
        self._known = current

    def _check(self, node: Node, reason: str) -> None:
        state = self.node_state(node).value
        old = self._state.get(node.id)
        if old is not None and old != state:
            self._state[node.id] = state
            self.log.emit(
                "node", node=node.name, cluster=node.cluster, from_=old, to=state, reason=reason,
            )


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


async def feed_output(
    log: EventLog,
    output: Any,
    *,
    timeout: float,
    batch_max: int = 500,
    linger: float = 0.02,
) -> None:
    """Hand ``output.events(batch)`` every event, in order, from the first one on.

    Runs as one task per output, so an output that is slow or raises holds up only itself;
    each call is cut off after ``timeout`` (its batch is then lost to that output).
    """
    with log.follow(0) as follower:
        while True:
            first = await follower.receive()
            await anyio.sleep(linger)  # one call for a burst of changes
            items = follower.batch(first, batch_max)
            batch: list[Event] = []
            for item in items:
                if isinstance(item, Gap):
                    logger.warning("output {}: {} events lost before it read them ({})",
                                   output.name, item.missed, item.reason)
                else:
                    batch.append(item)
            if not batch:
                continue
            try:
                with anyio.move_on_after(timeout) as scope:
                    await output.events(batch)
                if scope.cancelled_caught:
                    logger.warning("output {}: events() did not return within {:g}s; "
                                   "{} events abandoned", output.name, timeout, len(batch))
            except Exception as exc:
                logger.error("output {} failed on {} events: {}: {}",
                             output.name, len(batch), type(exc).__name__, exc)
