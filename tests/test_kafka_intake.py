"""Kafka intake against a real Kafka 4 (KRaft): raw-iot-data in a consumer group → exactly
the rows, offsets committed after the writers; the worker or the broker killed -9, two
workers, rebalances."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import orjson

from schemas.envelope import device_key, raw_envelope
from schemas.records import AckToken, RawMessage
from worker.config import Settings
from worker.decode.codecs import load_codecs
from worker.pipeline import Daemon
from worker.tools.servers import KafkaServer
from worker.tools.simulate import readings_per_message

from .helpers import IotflowProcess, running_daemon, wait_for, wait_for_count, worker_process
from .kafka import committed, kafka_settings, produce, served_again
from .test_end_to_end import simulated_messages
from .test_outages import proxied

ROWS = "SELECT count(*) FROM decoded_data"


def envelopes(messages: list[tuple[str, bytes]]) -> list[tuple[bytes, bytes]]:
    now = time.time()
    return [
        (device_key(topic).encode(), raw_envelope(RawMessage(topic, payload, now, AckToken(0, 0))))
        for topic, payload in messages
    ]


def expected_rows(messages: list[tuple[str, bytes]]) -> int:
    codecs = load_codecs()
    return sum(readings_per_message(t, p, codecs) for t, p in messages)


async def all_committed(settings: Settings, ends: dict[int, int]) -> bool:
    """Whether the group committed every partition up to `ends` (what `produce` returned)."""
    kafka = settings.kafka
    done = await committed(kafka.bootstrap, kafka.group, kafka.raw_topic, kafka.partitions)
    return all(done[number] == end for number, end in ends.items())


def kafka_env(settings: Settings) -> dict[str, str]:
    kafka = settings.kafka
    return {
        "IOTFLOW_INTAKE_SOURCE": "kafka",
        "IOTFLOW_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "IOTFLOW_KAFKA_RAW_TOPIC": kafka.raw_topic,
        "IOTFLOW_KAFKA_PROCESSED_TOPIC": kafka.processed_topic,
        "IOTFLOW_KAFKA_GROUP": kafka.group,
        "IOTFLOW_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
        "IOTFLOW_KAFKA_HEARTBEAT_INTERVAL_MS": str(kafka.heartbeat_interval_ms),
        "IOTFLOW_KAFKA_REQUEST_TIMEOUT_MS": str(kafka.request_timeout_ms),
        "IOTFLOW_RULES_ENABLED": "false",
    }


async def test_kafka_intake_writes_exactly_the_rows(
    settings: Settings, pg: asyncpg.Connection, kafka_bootstrap: str
) -> None:
    settings = await kafka_settings(settings, kafka_bootstrap)
    settings.intake = replace(settings.intake, source="kafka")
    messages = simulated_messages(200)
    malformed = [(b"x", b"not json"), (b"x", orjson.dumps({"v": 2, "topic": "t", "payload": ""}))]
    ends = await produce(kafka_bootstrap, settings.kafka.raw_topic, [*envelopes(messages), *malformed])
    async with running_daemon(settings) as daemon:
        await wait_for_count(pg, ROWS, expected_rows(messages), timeout=40)
        await wait_for_count(pg, "SELECT count(*) FROM dead_letters", 2)
        await wait_for(lambda: all_committed(settings, ends), timeout=20)
        assert daemon.pipeline is not None
        assert (await daemon.pipeline.readiness())["kafka_intake"] is True
    assert await pg.fetchval(ROWS) == expected_rows(messages)
    letters = await pg.fetch("SELECT topic, reason FROM dead_letters ORDER BY topic")
    assert all(r["reason"].startswith("bad_envelope") for r in letters)
    assert all(r["topic"].startswith(f"kafka:{settings.kafka.raw_topic}/") for r in letters)


async def test_kill_9_mid_stream_loses_and_duplicates_nothing(
    settings: Settings, pg: asyncpg.Connection, kafka_bootstrap: str
) -> None:
    settings = await kafka_settings(settings, kafka_bootstrap)
    messages = simulated_messages(3000)
    expected = expected_rows(messages)
    ends = await produce(kafka_bootstrap, settings.kafka.raw_topic, envelopes(messages))
    env = kafka_env(settings)
    async with worker_process(settings, **env) as worker:
        await wait_for_count(pg, ROWS, 1, timeout=40)
        await worker.kill()  # SIGKILL: no drain, no commit, no goodbye
    written = await pg.fetchval(ROWS)
    async with worker_process(settings, **env) as worker:
        await wait_for_count(pg, ROWS, expected, timeout=60)
        await wait_for(lambda: all_committed(settings, ends), timeout=20)
        assert await worker.terminate(40) == 0, worker.output
    assert written <= expected
    assert await pg.fetchval(ROWS) == expected


async def test_kafka_intake_completes_across_a_broker_killed_and_restarted(
    settings: Settings, pg: asyncpg.Connection, kafka_server: KafkaServer
) -> None:
    """The broker is SIGKILLed while the worker holds records it has not committed (its
    PostgreSQL cut), and started again with its log: the worker writes what it held, commits
    once the broker is back, and ends with every reading once and the commits at the ends of
    every partition. The group's commits outlive the broker's restart: what was committed
    before is not delivered again."""
    async with served_again(kafka_server):
        settings = await kafka_settings(settings, kafka_server.bootstrap)
        settings.intake = replace(settings.intake, source="kafka")
        messages = simulated_messages(400)
        first, second = messages[:200], messages[200:]
        proxy, url = await proxied(settings.postgres.url)
        settings.postgres = replace(settings.postgres, url=url)
        try:
            async with running_daemon(settings) as daemon:
                counters = daemon.metrics.counters
                ends = await produce(kafka_server.bootstrap, settings.kafka.raw_topic, envelopes(first))
                await wait_for_count(pg, ROWS, expected_rows(first), timeout=30)
                await wait_for(lambda: all_committed(settings, ends), timeout=20)

                proxy.cut()  # the worker takes the second part and can finish none of it
                ends.update(
                    await produce(kafka_server.bootstrap, settings.kafka.raw_topic, envelopes(second))
                )
                await wait_for(lambda: _true(counters["messages_received"] == len(messages)), timeout=30)
                kafka_server.kill()
                await proxy.restore()  # the rows are written while the broker is away
                await wait_for_count(pg, ROWS, expected_rows(messages), timeout=30)

                await asyncio.to_thread(kafka_server.start)  # the same port, the log kept
                await wait_for(lambda: all_committed(settings, ends), timeout=40)
                # A broker that forgot the group's commits would deliver the first part again.
                assert counters["messages_received"] < len(messages) + len(first)
        finally:
            await proxy.stop()
    assert await pg.fetchval(ROWS) == expected_rows(messages)


@contextlib.asynccontextmanager
async def kafka_worker(settings: Settings, tag: str) -> AsyncIterator[Daemon]:
    worker_settings = replace(settings, intake=replace(settings.intake, source="kafka"))
    worker_settings.kafka = replace(settings.kafka, client_id=f"iotflow-{tag}")
    async with running_daemon(worker_settings) as daemon:
        yield daemon


def intake_partitions(daemon: Daemon) -> set[int]:
    assert daemon.pipeline is not None
    return daemon.pipeline.intake.partitions  # type: ignore[union-attr]


async def test_two_workers_split_the_partitions_and_a_rebalance_redelivers_the_rest(
    settings: Settings, pg: asyncpg.Connection, kafka_bootstrap: str
) -> None:
    settings = await kafka_settings(settings, kafka_bootstrap)
    first, second = simulated_messages(400)[:100], simulated_messages(400)[100:]
    expected = expected_rows(first) + expected_rows(second)
    proxy, url = await proxied(settings.postgres.url)
    a_settings = replace(settings, postgres=replace(settings.postgres, url=url))
    try:
        async with kafka_worker(a_settings, f"a-{uuid.uuid4().hex[:4]}") as a:
            await wait_for(lambda: _true(intake_partitions(a) == {0, 1, 2, 3}), timeout=30)
            ends = await produce(kafka_bootstrap, settings.kafka.raw_topic, envelopes(first))
            await wait_for_count(pg, ROWS, expected_rows(first), timeout=30)
            await wait_for(lambda: all_committed(settings, ends), timeout=20)

            # A's database goes away: it takes the second part but can finish none of it.
            proxy.cut()
            ends.update(await produce(kafka_bootstrap, settings.kafka.raw_topic, envelopes(second)))
            await wait_for(lambda: _true(a.metrics.counters["messages_received"] == 400), timeout=30)
            committed_before = await committed(
                kafka_bootstrap, settings.kafka.group, settings.kafka.raw_topic, 4
            )

            async with kafka_worker(settings, f"b-{uuid.uuid4().hex[:4]}") as b:

                async def split() -> bool:
                    mine, theirs = intake_partitions(a), intake_partitions(b)
                    return bool(mine) and bool(theirs) and not mine & theirs and mine | theirs == {0, 1, 2, 3}

                await wait_for(split, timeout=40)
                # A gave up what it had not finished; B reads its partitions from the commits.
                assert a.metrics.counters["kafka_uncommitted_dropped"] >= 1
                assert committed_before == await committed(
                    kafka_bootstrap, settings.kafka.group, settings.kafka.raw_topic, 4
                )
                b_partitions = intake_partitions(b)
                b_share = [m for m in second if _partition_of(settings, m, b_partitions)]
                await wait_for(
                    lambda: _true(b.metrics.counters["messages_committed"] >= len(b_share)), timeout=30
                )

                await proxy.restore()
                await wait_for_count(pg, ROWS, expected, timeout=40)
                await wait_for(lambda: all_committed(settings, ends), timeout=30)
    finally:
        await proxy.stop()
    assert await pg.fetchval(ROWS) == expected


def _partition_of(settings: Settings, message: tuple[str, bytes], partitions: set[int]) -> bool:
    """Whether the default partitioner puts this message's key in `partitions`."""
    from aiokafka.partitioner import DefaultPartitioner

    key = device_key(message[0]).encode()
    return DefaultPartitioner()(key, list(range(settings.kafka.partitions)), []) in partitions


async def _true(value: bool) -> bool:
    return value


def assigned(worker: IotflowProcess) -> set[int]:
    """The partitions a worker process holds now: its last `kafka.assigned`, unless revoked since."""
    held: set[int] = set()
    for record in worker.records():
        if record.get("event") == "kafka.assigned":
            held = set(record["partitions"])
        elif record.get("event") == "kafka.revoked":
            held -= set(record["partitions"])
    return held


async def test_two_worker_processes_one_killed_mid_stream_the_other_takes_over(
    settings: Settings, pg: asyncpg.Connection, kafka_bootstrap: str
) -> None:
    """Two `iotflow run` in one group split the partitions; the victim holds records it
    cannot finish (its database is cut) when it is SIGKILLed; the survivor takes its
    partitions over once the session expires and redelivers from the victim's commits."""
    settings = await kafka_settings(settings, kafka_bootstrap)
    messages = simulated_messages(1200)
    first, second = messages[:400], messages[400:]
    expected = expected_rows(messages)
    everything = set(range(settings.kafka.partitions))
    proxy, url = await proxied(settings.postgres.url)
    victim_settings = replace(settings, postgres=replace(settings.postgres, url=url))
    env = kafka_env(settings)
    try:
        async with (
            worker_process(victim_settings, **env, IOTFLOW_KAFKA_CLIENT_ID="iotflow-victim") as victim,
            worker_process(settings, **env, IOTFLOW_KAFKA_CLIENT_ID="iotflow-survivor") as survivor,
        ):

            async def split() -> bool:
                mine, theirs = assigned(victim), assigned(survivor)
                return bool(mine) and bool(theirs) and not mine & theirs and mine | theirs == everything

            await wait_for(split, timeout=40)
            victim_partitions = assigned(victim)
            # Both work: the first part is written and committed on every partition.
            ends = await produce(kafka_bootstrap, settings.kafka.raw_topic, envelopes(first))
            await wait_for_count(pg, ROWS, expected_rows(first), timeout=30)
            await wait_for(lambda: all_committed(settings, ends), timeout=20)

            # The victim's database goes away: it can finish nothing of the second part.
            proxy.cut()
            ends.update(await produce(kafka_bootstrap, settings.kafka.raw_topic, envelopes(second)))
            theirs = [m for m in second if not _partition_of(settings, m, victim_partitions)]
            stranded = [m for m in second if _partition_of(settings, m, victim_partitions)]
            assert theirs and stranded  # the fleet's keys land on both workers' partitions
            await wait_for_count(pg, ROWS, expected_rows(first) + expected_rows(theirs), timeout=30)
            done = await committed(kafka_bootstrap, settings.kafka.group, settings.kafka.raw_topic, 4)
            assert any(done[p] < ends.get(p, 0) for p in victim_partitions), (done, ends)

            await victim.kill()  # SIGKILL mid-stream: no drain, no commit, no leaving the group
            await wait_for(lambda: _true(assigned(survivor) == everything), timeout=40)
            await wait_for_count(pg, ROWS, expected, timeout=40)
            await wait_for(lambda: all_committed(settings, ends), timeout=30)
            assert await survivor.terminate(40) == 0, survivor.output
    finally:
        await proxy.stop()
    # The primary key (timestamp, device_id, datapoint_id) holds a reading once: the count
    # equal to the readings produced is every reading, exactly once.
    assert await pg.fetchval(ROWS) == expected
