"""Several worker processes under one parent: `iotflow run --processes N`.

The parent opens no connection of its own. It starts N children (`iotflow run` with
one process each) that share the MQTT stream through `mqtt.shared_group`, each with
its own client id (`{mqtt.client_id}-{i}`), its own stores, its own HTTP port
(`http.port + i`) and its own `storage.data_dir` (`{data_dir}/process-{i}`: both mode's
journal takes a lock, one writer per file). Towards systemd the parent is the service: each child notifies
the parent over a socket of its own (its $NOTIFY_SOCKET), and the parent says
READY=1 once every child has, pings the watchdog only while no ready child has
gone silent, and says STOPPING=1 when it forwards SIGTERM. So `NotifyAccess=main`
holds: only the main process ever writes to systemd's socket.

A child that dies is started again after a backoff, within a restart budget of its
own (runtime.restart_limit per runtime.restart_window_s); the broker redelivers what
it held unacknowledged to the group. A child exiting 2 (configuration) ends the
group with 2: every child reads the same settings, so a restart cannot fix it.
A child's stdin is a pipe from the parent that is never written: end of file means
the parent is gone (even by SIGKILL), and the child drains and exits on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from worker.config import Settings
from worker.exit_codes import ExitCode
from worker.retry import Backoff
from worker.runtime.sdnotify import notify, watchdog_interval
from worker.runtime.signals import held_reload, held_stop_signal

log = structlog.get_logger("worker.processes")

# Set in a child's environment: its index. Not a setting; the parent's protocol with its children.
CHILD_INDEX_ENV = "IOTFLOW_PROCESS_INDEX"
RESTART_BACKOFF_MAX_S = 30.0


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as taskset or a cgroup set it)."""
    return len(os.sched_getaffinity(0))


def process_count(value: int | str) -> int:
    return usable_cores() if value == "auto" else int(value)


def group_problem(settings: Settings, count: int) -> str | None:
    """Why `count` processes cannot share these settings' stream, or None."""
    if count > 1 and settings.intake.source == "mqtt" and not settings.mqtt.shared_group:
        # Without a shared subscription every child would get (and store) every message.
        return (
            f"{count} processes need mqtt.shared_group (IOTFLOW_MQTT_SHARED_GROUP), e.g. 'iotflow', "
            "so that they split one stream instead of each taking all of it"
        )
    return None


def child_env(settings: Settings, index: int, notify_socket: str) -> dict[str, str]:
    """The environment of child `index`: the parent's, plus what makes it one member of the group."""
    env = dict(os.environ)
    env.pop("WATCHDOG_PID", None)  # the child's pings go to the parent, whatever its pid
    env.pop("NOTIFY_SOCKET", None)
    port = settings.http.port
    env.update(
        {
            CHILD_INDEX_ENV: str(index),
            "NOTIFY_SOCKET": notify_socket,
            "IOTFLOW_RUNTIME_PROCESSES": "1",
            "IOTFLOW_MQTT_CLIENT_ID": f"{settings.mqtt.client_id}-{index}",
            "IOTFLOW_KAFKA_CLIENT_ID": f"{settings.kafka.client_id}-{index}",
            "IOTFLOW_HTTP_PORT": str(port + index if port else 0),  # 0: each takes a free port
            "IOTFLOW_STORAGE_DATA_DIR": str(child_data_dir(settings, index)),
        }
    )
    return env


def child_data_dir(settings: Settings, index: int) -> Path:
    return Path(settings.storage.data_dir) / f"process-{index}"


def left_behind(settings: Settings, count: int) -> list[Path]:
    """Both mode's journals that `count` processes will not read: a single process's
    (`{data_dir}/outbox-*.journal`) under a group, or those of children `count` and up.
    Their batches reach PostgreSQL only when a process of that index runs again."""
    data_dir = Path(settings.storage.data_dir)
    if not data_dir.is_dir():
        return []
    homes = [data_dir] if count > 1 else []
    homes += [d for d in data_dir.glob("process-*") if d.name.removeprefix("process-").isdigit()]
    if count > 1:
        homes = [d for d in homes if d == data_dir or int(d.name.removeprefix("process-")) >= count]
    return sorted(j for home in homes for j in home.glob("outbox-*.journal") if j.stat().st_size > 0)


def warn_left_behind(settings: Settings, count: int) -> None:
    """One line per journal this run will not replay (see `left_behind`)."""
    for journal in left_behind(settings, count):
        log.warning(
            "outbox.journal_left_behind",
            path=str(journal),
            processes=count,
            hint="written by a run with another --processes: run with that many once to replay it",
        )


@dataclass
class Child:
    index: int
    env: dict[str, str]
    notify_socket: socket.socket
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    last_ping: float = 0.0
    restarts: deque[float] = field(default_factory=deque)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class ProcessSupervisor:
    """Starts, watches, restarts and stops the children; `run` returns the exit code."""

    def __init__(self, settings: Settings, count: int, argv: Sequence[str]) -> None:
        self._settings = settings
        self._count = count
        self._argv = list(argv)  # the child's command line
        runtime = settings.runtime
        self._shutdown_timeout_s = runtime.shutdown_timeout_s
        self._restart_limit = runtime.restart_limit
        self._restart_window_s = runtime.restart_window_s
        self._backoff = Backoff(runtime.restart_backoff_s, RESTART_BACKOFF_MAX_S)
        self._stop = asyncio.Event()
        self._stopping = False
        self._announced_ready = False
        self._children: list[Child] = []
        self._withheld: int | None = None  # the child the watchdog is being withheld for

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> ExitCode:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._forward_reload)
        early = held_stop_signal()
        if early is not None:
            self._on_signal(early)
        held_reload()  # the children, not yet started, read the settings afresh anyway
        token = f"{os.getpid()}-{time.monotonic_ns()}"
        for index in range(self._count):
            address = f"@iotflow-{token}-{index}"  # abstract: no file to clean up
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind("\0" + address[1:])
            sock.setblocking(False)
            child = Child(index, child_env(self._settings, index, address), sock)
            loop.add_reader(sock.fileno(), self._on_notification, child)
            self._children.append(child)
        watchdog = None
        interval = watchdog_interval()
        if interval:
            watchdog = asyncio.create_task(self._watchdog(interval))
        code = ExitCode.FAILURE
        try:
            code = await self._supervise()
            return code
        finally:
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)
            for child in self._children:
                loop.remove_reader(child.notify_socket.fileno())
                child.notify_socket.close()
                if child.running:  # only after a shutdown timeout: nothing may outlive the parent
                    assert child.process is not None
                    child.process.kill()
                    child.process.wait()
            (log.info if code == ExitCode.OK else log.error)("processes.stopped", exit_code=int(code))

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("processes.signal", signal=sig.name)
        self._stop.set()

    def _forward_reload(self) -> None:
        """SIGHUP: each child reloads its own settings (each logs what it reloaded)."""
        running = [child for child in self._children if child.running]
        log.info("processes.signal", signal="SIGHUP", forwarded_to=len(running))
        for child in running:
            assert child.process is not None
            child.process.send_signal(signal.SIGHUP)

    async def _supervise(self) -> ExitCode:
        keepers = [
            asyncio.create_task(self._keep(child), name=f"child-{child.index}") for child in self._children
        ]
        stopped = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({stopped, *keepers}, return_when=asyncio.FIRST_COMPLETED)
        ended = [task.result() for task in keepers if task in done]  # a child ended the group
        stopped.cancel()
        codes = [*ended, *await self._shutdown(keepers)]
        for worst in (ExitCode.CONFIG, ExitCode.FAILURE):
            if worst in ended:
                return worst
        return ExitCode.OK if all(code == 0 for code in codes) else ExitCode.FAILURE

    async def _keep(self, child: Child) -> ExitCode:
        """Run one child, again after each death, until the group stops: then its exit code.
        Returns early, ending the group, when the child stopped cleanly (0), on a
        configuration error (2) or a spent budget (1)."""
        while True:
            code = await self._start(child)
            if self._stopping:
                return ExitCode(code) if code in (0, 1, 2) else ExitCode.FAILURE
            if code == ExitCode.OK:
                # A stop signal reached the child first: Ctrl-C signals the whole process
                # group, KillMode=control-group the whole cgroup. Stop with it, not restart it.
                log.info("processes.child_stopped", child=child.index, hint="stopping the group")
                return ExitCode.OK
            log.error("processes.child_exited", child=child.index, exit_code=code)
            if code == ExitCode.CONFIG:
                log.error("processes.config_error", child=child.index, hint="a setting to fix")
                return ExitCode.CONFIG
            delay = self._restart_delay(child)
            if delay is None:
                return ExitCode.FAILURE
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self._stop.is_set():
                return ExitCode.OK  # stopped during the backoff: nothing was running

    async def _start(self, child: Child) -> int:
        """Start the child and wait for its exit code (negative: killed by that signal)."""
        exited = self._spawn(child)
        try:
            return await asyncio.shield(exited)
        finally:
            assert child.process is not None and child.process.stdin is not None
            child.process.stdin.close()

    def _spawn(self, child: Child) -> asyncio.Future[int]:
        """Popen, not asyncio's subprocesses: it returns once the child runs, so no cancellation
        can come between the fork and our handle on it, and a pidfd tells when it exits
        (no watcher thread). stdin is the child's lifeline; close_fds (the default) keeps each
        child from holding the other children's lifelines open."""
        loop = asyncio.get_running_loop()
        process = subprocess.Popen(self._argv, env=child.env, stdin=subprocess.PIPE)
        child.process, child.ready, child.last_ping = process, False, time.monotonic()
        exited: asyncio.Future[int] = loop.create_future()
        pidfd = os.pidfd_open(process.pid)

        def reap() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            exited.set_result(process.wait())  # it has exited: wait() only reaps

        loop.add_reader(pidfd, reap)
        log.info("processes.child_started", child=child.index, pid=process.pid)
        return exited

    def _restart_delay(self, child: Child) -> float | None:
        now = time.monotonic()
        while child.restarts and now - child.restarts[0] > self._restart_window_s:
            child.restarts.popleft()
        if len(child.restarts) >= self._restart_limit:
            log.error(
                "processes.gave_up",
                child=child.index,
                restarts=len(child.restarts),
                window_s=self._restart_window_s,
            )
            return None
        child.restarts.append(now)
        delay = self._backoff.delay(len(child.restarts))
        log.warning(
            "processes.restarting", child=child.index, in_s=round(delay, 3), restarts=len(child.restarts)
        )
        return delay

    async def _shutdown(self, keepers: list[asyncio.Task[ExitCode]]) -> list[int]:
        """SIGTERM to every running child, then their exit codes (within the stop timeout)."""
        self._stopping = True
        self._stop.set()
        notify("STOPPING=1")
        log.info("processes.stopping", timeout_s=self._shutdown_timeout_s)
        for child in self._children:
            if child.running:
                assert child.process is not None
                child.process.send_signal(signal.SIGTERM)
        pending = [task for task in keepers if not task.done()]
        done, late = (
            await asyncio.wait(pending, timeout=self._shutdown_timeout_s) if pending else (set(), set())
        )
        if late:
            log.error("processes.shutdown_timeout", timeout_s=self._shutdown_timeout_s, children=len(late))
            for child in self._children:
                if child.running:
                    assert child.process is not None
                    child.process.kill()
            await asyncio.gather(*late, return_exceptions=True)
            return [int(ExitCode.FAILURE)]
        return [int(task.result()) for task in done]

    def _on_notification(self, child: Child) -> None:
        while True:
            try:
                datagram = child.notify_socket.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            for line in datagram.decode(errors="replace").splitlines():
                if line == "WATCHDOG=1":
                    child.last_ping = time.monotonic()
                elif line == "READY=1":
                    child.ready = True
                    child.last_ping = time.monotonic()
                    log.info("processes.child_ready", child=child.index)
                    self._maybe_ready()

    def _maybe_ready(self) -> None:
        if self._announced_ready or self._stopping or not all(c.ready for c in self._children):
            return
        self._announced_ready = True
        notify("READY=1")
        log.info("processes.ready", processes=self._count)

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 while every ready child pings its own (children get the same period);
        a child starting or waiting to restart is the start timeout's and the budget's business."""
        period = interval * 2
        while True:
            now = time.monotonic()
            silent = next(
                (c.index for c in self._children if c.running and c.ready and now - c.last_ping > period),
                None,
            )
            if silent is None:
                notify("WATCHDOG=1")
                if self._withheld is not None:
                    log.info("processes.watchdog_resumed", child=self._withheld)
            elif silent != self._withheld:
                log.error(
                    "processes.watchdog_withheld",
                    child=silent,
                    silent_s=round(now - self._children[silent].last_ping, 1),
                )
            self._withheld = silent
            await asyncio.sleep(interval)


def child_argv(config: object) -> list[str]:
    """`iotflow [--config FILE] run` with this interpreter."""
    argv = [sys.executable, "-m", "worker"]
    if config is not None:
        argv += ["--config", str(config)]
    return [*argv, "run"]
