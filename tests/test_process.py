"""The daemon as a process: kill -9 loses nothing, SIGTERM drains and acknowledges, systemd hears of it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import asyncpg
import orjson

from worker.config import Settings
from worker.decode.codecs import load_codecs
from worker.intake.mqtt import build_client
from worker.tools.simulate import build_fleet, message_stream, readings_per_message, simulate

from .conftest import start_worker_process
from .helpers import wait_for_count

RATE = 500  # messages/s; keeps a worker outage well inside any broker's offline queue


def expected_readings(count: int, devices: int = 8) -> int:
    codecs = load_codecs()
    stream = message_stream(build_fleet(devices), codecs)
    return sum(readings_per_message(*next(stream), codecs) for _ in range(count))


async def wait_ready(process: asyncio.subprocess.Process, timeout: float = 20) -> list[dict[str, object]]:
    """Read the worker's JSON log lines until it says it is ready."""
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = await asyncio.wait_for(process.stdout.readline(), deadline - time.monotonic())
        if not raw:
            raise AssertionError(f"worker exited before ready: {lines}")
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        lines.append(line)
        if line.get("event") == "supervisor.ready":
            return lines
    raise AssertionError("worker not ready in time")


async def drain_output(process: asyncio.subprocess.Process) -> list[bytes]:
    assert process.stdout is not None
    return [line async for line in process.stdout]


async def test_kill_9_mid_stream_then_restart_loses_nothing(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    total = 2000
    worker = await start_worker_process(settings)
    await wait_ready(worker)
    publisher = asyncio.create_task(asyncio.to_thread(simulate, settings.mqtt.url, 8, RATE, total))
    await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 200)
    worker.kill()  # SIGKILL: no drain, no flush, no goodbye
    await worker.wait()
    rows_at_kill = await pg.fetchval("SELECT count(*) FROM decoded_data")
    await asyncio.sleep(0.5)

    worker = await start_worker_process(settings)
    try:
        await wait_ready(worker)
        assert await publisher == total
        expected = expected_readings(total)
        assert rows_at_kill < expected, "the kill came too late to prove anything"
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", expected, timeout=30)
        await asyncio.sleep(0.5)  # anything extra (a duplicate) would show up now
        assert await pg.fetchval("SELECT count(*) FROM decoded_data") == expected
        assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0
    finally:
        worker.send_signal(signal.SIGTERM)
        await worker.wait()


async def test_sigterm_drains_acks_and_exits_0_telling_systemd(
    settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    total = 800  # what waits in the broker stays below a stock Mosquitto's 1000-message queue
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    # systemd passes WATCHDOG_USEC (and WATCHDOG_PID, omitted here: any pid is fine then).
    worker = await start_worker_process(settings, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="200000")
    try:
        await wait_ready(worker)
        publisher = asyncio.create_task(asyncio.to_thread(simulate, settings.mqtt.url, 8, RATE, total))
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 300)
        worker.send_signal(signal.SIGTERM)
        output = await asyncio.wait_for(drain_output(worker), 30)
        assert await worker.wait() == 0
        events = [orjson.loads(line).get("event") for line in output if line.startswith(b"{")]
        assert "supervisor.stopped" in events
        states = []
        while True:
            try:
                states.append(notify.recv(1024).decode())
            except BlockingIOError:
                break
        assert "READY=1" in states and "STOPPING=1" in states
        assert states.count("WATCHDOG=1") >= 3  # every 0.1 s while it ran
        assert await publisher == total
    finally:
        notify.close()
        if worker.returncode is None:
            worker.kill()
            await worker.wait()

    # Whatever the worker stored it acknowledged: the broker redelivers exactly the rest.
    stored = await pg.fetchval("SELECT count(*) FROM decoded_data")
    codecs = load_codecs()
    redelivered = 0
    async with build_client(settings.mqtt) as client:

        async def collect() -> None:
            nonlocal redelivered
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                redelivered += readings_per_message(message.topic.value, message.payload, codecs)

        collector = asyncio.create_task(collect())
        await client.subscribe([(topic, 1) for topic in settings.mqtt.topics])
        await asyncio.sleep(1.5)
        collector.cancel()
    assert stored + redelivered == expected_readings(total)


async def test_shared_subscription_splits_one_stream_between_workers(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    total = 600
    env = {"IOTFLOW_MQTT_SHARED_GROUP": f"g{os.getpid()}"}
    first = await start_worker_process(settings, **env, IOTFLOW_MQTT_CLIENT_ID=settings.mqtt.client_id + "-a")
    second = await start_worker_process(
        settings, **env, IOTFLOW_MQTT_CLIENT_ID=settings.mqtt.client_id + "-b"
    )
    try:
        await wait_ready(first)
        await wait_ready(second)
        await asyncio.to_thread(simulate, settings.mqtt.url, 8, 1000, total)
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", expected_readings(total))
    finally:
        for worker in (first, second):
            worker.send_signal(signal.SIGTERM)
        outputs = [await drain_output(w) for w in (first, second)]
        assert [await w.wait() for w in (first, second)] == [0, 0]
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == expected_readings(total)
    shares = [_last_committed(output) for output in outputs]
    assert sum(shares) == total and min(shares) > 0, shares


def _last_committed(output: list[bytes]) -> int:
    stopped = [orjson.loads(line) for line in output if b'"daemon.stopped"' in line]
    return int(stopped[-1]["committed"])


async def test_worker_refuses_an_unmigrated_schema_with_exit_2(settings: Settings) -> None:
    worker = await start_worker_process(settings, IOTFLOW_POSTGRES_SCHEMA="never_migrated")
    output = await asyncio.wait_for(drain_output(worker), 30)
    assert await worker.wait() == 2
    problems = [orjson.loads(line) for line in output if b'"schema.not_ready"' in line]
    assert "run `iotflow migrate`" in str(problems[0]["problem"])
