"""Paces probes evenly over the interval, bounds each by a timeout, and re-probes to confirm.

Every (path, kind) pair is a slot. Each round walks the slots in an agent-specific order,
starting one every ``interval / slots`` seconds (the first round as fast as ``max_rate``
allows, so results exist seconds after start). A failure starts ``confirm_probes``
re-probes ``confirm_spacing`` apart, so a dead path is settled in about a second instead
of after ``failure_threshold`` whole intervals. Slots added mid-round are probed promptly
(rate-capped); removed slots stop at once.

Confirmations are paced by one task for all slots (a FIFO of due re-probes: the spacing is
the same for every slot, so the queue stays in due order), and the re-probes of batched
kinds due at one wake-up go out in one ``probe_many``. Their number is bounded over the
whole agent: at most ``confirm_max_inflight`` re-probes in flight and
``confirm_max_per_round`` started per round. A loop that falls behind makes probes time out,
and each false failure would start ``confirm_probes`` more probes, more load and more
timeouts; with the bounds reached, a failed path instead waits for its next scheduled probe
(the re-probes not sent are counted in ``lateness()["confirm_skipped"]``).

Whatever the settings, the work in flight stays bounded: a slot never has more than
``MAX_SCHEDULED`` scheduled probes running (a probe due while they run is skipped and
counted, not queued), its re-probes are capped at ``confirm_probes`` (and all slots'
together by the bounds above), rounds start at
least ``MIN_ROUND_GAP`` apart, and at most ``MAX_OPEN_ROUNDS`` rounds wait for results
(missed rounds are skipped, never caught up).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus
from loguru import logger

from healthmesh.core.components import Probe
from healthmesh.core.config import ProbingSettings
from healthmesh.core.model import Path, PathState, ProbeResult
from healthmesh.core.state import KindState, StateStore
from healthmesh.core.units import format_duration

SlotKey = tuple[tuple[str, str, str], str]
#: Extra time a probe gets past its timeout before the scheduler cancels it.
GRACE = 0.1
#: Scheduled probes of one slot that may run at once: two, so that a probe taking its
#: whole timeout (= interval) never makes the next round skip the slot.
MAX_SCHEDULED = 2
#: Re-probes of one slot in flight at once, whatever ``confirm_probes`` says.
MAX_CONFIRMING = 100
#: Rounds started but not finished; past this the round loop waits (skipping rounds).
MAX_OPEN_ROUNDS = 8
#: Rounds start at least this far apart, even when a (programmatic) interval is shorter.
MIN_ROUND_GAP = 0.01
#: Lateness of this many most recent scheduled starts is kept for ``lateness()``.
LAG_SAMPLES = 8192
#: A scheduled start later than this counts in ``lateness()["late"]``.
LATE_AFTER = 0.1


@dataclass(eq=False, slots=True)
class Slot:
    """One path probed by one kind.

    Slotted, with its key made once: an agent keeps 20,000 of these at 5,000 peers, and
    the key tuple is shared with the scheduler's and the state store's dicts.
    """

    path: Path
    kind: str
    order: int = 0
    every: int = 1  # probed in one round out of ``every`` (nodes with a longer interval)
    confirming: bool = False
    removed: bool = False
    scheduled: int = 0  # scheduled probes in flight (rounds, prompt walks, probe_all)
    reprobes: int = 0  # confirmation re-probes in flight
    confirm_left: int = 0  # re-probes the running confirmation may still start
    #: ``(path.key, kind)``; the path may be replaced by an equal-keyed one, never re-keyed.
    key: SlotKey = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.key is None:
            self.key = (self.path.key, self.kind)


@dataclass
class RoundInfo:
    """Accounting of one round: how many of its slots it still waits for, and when it started.

    A count, not a set of slot keys (20,000 keys at 5,000 peers, one set per open round):
    each slot a round lists is accounted for exactly once, when its probe settles, when the
    walk passes it removed, or when it is skipped as still busy.
    """

    number: int
    started: float  # monotonic
    started_wall: float
    pending: int = 0
    launched_all: bool = False
    finished: float | None = None

    @property
    def duration(self) -> float | None:
        return None if self.finished is None else self.finished - self.started


class Scheduler:
    """Runs every slot's probes on schedule, isolated from each other."""

    def __init__(
        self,
        probing: ProbingSettings,
        probes: dict[str, Probe],
        store: StateStore,
        *,
        seed: str = "",
        on_round: Callable[[RoundInfo], Awaitable[None]] | None = None,
        on_change: Callable[[], None] | None = None,
        on_transition: Callable[[Path, str, PathState, PathState, ProbeResult], None]
        | None = None,
    ) -> None:
        self.probing = probing
        self.probes = probes
        self.store = store
        self.seed = seed
        self.on_round = on_round
        #: Called (synchronously) whenever a path changes state, so reports need not wait
        #: for the end of the round.
        self.on_change = on_change
        #: Called (synchronously) with (path, kind, old, new, result) for every change.
        self.on_transition = on_transition
        self.slots: dict[SlotKey, Slot] = {}
        self._sorted: list[Slot] | None = None  # slots by order; None: to sort again
        self.rounds: list[RoundInfo] = []
        self.completed_rounds = 0
        self.last_round: RoundInfo | None = None
        self._tg: TaskGroup | None = None
        self._prompt: list[Slot] = []
        self._prompt_event = anyio.Event()
        self._inflight: dict[SlotKey, int] = {}
        self._idle_waiters: list[tuple[set[SlotKey], anyio.Event]] = []
        #: Probes not started because the slot was still busy (scheduled or re-probes).
        self.skipped = 0
        #: Round starts skipped because earlier rounds had not finished.
        self.skipped_rounds = 0
        self._round_finished = anyio.Event()
        # How late round probes start against their schedule (seconds): the latest
        # LAG_SAMPLES in a ring, plus counts since start.
        self._lags = array("d", bytes(8 * LAG_SAMPLES))
        self._lag_pos = 0
        self._lag_n = 0
        self.starts = 0
        self.late_starts = 0
        self.max_lag = 0.0
        self._on_round_busy = False
        self._on_round_next: RoundInfo | None = None
        # Confirmations: (due, slot) in due order, the task that serves them, and the bounds.
        self._confirm_queue: deque[tuple[float, Slot]] = deque()
        self._confirm_wake = anyio.Event()
        #: Confirmation re-probes in flight over all slots, and started this round.
        self.reprobes_inflight = 0
        self.round_reprobes = 0
        #: Re-probes not sent because ``confirm_max_inflight`` or ``confirm_max_per_round``
        #: was reached (the path waits for its next scheduled probe instead).
        self.confirm_skipped = 0

    # -- membership ---------------------------------------------------------------------

    def set_paths(self, paths: list[Path]) -> None:
        """Make the slot set match ``paths`` × the kinds that support them."""
        wanted: dict[SlotKey, Path] = {}
        for path in paths:
            for kind, probe in self.probes.items():
                if probe.supports(path):
                    wanted[(path.key, kind)] = path
        for key in list(self.slots):
            if key not in wanted:
                slot = self.slots.pop(key)
                slot.removed = True
                self.store.retire(*key)
        added: list[Slot] = []
        self._sorted = None
        for key, path in wanted.items():
            slot = self.slots.get(key)
            if slot is None:
                slot = Slot(path, key[1], order=self._order(key), key=key)
                self.slots[key] = slot
                self.store.ensure_slot(key)
                added.append(slot)
            elif slot.path != path:  # primary flag or interval changed
                slot.path = path
            slot.every = max(1, round((path.interval or 0.0) / self.probing.interval))
        if added and self._tg is not None:
            self._prompt.extend(added)
            self._prompt_event.set()
        self._check_rounds()

    def _ordered(self) -> list[Slot]:
        """Every slot in probing order, sorted once per change of the slot set."""
        if self._sorted is None:
            self._sorted = sorted(self.slots.values(), key=lambda s: s.order)
        return self._sorted

    def _order(self, key: SlotKey) -> int:
        digest = hashlib.blake2b(repr((self.seed, key)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    # -- running ------------------------------------------------------------------------

    async def run(
        self, *, rounds: bool = True, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Probe forever: round after round, plus prompt probes of added slots.

        With ``rounds=False`` only ``probe_all`` probes (``run --once``).
        """
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._prompt.clear()  # the first round covers every slot known now
            tg.start_soon(self._prompt_loop)
            tg.start_soon(self._confirm_loop)
            task_status.started()
            if not rounds:
                await anyio.sleep_forever()
            number = 0
            interval = max(self.probing.interval, MIN_ROUND_GAP)
            while True:
                await self._wait_for_open_rounds(interval)
                start = anyio.current_time()
                self.round_reprobes = 0
                order = [
                    s
                    for s in self._ordered()
                    if number == 0 or s.every == 1 or (number + s.order) % s.every == 0
                ]
                rnd = RoundInfo(number, start, time.time(), len(order))
                self.rounds.append(rnd)
                if order:
                    spacing = interval / len(order)
                    if number == 0:
                        spacing = min(spacing, 1.0 / self.probing.max_rate)
                    await self._walk(order, start, spacing, rnd)
                rnd.launched_all = True
                self._check_rounds()
                number += 1
                await _sleep_until(start + interval)
                # Always let other tasks run between rounds, even when the walk overran.
                await anyio.lowlevel.checkpoint()

    async def _wait_for_open_rounds(self, interval: float) -> None:
        """Hold the next round while ``MAX_OPEN_ROUNDS`` rounds wait for results.

        The rounds missed meanwhile are counted in ``skipped_rounds`` and not caught up.
        """
        if len(self.rounds) < MAX_OPEN_ROUNDS:
            return
        since = anyio.current_time()
        while len(self.rounds) >= MAX_OPEN_ROUNDS:
            await self._round_finished.wait()
        missed = int((anyio.current_time() - since) / interval)
        if missed:
            self.skipped_rounds += missed
            logger.debug("{} rounds skipped: earlier rounds were still open", missed)

    async def _walk(
        self, order: list[Slot], start: float, spacing: float, rnd: RoundInfo | None
    ) -> None:
        """Start ``order`` one every ``spacing`` seconds (jittered).

        Slots of batched kinds falling due within one ``tick`` of each other are handed
        over together, from one wake-up, in one ``probe_many`` call: waking once per probe is
        what costs CPU at thousands of probes per second, not the probes. How the kind runs
        them is its own business (icmp sends them at once; http runs them as a train, one
        after another, because connections started together measure each other's
        queueing). Other kinds keep a start of their own.
        """
        batched = {kind: probe.batched for kind, probe in self.probes.items()}
        kinds = {s.kind for s in order}
        # Merge starts only when they are closer together than a tick: at a few probes a
        # second every probe keeps its own evenly spaced start.
        tick = self.probing.tick if spacing < self.probing.tick else 0.0
        if all(batched.get(k, False) for k in kinds):
            await self._walk_due(order, None, start, spacing, tick, rnd)
        elif not any(batched.get(k, False) for k in kinds):
            await self._walk_due(order, None, start, spacing, 0.0, rnd)
        else:  # both: each part keeps its place (its due time) in the whole order
            merged = [i for i, s in enumerate(order) if batched.get(s.kind, False)]
            single = [i for i, s in enumerate(order) if not batched.get(s.kind, False)]
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._walk_due, order, merged, start, spacing, tick, rnd)
                tg.start_soon(self._walk_due, order, single, start, spacing, 0.0, rnd)

    async def _walk_due(
        self, order: list[Slot], positions: list[int] | None, start: float, spacing: float,
        tick: float, rnd: RoundInfo | None,
    ) -> None:
        """Start the slots of ``order`` at ``positions`` (all when None), each when due.

        The slot at position ``i`` is due at ``start + (i ± jitter) × spacing``, drawn as the
        walk reaches it: no list of 20,000 due times held for the whole round.
        """
        jitter = self.probing.jitter
        uniform = random.uniform
        n = len(order) if positions is None else len(positions)

        def due_of(j: int) -> float:
            i = j if positions is None else positions[j]
            return start + (i + (uniform(-jitter, jitter) if i else 0.0)) * spacing

        j = 0
        nxt = due_of(0) if n else 0.0
        while j < n:
            due = nxt
            await _sleep_until(due)
            now = anyio.current_time()
            self.store.telemetry.started_late(now - due)
            horizon = max(now, due) + tick
            batch: list[Slot] = []
            while j < n and nxt < horizon:
                slot = order[j if positions is None else positions[j]]
                if not slot.removed:
                    batch.append(slot)
                    if rnd is not None:
                        self._note_lag(now - nxt)
                elif rnd is not None:
                    rnd.pending -= 1  # removed since the round began: nothing to wait for
                j += 1
                if j < n:
                    nxt = due_of(j)
            self._launch_batch(batch, rnd)

    async def _prompt_loop(self) -> None:
        gap = 1.0 / self.probing.max_rate
        while True:
            await self._prompt_event.wait()
            self._prompt_event = anyio.Event()
            batch, self._prompt = self._prompt, []
            batch.sort(key=lambda s: s.order)
            await self._walk(batch, anyio.current_time(), gap, None)

    def _launch_batch(self, slots: list[Slot], rnd: RoundInfo | None) -> None:
        """Start probes of ``slots``: one task per batched kind, else one per slot.

        A slot already running ``MAX_SCHEDULED`` scheduled probes is skipped (and counted):
        queueing it would only pile up probes that a hanging peer or plugin never ends.
        """
        assert self._tg is not None
        by_kind: dict[str, list[Slot]] = {}
        for slot in slots:
            if slot.scheduled >= MAX_SCHEDULED:
                self.skipped += 1
                if rnd is not None:
                    rnd.pending -= 1
                continue
            slot.scheduled += 1
            self._inflight[slot.key] = self._inflight.get(slot.key, 0) + 1
            if self.probes[slot.kind].batched:
                by_kind.setdefault(slot.kind, []).append(slot)
            else:
                self._tg.start_soon(self._probe_task, slot, rnd)
        for kind, group in by_kind.items():
            self._tg.start_soon(self._probe_batch_task, kind, group, rnd)

    async def _probe_task(self, slot: Slot, rnd: RoundInfo | None) -> None:
        result: ProbeResult | None = None
        try:
            result = await self.probe_once(slot.path, slot.kind)
        finally:
            self._settle(slot, result, rnd)

    async def _probe_batch_task(self, kind: str, slots: list[Slot], rnd: RoundInfo | None) -> None:
        results: list[ProbeResult] | None = None
        try:
            results = await self.probe_batch([s.path for s in slots], kind)
        finally:
            for i, slot in enumerate(slots):
                self._settle(slot, None if results is None else results[i], rnd)

    def _settle(self, slot: Slot, result: ProbeResult | None, rnd: RoundInfo | None) -> None:
        """Record a scheduled probe's result, start a confirmation on a fresh failure."""
        slot.scheduled -= 1
        try:
            if result is None or slot.removed:
                return
            state = self._record(slot, result)
            if (
                not result.ok
                and not slot.confirming
                and state is not None
                and state.state is not PathState.UNREACHABLE
                and state.consecutive_failures > 0
                and self.probing.confirm_probes > 0
            ):
                self._start_confirmation(slot)
        finally:
            self._done(slot.key)
            if rnd is not None:
                rnd.pending -= 1
                self._check_rounds()

    def _confirm_room(self) -> bool:
        """Whether the agent-wide bounds on re-probes allow one more now."""
        p = self.probing
        return (
            self.reprobes_inflight < p.confirm_max_inflight
            and self.round_reprobes < p.confirm_max_per_round
        )

    def _start_confirmation(self, slot: Slot) -> None:
        """Queue ``confirm_probes`` re-probes of ``slot``, the first ``confirm_spacing`` from now.

        The re-probes overlap (each runs under its own timeout), so a dead path collects
        ``failure_threshold`` failures about one timeout after its first failure, while a
        lost packet is cleared by the first re-probe that gets through. Starting stops at the
        first success or once the path is unreachable; the slot may start a new confirmation
        as soon as this one has started its last re-probe. With the agent-wide bounds
        reached, no confirmation starts: the path waits for its next scheduled probe.
        """
        if not self._confirm_room():
            self.confirm_skipped += self.probing.confirm_probes
            return
        slot.confirming = True
        slot.confirm_left = self.probing.confirm_probes
        self._inflight[slot.key] = self._inflight.get(slot.key, 0) + 1
        if not self._confirm_queue:
            self._confirm_wake.set()
        self._confirm_queue.append(
            (anyio.current_time() + self.probing.confirm_spacing, slot)
        )

    def _end_confirmation(self, slot: Slot) -> None:
        slot.confirming = False
        slot.confirm_left = 0
        self._done(slot.key)

    async def _confirm_loop(self) -> None:
        """Start every queued re-probe when it is due: one task for all confirmations."""
        queue = self._confirm_queue
        try:
            while True:
                if not queue:
                    self._confirm_wake = anyio.Event()
                    await self._confirm_wake.wait()
                    continue
                await _sleep_until(queue[0][0])
                now = anyio.current_time()
                by_kind: dict[str, list[Slot]] = {}
                while queue and queue[0][0] <= now + 0.0005:
                    self._confirm_step(queue.popleft()[1], now, by_kind)
                for kind, group in by_kind.items():
                    self._launch_reprobes(kind, group)
        finally:
            while queue:  # cancelled (the scheduler stops): release the waiting slots
                self._end_confirmation(queue.popleft()[1])

    def _confirm_step(self, slot: Slot, now: float, by_kind: dict[str, list[Slot]]) -> None:
        """One due re-probe of ``slot``: start it (into ``by_kind``), skip it, or stop."""
        st = self.store.get(slot.path.key, slot.kind)
        if (
            slot.removed
            or st is None
            or st.consecutive_failures == 0
            or st.state is PathState.UNREACHABLE
        ):
            self._end_confirmation(slot)
            return
        if slot.reprobes >= min(self.probing.confirm_probes, MAX_CONFIRMING):
            self.skipped += 1  # earlier re-probes still hang: do not add more
        elif not self._confirm_room():
            # Bounded: drop the rest; the path waits for its next scheduled probe.
            self.confirm_skipped += slot.confirm_left
            self._end_confirmation(slot)
            return
        else:
            slot.reprobes += 1
            self.reprobes_inflight += 1
            self.round_reprobes += 1
            self._inflight[slot.key] = self._inflight.get(slot.key, 0) + 1
            by_kind.setdefault(slot.kind, []).append(slot)
        slot.confirm_left -= 1
        if slot.confirm_left > 0:
            self._confirm_queue.append((now + self.probing.confirm_spacing, slot))
        else:
            self._end_confirmation(slot)

    def _launch_reprobes(self, kind: str, slots: list[Slot]) -> None:
        """Start re-probes due together: one ``probe_many`` for a batched kind."""
        assert self._tg is not None
        probe = self.probes.get(kind)
        if probe is not None and probe.batched and len(slots) > 1:
            self._tg.start_soon(self._reprobe_batch, kind, slots)
        else:
            for slot in slots:
                self._tg.start_soon(self._reprobe_one, slot)

    async def _reprobe_one(self, slot: Slot) -> None:
        result: ProbeResult | None = None
        try:
            result = await self.probe_once(slot.path, slot.kind)
        finally:
            self._reprobe_done(slot, result)

    async def _reprobe_batch(self, kind: str, slots: list[Slot]) -> None:
        results: list[ProbeResult] | None = None
        try:
            results = await self.probe_batch([s.path for s in slots], kind)
        finally:
            for i, slot in enumerate(slots):
                self._reprobe_done(slot, None if results is None else results[i])

    def _reprobe_done(self, slot: Slot, result: ProbeResult | None) -> None:
        slot.reprobes -= 1
        self.reprobes_inflight -= 1
        try:
            if result is not None and not slot.removed:
                self._record(slot, result)
        finally:
            self._done(slot.key)

    def _record(self, slot: Slot, result: ProbeResult) -> KindState | None:
        """Fold a result into the slot's state; log every change of reachability."""
        before = self.store.get(slot.path.key, slot.kind)
        old = None if before is None else before.state
        st = self.store.record(slot.path.key, slot.kind, result)
        if st is not None and old is not None and st.state is not old:
            p = slot.path
            level = "DEBUG" if old is PathState.UNKNOWN and result.ok else "INFO"
            logger.log(
                level,
                "path {} {} {} {}: {} -> {}{}",
                p.node_id,
                p.role,
                p.address,
                slot.kind,
                old.value,
                st.state.value,
                "" if result.ok else f": {result.error}",
            )
            if self.on_transition is not None:
                self.on_transition(p, slot.kind, old, st.state, result)
            if self.on_change is not None:
                self.on_change()
        return st

    async def probe_once(self, path: Path, kind: str) -> ProbeResult:
        """Run one probe under its timeout; an exception or overrun becomes a failed result."""
        return (await self._bounded(kind, [path], single=True))[0]

    async def probe_batch(self, paths: list[Path], kind: str) -> list[ProbeResult]:
        """``probe_many`` of a batched kind, bounded and isolated like ``probe_once``."""
        return await self._bounded(kind, paths, single=False)

    async def _bounded(self, kind: str, paths: list[Path], *, single: bool) -> list[ProbeResult]:
        """One probe (or batch) of ``kind`` under its timeout; never raises for the plugin.

        An exception becomes a failed result with its text, an overrun ``timeout after``.
        Kinds not shipped with healthmesh are ``IsolatedProbe``s (core/isolation.py): they
        run on a loop of their own, so one that blocks or swallows cancellation cannot stall
        this call past its deadline; the agent switches such a kind off (``disable_kind``).
        """
        probe = self.probes.get(kind)
        timeout = self.probing.timeout
        started = time.time()
        results: list[Any]
        if probe is None:  # switched off while this probe was queued
            return [ProbeResult(False, None, f"probe kind {kind} is switched off", {}, started,
                                started)] * len(paths)
        try:
            with anyio.move_on_after(timeout + GRACE) as scope:
                if single:
                    results = [await probe.probe(paths[0], timeout)]
                else:
                    results = list(await probe.probe_many(paths, timeout))
            if scope.cancelled_caught:
                results = [ProbeResult.failure(f"timeout after {format_duration(timeout)}")]
                results *= len(paths)
            elif len(results) != len(paths):
                results = [ProbeResult.failure(f"{kind} probe returned {len(results)} results")]
                results *= len(paths)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:  # a plugin's bug is a failed probe, never a dead agent
            logger.opt(exception=exc).debug("{} probe of {} raised", kind, paths[0].address)
            results = [ProbeResult.failure(f"{kind} probe raised {type(exc).__name__}: {exc}")]
            results *= len(paths)
        finished = time.time()
        # Built directly rather than with dataclasses.replace: this runs for every probe.
        return [
            ProbeResult(r.ok, r.rtt, r.error, r.details, started, finished)
            if isinstance(r, ProbeResult)
            else ProbeResult(
                False, None, f"{kind} probe returned {type(r).__name__}", {}, started, finished
            )
            for r in results
        ]

    def disable_kind(self, kind: str) -> None:
        """Stop probing ``kind``: it leaves ``probes``; the caller then re-sets the paths.

        Queued prompt probes of the kind are dropped; ones already started end under their
        own deadlines (``_bounded``).
        """
        self.probes.pop(kind, None)
        self._prompt = [s for s in self._prompt if s.kind != kind]

    def _note_lag(self, lag: float) -> None:
        """Account one round start ``lag`` seconds after its due time (early counts as 0)."""
        if lag < 0.0:
            lag = 0.0
        self._lags[self._lag_pos] = lag
        self._lag_pos = (self._lag_pos + 1) % LAG_SAMPLES
        if self._lag_n < LAG_SAMPLES:
            self._lag_n += 1
        self.starts += 1
        if lag > LATE_AFTER:
            self.late_starts += 1
        if lag > self.max_lag:
            self.max_lag = lag

    def lateness(self) -> dict[str, Any]:
        """How late round probes started against their schedule (the snapshot's ``scheduler``).

        p50/p99/max over the latest ``LAG_SAMPLES`` starts; ``starts``, ``late`` (later than
        ``LATE_AFTER``) and ``max_ms_ever`` since the agent started; probes and rounds skipped;
        confirmation re-probes in flight now and those not sent because of the bounds.
        """
        n = self._lag_n
        recent = sorted(self._lags[:n]) if n else []
        return {
            "lag_p50_ms": _ms(recent[int(0.5 * (n - 1))]) if n else None,
            "lag_p99_ms": _ms(recent[int(0.99 * (n - 1))]) if n else None,
            "lag_max_ms": _ms(recent[-1]) if n else None,
            "lag_samples": n,
            "starts": self.starts,
            "late": self.late_starts,
            "lag_max_ms_ever": _ms(self.max_lag),
            "skipped": self.skipped,
            "skipped_rounds": self.skipped_rounds,
            "reprobes_inflight": self.reprobes_inflight,
            "confirm_skipped": self.confirm_skipped,
        }

    def _done(self, key: SlotKey) -> None:
        left = self._inflight.get(key, 1) - 1
        if left <= 0:
            self._inflight.pop(key, None)
            for keys, event in self._idle_waiters:
                keys.discard(key)
                if not keys:
                    event.set()
        else:
            self._inflight[key] = left

    @property
    def inflight(self) -> int:
        """Probes and confirmation runs in flight, over all slots."""
        return sum(self._inflight.values())

    def _check_rounds(self) -> None:
        finished = False
        while self.rounds and self.rounds[0].launched_all and not self.rounds[0].pending:
            rnd = self.rounds.pop(0)
            rnd.finished = anyio.current_time()
            self.completed_rounds += 1
            self.last_round = rnd
            finished = True
            if self.on_round is not None and self._tg is not None:
                if self._on_round_busy:
                    # One callback at a time: a burst of rounds is reported by its latest.
                    self._on_round_next = rnd
                else:
                    self._on_round_busy = True
                    self._tg.start_soon(self._report_rounds, rnd)
        if finished:
            self._round_finished.set()
            self._round_finished = anyio.Event()

    async def _report_rounds(self, rnd: RoundInfo) -> None:
        assert self.on_round is not None
        try:
            while True:
                await self.on_round(rnd)
                if self._on_round_next is None:
                    break
                rnd, self._on_round_next = self._on_round_next, None
        finally:
            self._on_round_busy = False
            self._on_round_next = None

    async def probe_all(self) -> None:
        """Probe every slot now (rate-capped) and wait for the results and their confirmations.

        Needs ``run`` to be running (it owns the task group).
        """
        order = sorted(self.slots.values(), key=lambda s: s.order)
        if not order:
            return
        gap = 1.0 / self.probing.max_rate
        p = self.probing
        bound = len(order) * gap + p.timeout + GRACE
        bound += p.confirm_probes * p.confirm_spacing + p.timeout + GRACE + 1.0
        event = anyio.Event()
        waiting = {s.key for s in order}
        waiter = (waiting, event)
        self._idle_waiters.append(waiter)
        try:
            with anyio.move_on_after(bound):
                await self._walk(order, anyio.current_time(), gap, None)
                # Slots still busy with earlier probes are counted as they finish.
                waiting &= set(self._inflight)
                if waiting:
                    await event.wait()
        finally:
            self._idle_waiters = [w for w in self._idle_waiters if w is not waiter]

    @property
    def round_duration_bound(self) -> float:
        """How long a steady round may take: interval + timeout (+ scheduler grace)."""
        return self.probing.interval + self.probing.timeout + GRACE


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


async def _sleep_until(deadline: float) -> None:
    delay = deadline - anyio.current_time()
    if delay > 0.0005:
        await anyio.sleep(delay)


def cilium_interval(ips: int) -> float:
    """Cilium's stretched interval, 60 s × ln(1 + IPs), for comparison in docs and benches."""
    return 60.0 * math.log1p(ips)
