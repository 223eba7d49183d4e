"""Keeps third-party probe kinds and blocked event loops from taking the agent down.

* ``IsolatedProbe`` runs a probe kind that does not come with healthmesh on an event loop of
  its own, in its own thread. A coroutine that blocks (``time.sleep``, blocking I/O), or
  swallows cancellation, then stalls only that loop: the agent's loop — the responder, the
  API, the scheduler — goes on. The agent's side of every call is an ordinary awaitable
  that cancellation ends at once, whatever the plugin does with its own cancellation.
  A kind whose loop stays blocked longer than ``BLOCK_LIMIT``, or that leaves
  ``ORPHAN_LIMIT`` cancelled calls running, is reported through ``on_fault`` (the agent
  switches it off).
* ``LoopWatchdog`` is a thread that watches the agent's own loop (a heartbeat task) and each
  isolated kind's loop, warns when the agent's loop is blocked, and ends the process after
  a shutdown deadline when a clean shutdown does not finish (``arm``).

Built-in kinds run on the agent's loop: they are part of healthmesh, and a thread hop per
probe would cost CPU at thousands of probes per second (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import anyio
from loguru import logger

from healthmesh.core.components import Probe
from healthmesh.core.model import Path, ProbeResult

T = TypeVar("T")

#: An isolated kind's loop blocked this long is a fault: the kind is switched off.
BLOCK_LIMIT = 1.0
#: Calls still running ORPHAN_AGE s after their cancellation (the plugin swallowed it)
#: before it is a fault.
ORPHAN_LIMIT = 2
ORPHAN_AGE = 1.0
#: ``__aenter__`` of a probe kind may take this long (opening sockets, clients).
ENTER_DEADLINE = 5.0
#: ``__aexit__`` of an isolated kind may take this long at shutdown.
EXIT_DEADLINE = 1.0
#: Time the tasks left on an isolated kind's loop get to end when it stops.
STOP_WAIT = 0.2
#: Heartbeat period of isolated kinds' loops, and the watchdog thread's check period.
BEAT = 0.1
#: Heartbeat period of the agent's own loop (a wake-up costs ~150 µs: keep them rare).
MAIN_BEAT = 0.25
#: The agent's own loop blocked this long is logged as a warning.
WARN_BLOCKED = 1.0


class _Beating:
    """A loop with a heartbeat: ``beat`` is the monotonic time of its last tick."""

    beat: float = 0.0


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (a cross-thread hand-off costs less), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ProbeLoop(_Beating):
    """An asyncio event loop running in a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = _new_loop()
        self.beat = time.monotonic()
        started = threading.Event()
        self.thread = threading.Thread(
            target=self._main, args=(started,), name=f"healthmesh-probe {name}", daemon=True
        )
        self.thread.start()
        started.wait(5.0)

    def _main(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        self.loop.create_task(self._heartbeat())
        self.loop.run_forever()
        # Stopped: cancel what is left and give it a moment; a task that ignores the
        # cancellation (a probe that swallows it) is abandoned, not awaited.
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.wait(tasks, timeout=STOP_WAIT))
        if not any(not t.done() for t in tasks):
            self.loop.close()

    async def _heartbeat(self) -> None:
        while True:
            self.beat = time.monotonic()
            await asyncio.sleep(BEAT)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Stop the loop; wait up to 2 × STOP_WAIT for its thread (it may be blocked)."""
        self.stopped = True
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(2 * STOP_WAIT)

    stopped = False


class _Call:
    """One call into an isolated kind: whether it has ended, when it was cancelled."""

    __slots__ = ("cancelled_at", "done")

    def __init__(self) -> None:
        self.done = False
        self.cancelled_at: float | None = None


async def _tracked(coro: Coroutine[Any, Any, T], call: _Call) -> T:
    try:
        return await coro
    finally:
        call.done = True


class IsolatedProbe(Probe):
    """A probe kind run on a ``ProbeLoop``; the agent and the scheduler see a plain Probe."""

    def __init__(self, real: Probe, on_fault: Callable[[str, str], None]) -> None:
        super().__init__(real.settings, real.context)
        self.real = real
        self.name = real.name  # type: ignore[misc]
        self.batched = real.batched  # type: ignore[misc]
        self.on_fault = on_fault
        self.runner: ProbeLoop | None = None
        self._orphans: set[_Call] = set()
        self.faulted = False

    def supports(self, path: Path) -> bool:
        # Called on the agent's loop when membership changes: a plugin's bug here must
        # not stop the agent.
        try:
            return bool(self.real.supports(path))
        except Exception as exc:
            self.fault(f"supports() raised {type(exc).__name__}: {exc}")
            return False

    async def __aenter__(self) -> IsolatedProbe:
        self.runner = ProbeLoop(self.name)
        try:
            with anyio.fail_after(ENTER_DEADLINE):
                await self._call(self.real.__aenter__())
        except TimeoutError:
            self.runner.stop()
            raise TimeoutError(f"__aenter__ did not finish within {ENTER_DEADLINE:g}s") from None
        except BaseException:
            self.runner.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.runner is None:
            return
        try:
            with anyio.move_on_after(EXIT_DEADLINE, shield=True):
                await self._call(self.real.__aexit__(None, None, None))
        except Exception as exc:
            logger.warning("probe kind {!r} failed to close: {}: {}", self.name,
                           type(exc).__name__, exc)
        finally:
            self.runner.stop()

    async def probe(self, path: Path, timeout: float) -> ProbeResult:
        return await self._call(self.real.probe(path, timeout))

    async def probe_many(self, paths: Sequence[Path], timeout: float) -> list[ProbeResult]:
        return await self._call(self.real.probe_many(paths, timeout))

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self.runner is not None
        call = _Call()
        fut = self.runner.submit(_tracked(coro, call))
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            # Cancelling our side cancels the plugin's task on its loop; one that swallows
            # the cancellation keeps running there: ``stale_orphans`` counts those.
            if not call.done:
                call.cancelled_at = time.monotonic()
                self._orphans.add(call)
            raise

    def stale_orphans(self, now: float) -> int:
        """Calls cancelled over ORPHAN_AGE seconds ago that are still running."""
        for call in list(self._orphans):
            if call.done:
                self._orphans.discard(call)
        return sum(1 for c in list(self._orphans)
                   if c.cancelled_at is not None and now - c.cancelled_at >= ORPHAN_AGE)

    def fault(self, reason: str) -> None:
        """Report this kind as broken (once)."""
        if not self.faulted:
            self.faulted = True
            self.on_fault(self.name, reason)


class LoopWatchdog:
    """A thread that watches event-loop heartbeats and can end a stuck shutdown."""

    def __init__(self) -> None:
        self.main = _Beating()
        self.main.beat = time.monotonic()
        self.isolated: list[tuple[IsolatedProbe, asyncio.AbstractEventLoop]] = []
        self._stop = threading.Event()
        self._exit_at: float | None = None
        self._exit_code = 0
        self._thread: threading.Thread | None = None
        self.warned_blocked = 0  # times the agent's loop was reported blocked

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="healthmesh-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def watch(self, probe: IsolatedProbe, main_loop: asyncio.AbstractEventLoop) -> None:
        """Report ``probe`` through its ``fault`` (on ``main_loop``) when its loop blocks."""
        self.isolated.append((probe, main_loop))

    async def heartbeat(self) -> None:
        """Run on the agent's loop: proves the loop is turning."""
        while True:
            self.main.beat = time.monotonic()
            await anyio.sleep(MAIN_BEAT)

    def arm(self, deadline: float, code: int) -> None:
        """End the process with ``code`` if it is still running ``deadline`` seconds from now.

        Called when a shutdown starts: a plugin that blocks the loop or ignores cancellation
        cannot keep the agent running past it.
        """
        if self._exit_at is None:
            self._exit_at = time.monotonic() + deadline
            self._exit_code = code

    def _watch(self) -> None:
        blocked_since_warned = False
        while not self._stop.wait(BEAT):
            now = time.monotonic()
            if self._exit_at is not None and now >= self._exit_at:
                self._hard_exit()
            late = now - self.main.beat
            if late >= WARN_BLOCKED and not blocked_since_warned:
                blocked_since_warned = True
                self.warned_blocked += 1
                logger.warning(
                    "the agent's event loop has been blocked for {:.1f}s (a plugin doing "
                    "blocking work in a coroutine?)", late
                )
            elif late < WARN_BLOCKED:
                blocked_since_warned = False
            for probe, loop in self.isolated:
                runner = probe.runner
                if probe.faulted or runner is None or runner.stopped:
                    continue
                reason = None
                if now - runner.beat >= BLOCK_LIMIT:
                    reason = (f"its event loop was blocked for more than {BLOCK_LIMIT:g}s "
                              "(time.sleep or blocking I/O in a coroutine)")
                elif (n := probe.stale_orphans(now)) >= ORPHAN_LIMIT:
                    reason = f"{n} cancelled probes are still running (it swallows cancellation)"
                if reason is not None:
                    try:
                        loop.call_soon_threadsafe(probe.fault, reason)
                    except RuntimeError:  # the agent's loop is closed: shutting down
                        pass

    def _hard_exit(self) -> None:
        try:
            logger.error(
                "shutdown did not finish within its deadline (a plugin blocking the event "
                "loop or ignoring cancellation); exiting now"
            )
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(self._exit_code)
