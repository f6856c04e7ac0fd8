"""systemd notifications without a clock: the watchdog period, what is sent, and who starts it.

The process tests only see that pings arrive (how many fit in a run is timing); the
interval itself is pinned down here, with the sleeps recorded instead of slept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import jobs.worker as jobs_worker
import worker.runtime.sdnotify as sdnotify
import worker.runtime.supervisor as supervisor_module
from jobs.context import CTX_KEY
from jobs.worker import SETTINGS_KEY
from worker.config import Settings
from worker.exit_codes import ExitCode
from worker.runtime.actor import Actor
from worker.runtime.supervisor import ActorGroup, RestartPolicy, Supervisor

from .helpers import NotifySocket, notify_socket


@pytest.fixture
async def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[NotifySocket]:
    async with notify_socket(tmp_path / "notify.sock") as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
        yield sock


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("200000", None, 0.1),  # half of what systemd asked for
        ("30000000", None, 15.0),
        ("200000", "self", 0.1),  # WATCHDOG_PID names us
        ("200000", "1", None),  # ... or another process: not ours to ping
        (None, None, None),  # no watchdog configured
        ("soon", None, None),
    ],
)
def test_the_watchdog_interval_is_half_of_watchdog_usec(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert sdnotify.watchdog_interval() == expected


async def test_the_watchdog_loop_pings_then_sleeps_the_interval(
    notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Enough(Exception):
        pass

    seen: list[tuple[float, list[str]]] = []

    async def sleep(delay: float) -> None:
        seen.append((delay, list(notify.read())))  # what had been sent when it went to sleep
        if len(seen) == 3:
            raise Enough

    monkeypatch.setattr(sdnotify, "asyncio", SimpleNamespace(sleep=sleep))
    with pytest.raises(Enough):
        await sdnotify.watchdog_loop(0.1)
    assert seen == [
        (0.1, ["WATCHDOG=1"]),
        (0.1, ["WATCHDOG=1"] * 2),
        (0.1, ["WATCHDOG=1"] * 3),
    ]


def test_notify_without_systemd_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


class Recorder:
    """Stands in for `watchdog_loop`: notes the interval, runs until cancelled."""

    def __init__(self) -> None:
        self.intervals: list[float] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def __call__(self, interval: float) -> None:
        self.intervals.append(interval)
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()


class Idle(Actor):
    name = "idle"

    def __init__(self) -> None:
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self._stopped.set()


async def test_the_supervisor_runs_the_watchdog_at_its_interval_until_it_exits(
    notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    recorder = Recorder()
    monkeypatch.setattr(supervisor_module, "watchdog_loop", recorder)

    async def build() -> ActorGroup:
        return ActorGroup([Idle()])

    supervisor = Supervisor(build, RestartPolicy())
    task = asyncio.create_task(supervisor.run())
    try:
        await asyncio.wait_for(notify.wait_for_state("READY=1"), 10)
        await asyncio.wait_for(recorder.started.wait(), 10)
        assert recorder.intervals == [0.1] and not recorder.cancelled.is_set()
        supervisor.request_stop()
        assert await asyncio.wait_for(task, 10) == ExitCode.OK
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert recorder.cancelled.is_set()
    assert notify.read() == ["READY=1", "STOPPING=1"]


async def test_the_jobs_runner_runs_the_watchdog_at_its_interval_until_shutdown(
    notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    recorder = Recorder()
    monkeypatch.setattr(jobs_worker, "watchdog_loop", recorder)
    closed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def open_resources(*args: Any, **kwargs: Any) -> AsyncIterator[object]:
        try:
            yield SimpleNamespace(pool=None)
        finally:
            closed.set()  # the stores close at shutdown

    async def migrated(*args: Any) -> str:
        return ""  # the stores are stand-ins: so is the schema check

    monkeypatch.setattr(jobs_worker, "open_resources", open_resources)
    monkeypatch.setattr(jobs_worker, "schema_problem", migrated)
    ctx: dict[str, Any] = {SETTINGS_KEY: Settings(), "redis": None}
    await jobs_worker._startup(ctx)
    try:
        await asyncio.wait_for(recorder.started.wait(), 10)
        assert recorder.intervals == [0.1] and CTX_KEY in ctx
    finally:
        await jobs_worker._shutdown(ctx)
    await asyncio.wait_for(recorder.cancelled.wait(), 10)
    assert closed.is_set()
    assert notify.read() == ["READY=1", "STOPPING=1"]
