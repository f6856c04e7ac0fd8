"""The supervisor: starts a group of actors, restarts them when one crashes, shuts them down.

Restarts are all-for-one: when any actor of the pipeline crashes, every actor is
restarted. Messages in flight are only redelivered by an MQTT broker when the
session reconnects, so restarting the crashed actor alone would strand the
messages it held; restarting the group reconnects intake, the broker redelivers
everything unacknowledged, and idempotent writes make the repeats harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from worker.exit_codes import ExitCode
from worker.retry import Backoff, describe, refusal
from worker.runtime.actor import Actor
from worker.runtime.cancel import cancel_and_wait
from worker.runtime.sdnotify import notify, watchdog_interval, watchdog_loop

log = structlog.get_logger("worker.supervisor")

REFUSED = "<refused>"  # what _watch returns for a refusal


@dataclass
class RestartPolicy:
    limit: int = 5  # restarts allowed within `window_s`; one more and the daemon exits
    window_s: float = 300.0
    backoff_s: float = 1.0  # first delay, doubled per recent restart (jittered)
    backoff_max_s: float = 30.0
    shutdown_timeout_s: float = 30.0


class ActorGroup:
    """Actors ordered upstream → downstream, plus the tasks that serve them."""

    def __init__(
        self, actors: Sequence[Actor], helpers: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()
    ):
        self.actors = list(actors)
        self.helpers = list(helpers)  # side tasks (reporters); their failure is a crash too
        self.tasks: dict[asyncio.Task[None], str] = {}
        self._helper_tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        for actor in self.actors:
            self.tasks[asyncio.create_task(actor.run(), name=actor.name)] = actor.name
        for helper in self.helpers:
            task = asyncio.create_task(helper(), name=helper.__name__)
            self.tasks[task] = helper.__name__
            self._helper_tasks.add(task)

    async def stop(self) -> None:
        """Graceful: stop upstream first so each stage drains into the next, then close."""
        for task in self._helper_tasks:
            task.cancel()
        for actor in self.actors:
            await actor.stop()
        await self._close_actors()
        # Let tasks end on their own (intake disconnects cleanly after its last PUBACK).
        await asyncio.wait(set(self.tasks), timeout=5.0)
        await self._cancel_tasks()

    async def close(self) -> None:
        """After a crash: cancel everything, then release connections."""
        await self._cancel_tasks()
        await self._close_actors()

    async def _cancel_tasks(self) -> None:
        await cancel_and_wait(*self.tasks)

    async def _close_actors(self) -> None:
        for actor in reversed(self.actors):
            try:
                await actor.close()
            except Exception as exc:  # closing must go on for the others
                log.warning("actor.close_failed", actor=actor.name, error=repr(exc))


class Supervisor:
    """Runs an actor group until a signal; restarts it on a crash within a budget."""

    def __init__(
        self,
        build: Callable[[], Awaitable[ActorGroup]],
        policy: RestartPolicy,
        ready: Callable[[ActorGroup], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self._build = build
        self._policy = policy
        self._ready = ready
        self._stop = asyncio.Event()
        self._restarts: deque[float] = deque()
        self.restarts_total = 0

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a stop request; True if one came."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._stop.wait()
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("supervisor.signal", signal=sig.name)
        self._stop.set()

    async def run(self) -> ExitCode:
        """Return the process exit code."""
        watchdog = None
        interval = watchdog_interval()
        if interval:
            watchdog = asyncio.create_task(watchdog_loop(interval))
        try:
            return await self._run_groups()
        finally:
            if watchdog:
                watchdog.cancel()

    async def _run_groups(self) -> ExitCode:
        announced_ready = False
        while not self._stop.is_set():
            try:
                group = await self._build()
            except Exception as exc:
                log.error("supervisor.start_failed", error=repr(exc))
                if not await self._may_restart():
                    return ExitCode.FAILURE
                continue
            group.start()
            if not announced_ready:
                announced_ready = await self._announce_ready(group)
            crashed = await self._watch(group)
            if crashed is None:
                return await self._shutdown(group)
            await group.close()
            if crashed is REFUSED:
                return ExitCode.CONFIG
            if not await self._may_restart():
                return ExitCode.FAILURE
        return ExitCode.OK

    async def _announce_ready(self, group: ActorGroup) -> bool:
        if self._ready is not None:
            ready = asyncio.create_task(self._ready(group))
            stopped = asyncio.create_task(self._stop.wait())
            failed = asyncio.create_task(_first_done(group))
            done, pending = await asyncio.wait({ready, stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if ready not in done or ready.exception():
                return False
        notify("READY=1")
        log.info("supervisor.ready")
        return True

    async def _watch(self, group: ActorGroup) -> str | None:
        """Wait for a stop request (None) or a crashed task: its name, or REFUSED when a
        server refused our credentials (restarting would only be refused again)."""
        stopped: asyncio.Task[Any] = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({stopped, *group.tasks}, return_when=asyncio.FIRST_COMPLETED)
        crashed = [task for task in group.tasks if task in done]
        if not crashed:
            return None
        stopped.cancel()
        task = crashed[0]
        name = group.tasks[task]
        error = None if task.cancelled() else task.exception()
        refused = refusal(error)
        if refused is not None:
            log.error("supervisor.refused", actor=name, error=describe(refused), hint="a setting to fix")
            return REFUSED
        log.error(
            "actor.crashed",
            actor=name,
            error=repr(error) if error else "returned before being stopped",
            exc_info=error,
        )
        return name

    async def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self._policy.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self._policy.limit:
            log.error(
                "supervisor.gave_up",
                restarts=len(self._restarts),
                window_s=self._policy.window_s,
            )
            return False
        delay = Backoff(self._policy.backoff_s, self._policy.backoff_max_s).delay(len(self._restarts) + 1)
        self._restarts.append(now)
        self.restarts_total += 1
        log.warning("supervisor.restarting", in_s=round(delay, 3), restarts=len(self._restarts))
        await self.wait_stopped(delay)
        return True

    async def _shutdown(self, group: ActorGroup) -> ExitCode:
        notify("STOPPING=1")
        log.info("supervisor.stopping", timeout_s=self._policy.shutdown_timeout_s)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._policy.shutdown_timeout_s):
                await group.stop()
        except TimeoutError:
            # Whatever was not acknowledged stays with the broker and is redelivered.
            log.error("supervisor.shutdown_timeout", timeout_s=self._policy.shutdown_timeout_s)
            await group.close()
            return ExitCode.FAILURE
        log.info("supervisor.stopped", duration_s=round(time.monotonic() - started, 3))
        return ExitCode.OK


async def _first_done(group: ActorGroup) -> None:
    await asyncio.wait(set(group.tasks), return_when=asyncio.FIRST_COMPLETED)
