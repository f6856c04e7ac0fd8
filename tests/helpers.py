"""Shared test helpers: run the daemon in-process or as a process, publish, wait for rows.

Whatever a helper starts (a task, a thread, a process, a socket) it also stops, joins or
kills on the way out, whether the test passed or failed: the suite shares one event loop
and one broker, so anything left running would feed the next test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import aiohttp
import aiomqtt
import asyncpg
import orjson
import pytest

from worker.cli import main
from worker.config import Settings
from worker.pipeline import Daemon
from worker.stores.documents import PostgresDocumentStore
from worker.tools.embedded import free_port
from worker.tools.simulate import simulate

from .conftest import worker_env

T = TypeVar("T")
ROOT = Path(__file__).parent.parent


@contextlib.asynccontextmanager
async def background(coro: Coroutine[Any, Any, T]) -> AsyncIterator[asyncio.Task[T]]:
    """A task for the duration of the block; cancelled and awaited on exit if still running."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[Daemon]:
    """The daemon in this event loop; stopped gracefully on exit (its exit code is checked)."""
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run(handle_signals=False))
    ready = asyncio.create_task(daemon.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        for pending in (ready, task):
            pending.cancel()
        results = await asyncio.gather(task, ready, return_exceptions=True)
        if task in done:
            raise AssertionError(f"daemon exited early with {results[0]!r}")
        raise AssertionError("daemon not ready within 30 s")
    try:
        yield daemon
    finally:
        daemon.request_stop()
        try:
            code = await asyncio.wait_for(task, 30)  # cancels the daemon if it hangs
        finally:
            ready.cancel()
        assert code == 0, f"daemon exited with {code}"


@contextlib.asynccontextmanager
async def schema_documents(settings: Settings) -> AsyncIterator[PostgresDocumentStore]:
    """The test schema's JSONB document store, on a pool of its own: for writes the daemon
    under test must find by itself (no announcement on Redis)."""
    pool = await asyncpg.create_pool(
        settings.postgres.url,
        min_size=1,
        max_size=1,
        server_settings={"search_path": settings.postgres.schema},
    )
    assert pool is not None
    try:
        yield PostgresDocumentStore(pool)
    finally:
        await pool.close()


async def wait_for_committed(daemon: Daemon, expected: int, timeout: float = 20.0) -> None:
    """Until the writer has acknowledged `expected` messages in all. Rows show up in
    PostgreSQL before the other sinks finish and the batch is counted, so a row count
    alone does not say the counter has caught up."""
    counters = daemon.metrics.counters

    async def probe() -> bool:
        return bool(counters["messages_committed"] >= expected)

    try:
        await wait_for(probe, timeout)
    except AssertionError:
        raise AssertionError(f"committed {counters['messages_committed']}, expected {expected}") from None


async def publish(url: str, messages: list[tuple[str, bytes]], qos: int = 1) -> None:
    parsed = urlparse(url)
    async with aiomqtt.Client(parsed.hostname or "127.0.0.1", parsed.port or 1883) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=qos)


async def wait_for(
    probe: Callable[[], Awaitable[bool]], timeout: float = 20.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def wait_ready(http: aiohttp.ClientSession, base: str, bodies: list[str], timeout: float) -> None:
    """Until the daemon at `base` answers /readyz 200; every verbose body it gave is kept in
    `bodies` (to be searched for what must never appear there, such as a password)."""

    async def ready() -> bool:
        try:
            async with http.get(f"{base}/readyz?verbose=1") as response:
                bodies.append(await response.text())
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(ready, timeout=timeout)


async def wait_for_count(conn: asyncpg.Connection, query: str, expected: int, timeout: float = 20.0) -> int:
    last = -1

    async def probe() -> bool:
        nonlocal last
        last = await conn.fetchval(query)
        return bool(last >= expected)

    try:
        await wait_for(probe, timeout)
    except AssertionError:
        raise AssertionError(f"{query!r} reached {last}, expected {expected}") from None
    return last


# --- commands ---------------------------------------------------------------------------------------


class Cli:
    """Runs `iotflow …` in-process (a thread, as `main` runs its own event loop)."""

    def __init__(
        self, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ):
        for name, value in worker_env(settings).items():
            if name.startswith("IOTFLOW_"):
                monkeypatch.setenv(name, value)
        # `main` configures logging for a process; in-process it would bind structlog to
        # capsys's stream, which closes after the test. Keep the session's configuration.
        monkeypatch.setattr("worker.cli.app.configure_logging", lambda *args, **kwargs: None)
        self._capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        self._capsys.readouterr()
        code = await asyncio.to_thread(main, list(argv))
        out, err = self._capsys.readouterr()
        return code, out, err

    def output(self) -> tuple[str, str]:
        """What the last command printed (stdout, stderr), when it ended by SystemExit."""
        captured = self._capsys.readouterr()
        return captured.out, captured.err


# --- the simulator on a thread ---------------------------------------------------------------------


class Simulation:
    """`worker.simulate.simulate` running on its own thread."""

    def __init__(self, stop: threading.Event, done: asyncio.Future[int]) -> None:
        self._stop = stop
        self._done = done

    def done(self) -> bool:
        return self._done.done()

    async def sent(self, timeout: float = 90.0) -> int:
        """Wait for it to finish; the messages it sent (each acknowledged by the broker)."""
        return await asyncio.wait_for(asyncio.shield(self._done), timeout)

    async def stop(self, timeout: float = 90.0) -> int:
        """Stop publishing (within a chunk of 100 messages) and return what was sent."""
        self._stop.set()
        return await self.sent(timeout)


@contextlib.asynccontextmanager
async def simulator(
    url: str, devices: int, rate: float, count: int | None, **options: Any
) -> AsyncIterator[Simulation]:
    """Publish simulated telemetry in the background; stopped and joined on exit, so a
    failed test leaves no publisher feeding the shared broker."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    stop = threading.Event()

    def settle(result: int | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            assert result is not None
            done.set_result(result)

    def run() -> None:
        try:
            result = simulate(url, devices, rate, count, stop=stop, **options)
        except BaseException as exc:  # handed to the awaiting test
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    thread = threading.Thread(target=run, name="simulator", daemon=True)
    thread.start()
    try:
        yield Simulation(stop, done)
    finally:
        stop.set()
        # The simulator waits up to 60 s for the broker's acknowledgements before it returns.
        await asyncio.wait({done}, timeout=90)
        thread.join(timeout=1)
        if thread.is_alive():
            raise AssertionError("the simulator thread did not stop")
        if done.done() and not done.cancelled():
            done.exception()  # retrieved: reported by the test if it awaited it, else moot


# --- `iotflow …` as a process ------------------------------------------------------------------------


class IotflowProcess:
    """`python -m worker …` with its output (stdout and stderr) read as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[bytes] = []
        self._news = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            async for line in self.process.stdout:
                self.lines.append(line)
                self._news.set()
        finally:
            self._news.set()

    @property
    def output(self) -> str:
        return b"".join(self.lines).decode(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines so far."""
        found = []
        for line in self.lines:
            if line.startswith(b"{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    found.append(orjson.loads(line))
        return found

    def events(self) -> list[str]:
        return [str(record.get("event")) for record in self.records()]

    async def wait_for_event(
        self, event: str, timeout: float = 30.0, nth: int = 1, **fields: Any
    ) -> dict[str, Any]:
        """The `nth` log record of `event` (with these field values), waiting for it while
        the process runs."""
        deadline = time.monotonic() + timeout
        while True:
            self._news.clear()
            found = [
                record
                for record in self.records()
                if record.get("event") == event and all(record.get(k) == v for k, v in fields.items())
            ]
            if len(found) >= nth:
                return found[nth - 1]
            if self._reader.done():
                raise AssertionError(f"process ended before {event!r}: {self.output[-3000:]}")
            try:
                await asyncio.wait_for(self._news.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(f"no {event!r} within {timeout} s: {self.output[-3000:]}") from None

    async def wait(self, timeout: float = 60.0) -> int:
        """The exit code, once the process has exited and its output is read to the end."""
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._reader)
            return await self.process.wait()

    async def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (a graceful stop); the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def kill(self) -> None:
        """SIGKILL, then reap it."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()

    async def close(self) -> None:
        await self.kill()
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), 10)
        except TimeoutError:  # someone else holds the pipe open; stop reading it
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


@contextlib.asynccontextmanager
async def iotflow_process(env: dict[str, str], *argv: str) -> AsyncIterator[IotflowProcess]:
    """`python -m worker *argv`, killed and reaped on exit unless it has ended already."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *argv,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    running = IotflowProcess(process)
    try:
        yield running
    finally:
        await running.close()


def worker_process(
    settings: Settings, *args: str, **env: str
) -> contextlib.AbstractAsyncContextManager[IotflowProcess]:
    """`iotflow [args] run` with these settings (and `env` on top)."""
    return iotflow_process({**worker_env(settings), **env}, *args, "run")


# --- systemd's notification socket -------------------------------------------------------------------


class NotifySocket:
    """A stand-in for systemd's $NOTIFY_SOCKET that takes every datagram as it arrives.

    Left unread, the kernel queues only `net.unix.max_dgram_qlen` datagrams (10 by
    default) and then blocks the sender, which would hang a process pinging its watchdog.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.states: list[str] = []
        self._news = asyncio.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self.read)

    def read(self) -> list[str]:
        """Take whatever has arrived; every state so far."""
        while True:
            try:
                self.states.append(self._sock.recv(4096).decode())
            except (BlockingIOError, InterruptedError):
                break
        self._news.set()
        return self.states

    async def wait_for_state(self, state: str, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while state not in self.read():
                self._news.clear()
                await self._news.wait()

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


@contextlib.asynccontextmanager
async def notify_socket(path: Path) -> AsyncIterator[NotifySocket]:
    notify = NotifySocket(path)
    try:
        yield notify
    finally:
        notify.close()


def wait_listening(port: int, server: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until a server this test started accepts connections on `port`; fails if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if server.poll() is not None:
                raise AssertionError(f"{server.args!r} exited with {server.returncode}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# --- Cassandra -----------------------------------------------------------------------------------------


def with_cassandra(settings: Settings, hosts: str, backend: str, data_dir: Path | None = None) -> Settings:
    """`settings` with the time series in `backend`, Cassandra at `hosts` ("host[:port],…") in a
    keyspace of the test's own."""
    first = hosts.split(",")[0]
    cassandra = replace(
        settings.cassandra,
        hosts=[h.split(":")[0] for h in hosts.split(",")],
        port=int(first.partition(":")[2] or 9042),
        keyspace=f"test_{uuid.uuid4().hex[:10]}",
        consistency="one",
        local_dc=os.environ.get("IOTFLOW_TEST_CASSANDRA_LOCAL_DC", "datacenter1"),
    )
    configured = replace(
        settings, cassandra=cassandra, timeseries=replace(settings.timeseries, backend=backend)
    )
    if data_dir is not None:
        configured.storage = replace(settings.storage, data_dir=str(data_dir), write_timeout_s=1.0)
    return configured


@contextlib.contextmanager
def password_mosquitto(directory: Path, username: str, password: str) -> Iterator[int]:
    """A Mosquitto of its own that admits `username` with `password` and nobody else; its port."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run(
        [passwd, "-b", "-c", str(directory / "passwd"), username, password], check=True, timeout=30
    )
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous false", f"password_file {directory / 'passwd'}"]
    if os.geteuid() == 0:
        lines.insert(0, "user root")
    (directory / "mosquitto.conf").write_text("\n".join(lines) + "\n")
    broker = subprocess.Popen([mosquitto, "-c", str(directory / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, broker)
        yield port
    finally:
        stop_process(broker)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`: a test's own server never outlives it."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
