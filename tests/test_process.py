"""The daemon as a process: kill -9 loses nothing, SIGTERM drains and acknowledges, systemd hears of it;
the MQTT contract tests run against Mosquitto and HiveMQ CE (`broker_settings`)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import pytest

from worker.config import Settings
from worker.decode.codecs import load_codecs
from worker.intake.mqtt import connect
from worker.tools.embedded import ServiceUrls
from worker.tools.simulate import build_fleet, message_stream, readings_per_message

from .helpers import background, notify_socket, simulator, wait_for, wait_for_count, worker_process

RATE = 500  # messages/s; keeps a worker outage well inside any broker's offline queue
AFTER = 300  # messages published after a kill, while the worker is down and restarting


def expected_readings(count: int, devices: int = 8) -> int:
    codecs = load_codecs()
    stream = message_stream(build_fleet(devices), codecs)
    return sum(readings_per_message(*next(stream), codecs) for _ in range(count))


@pytest.mark.usefixtures("broker_settings")
async def test_kill_9_mid_stream_then_restart_loses_nothing(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    url = settings.mqtt.url
    async with worker_process(settings) as worker:
        await worker.wait_for_event("supervisor.ready")
        # An endless stream: it is surely still flowing when the worker dies.
        async with simulator(url, 8, RATE, None) as during:
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 200)
            await worker.kill()  # SIGKILL: no drain, no flush, no goodbye
            sent_during = await during.stop()
    # The same devices again: their timestamps (to the millisecond) must follow the first stream's.
    await asyncio.sleep(0.005)
    async with worker_process(settings) as worker:
        # More while the worker is down and starting again: all of it published after the
        # kill, so the restarted worker always has messages the killed one never saw.
        async with simulator(url, 8, RATE, AFTER) as after:
            await worker.wait_for_event("supervisor.ready")
            assert await after.sent() == AFTER
        expected = expected_readings(sent_during) + expected_readings(AFTER)
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", expected, timeout=30)
        # A graceful stop stores whatever the worker still holds: any extra row shows now.
        assert await worker.terminate() == 0
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == expected
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0


@pytest.mark.usefixtures("broker_settings")
async def test_sigterm_drains_acks_and_exits_0_telling_systemd(
    settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    total = 800  # what waits in the broker stays below a stock Mosquitto's 1000-message queue
    async with notify_socket(tmp_path / "notify.sock") as notify:
        # systemd passes WATCHDOG_USEC (and WATCHDOG_PID, omitted here: any pid is fine then).
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
        async with worker_process(settings, **env) as worker:
            await worker.wait_for_event("supervisor.ready")  # subscribed: nothing published is lost
            async with simulator(settings.mqtt.url, 8, RATE, total) as sim:
                await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 300)
                assert await worker.terminate() == 0
                assert "supervisor.stopped" in worker.events()
                assert await sim.sent() == total
        states = notify.read()  # everything it sent is here now that it has exited
    # The watchdog pings every 0.1 s (half of WATCHDOG_USEC, see test_sdnotify); how many
    # fit in this run is a matter of timing, so only their presence is asserted here.
    assert states.count("READY=1") == 1 and states.count("STOPPING=1") == 1, states
    assert states.index("READY=1") < states.index("STOPPING=1"), states
    assert "WATCHDOG=1" in states and set(states) == {"READY=1", "WATCHDOG=1", "STOPPING=1"}, states

    # Whatever the worker stored it acknowledged: the broker redelivers exactly the rest.
    stored = await pg.fetchval("SELECT count(*) FROM decoded_data")
    expected = expected_readings(total)
    codecs = load_codecs()
    redelivered = 0
    connection = await connect(settings.mqtt)  # the worker's own session, resumed

    async def collect() -> None:
        nonlocal redelivered
        while True:
            packets = await connection.take()
            for packet in packets:
                redelivered += readings_per_message(packet.topic, packet.payload, codecs)
            # Counted, so acknowledged: HiveMQ sends a session's next messages only then.
            connection.acknowledge([packet.packet_id for packet in packets if packet.packet_id])

    async def all_there() -> bool:
        return stored + redelivered >= expected

    try:
        async with background(collect()) as collector:
            await connection.subscribe(settings.mqtt.topics)
            await wait_for(all_there)
            await asyncio.sleep(0.5)  # a duplicate (stored, yet redelivered) would arrive meanwhile
            assert not collector.done()
    finally:
        await connection.close()
    assert stored + redelivered == expected


@pytest.mark.usefixtures("broker_settings")
async def test_shared_subscription_splits_one_stream_between_workers(
    settings: Settings, pg: asyncpg.Connection, mqtt_url: str, service_urls: ServiceUrls
) -> None:
    total = 600
    env = {"IOTFLOW_MQTT_SHARED_GROUP": f"g{os.getpid()}"}
    client_id = settings.mqtt.client_id
    async with (
        worker_process(settings, **env, IOTFLOW_MQTT_CLIENT_ID=client_id + "-a") as first,
        worker_process(settings, **env, IOTFLOW_MQTT_CLIENT_ID=client_id + "-b") as second,
    ):
        workers = (first, second)
        for worker in workers:
            await worker.wait_for_event("supervisor.ready")
        async with simulator(settings.mqtt.url, 8, 1000, total) as sim:
            assert await sim.sent() == total
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", expected_readings(total))
        for worker in workers:
            worker.process.terminate()
        assert [await worker.wait() for worker in workers] == [0, 0]
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == expected_readings(total)
    shares = [_last_committed(worker.records()) for worker in workers]
    assert sum(shares) == total, shares  # the group took the stream once, whoever took what
    if mqtt_url == service_urls.mqtt_url:
        # Mosquitto hands a group's messages round robin; HiveMQ may give a whole burst to
        # one member (docs/brokers.md), so only Mosquitto's split is the broker's promise.
        assert min(shares) > 0, shares


def _last_committed(records: list[dict[str, object]]) -> int:
    stopped = [record for record in records if record.get("event") == "daemon.stopped"]
    return int(str(stopped[-1]["committed"]))


async def test_worker_refuses_an_unmigrated_schema_with_exit_2(settings: Settings) -> None:
    async with worker_process(settings, IOTFLOW_POSTGRES_SCHEMA="never_migrated") as worker:
        assert await worker.wait(30) == 2
    problems = [record for record in worker.records() if record.get("event") == "schema.not_ready"]
    assert "run `iotflow migrate`" in str(problems[0]["problem"])
