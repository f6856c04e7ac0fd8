"""The Kafka bridge against a real Kafka-protocol broker: MQTT in → PostgreSQL rows and
records in raw-iot-data / processed-iot-data; Kafka away → nothing acknowledged, no loss."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import asyncpg
import orjson
import pytest

from schemas.envelope import BadEnvelope, device_key, raw_envelope, read_envelope
from schemas.records import AckToken, RawMessage
from worker.config import Settings
from worker.decode.codecs import load_codecs
from worker.stores.kafka import create_topics
from worker.tools.simulate import readings_per_message

from .helpers import publish, running_daemon, wait_for, wait_for_count
from .kafka import Tansu, free_port, kafka_settings, read_topic
from .tcpproxy import TcpProxy
from .test_end_to_end import simulated_messages
from .test_outages import json_messages


async def test_bridge_publishes_messages_and_readings(
    settings: Settings, pg: asyncpg.Connection, kafka_bootstrap: str
) -> None:
    settings = await kafka_settings(settings, kafka_bootstrap, bridge=True)
    codecs = load_codecs()
    messages = simulated_messages(120)
    binary = ("devices/sim-json-01/telemetry", b"\xff\xfe not utf-8")  # a dead letter, bridged as base64
    expected = sum(readings_per_message(t, p, codecs) for t, p in messages)
    async with running_daemon(settings) as daemon:
        assert daemon.pipeline is not None
        assert (await daemon.pipeline.readiness())["kafka"] is True
        await publish(settings.mqtt.url, [*messages, binary])
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", expected)
        await wait_for(lambda: _true(daemon.metrics.counters["messages_committed"] == len(messages) + 1))

    raw = await read_topic(kafka_bootstrap, settings.kafka.raw_topic, len(messages) + 1)
    assert len(raw) == len(messages) + 1
    sent = Counter([*messages, binary])
    got = Counter()
    for record in raw:
        topic, payload, _ = read_envelope(record.value)
        assert record.key == device_key(topic).encode()
        got[(topic, payload)] += 1
    assert got == sent
    envelope = next(orjson.loads(r.value) for r in raw if b"base64" in r.value)
    assert envelope["v"] == 1 and envelope["topic"] == binary[0]

    processed = await read_topic(kafka_bootstrap, settings.kafka.processed_topic, expected)
    assert len(processed) == expected
    rows = await pg.fetch("SELECT device_id, datapoint_id, value, timestamp FROM decoded_data")
    in_postgres = Counter((r["device_id"], r["datapoint_id"], r["value"], r["timestamp"]) for r in rows)
    in_kafka = Counter()
    for record in processed:
        reading = orjson.loads(record.value)
        assert set(reading) == {"device_id", "datapoint_id", "value", "timestamp"}
        assert record.key == str(reading["device_id"]).encode()
        stamp = datetime.fromisoformat(reading["timestamp"].replace("Z", "+00:00"))
        in_kafka[(reading["device_id"], reading["datapoint_id"], reading["value"], stamp)] += 1
    assert in_kafka == in_postgres


async def test_kafka_outage_holds_messages_and_recovers(
    settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    proxy_port = free_port()
    with Tansu(tmp_path, advertised_port=proxy_port) as broker:
        proxy = TcpProxy("127.0.0.1", broker.port)
        proxy.port = proxy_port
        await proxy.restore()  # listen on the advertised port
        try:
            settings = await kafka_settings(settings, broker.bootstrap, bridge=True)
            settings.kafka = replace(settings.kafka, request_timeout_ms=1500)
            async with running_daemon(settings) as daemon:
                assert daemon.pipeline is not None
                writer = daemon.pipeline.writer
                await publish(settings.mqtt.url, json_messages(0, 50))
                await wait_for(lambda: _true(daemon.metrics.counters["messages_committed"] == 50))

                proxy.cut()
                await publish(settings.mqtt.url, json_messages(50, 150))
                await wait_for(lambda: _true("kafka" in writer.down), timeout=20)
                # Kafka has not taken the batch: nothing of it is acknowledged to the broker.
                assert daemon.metrics.counters["messages_committed"] == 50
                assert (await daemon.pipeline.readiness())["sinks"] is False

                await proxy.restore()
                await wait_for(
                    lambda: _true(daemon.metrics.counters["messages_committed"] == 200), timeout=30
                )
                await wait_for(lambda: _true(not writer.down))
                await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 200)
            raw = await read_topic(broker.bootstrap, settings.kafka.raw_topic, 200)
        finally:
            await proxy.stop()
    got = Counter(read_envelope(r.value)[:2] for r in raw)
    assert set(got) == set(json_messages(0, 200))  # none lost
    assert sum(got.values()) == 200  # and a retry resent only what Kafka had not taken


async def test_broker_killed_mid_stream_and_restarted(
    settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """tansu stopped (SIGSTOP) while the bridge sends, then SIGKILLed and started again on
    the same port while MQTT keeps publishing. Its log was in memory, so the new broker
    starts empty (the wheel's tansu has no persistent storage engine): the messages the
    old one acknowledged went with it; every other one must reach the new one, none is
    acknowledged to MQTT before, and the worker recovers by itself."""
    with Tansu(tmp_path) as broker:
        settings = await kafka_settings(settings, broker.bootstrap, bridge=True)
        settings.kafka = replace(settings.kafka, request_timeout_ms=1500)
        async with running_daemon(settings) as daemon:
            assert daemon.pipeline is not None
            writer, counters = daemon.pipeline.writer, daemon.metrics.counters
            await publish(settings.mqtt.url, json_messages(0, 50))
            await wait_for(lambda: _true(counters["messages_committed"] == 50))

            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGSTOP)  # hangs: the next batch is sent and never answered
            await publish(settings.mqtt.url, json_messages(50, 100))
            await wait_for(lambda: _true(counters["messages_received"] == 150))
            broker.kill()  # with that batch in flight
            await publish(settings.mqtt.url, json_messages(150, 50))
            await wait_for(lambda: _true("kafka" in writer.down), timeout=20)
            assert counters["messages_committed"] == 50  # nothing acknowledged without Kafka

            broker.start()  # the same port, empty
            await create_topics(settings.kafka, [settings.kafka.raw_topic, settings.kafka.processed_topic])
            await wait_for(lambda: _true(counters["messages_committed"] == 200), timeout=60)
            await wait_for(lambda: _true(not writer.down))
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 200)
        raw = await read_topic(broker.bootstrap, settings.kafka.raw_topic, 150)
        processed = await read_topic(broker.bootstrap, settings.kafka.processed_topic, 150)
    # Every message the old broker had not acknowledged is in the new one (a batch it took
    # before the stop but never answered may be there twice: at least once).
    assert {read_envelope(r.value)[:2] for r in raw} == set(json_messages(50, 150))
    temperatures = {orjson.loads(r.value)["value"] for r in processed}
    assert temperatures == {float(n) for n in range(50, 200)}


async def test_the_send_buffer_stays_bounded_while_kafka_hangs(settings: Settings, tmp_path: Path) -> None:
    """A broker that takes the connection and answers nothing (frozen): the bridge hands
    the producer no more than `kafka.buffer_bytes` of record batches, the write fails
    after the request timeout, and the same batch goes through once Kafka answers."""
    from aiokafka.errors import KafkaError

    from schemas.records import DecodedBatch, Reading
    from worker.sinks.kafka import KafkaBridgeSink
    from worker.stores.kafka import create_producer

    proxy_port = free_port()
    with Tansu(tmp_path, advertised_port=proxy_port) as broker:
        proxy = TcpProxy("127.0.0.1", broker.port)
        proxy.port = proxy_port
        await proxy.restore()
        try:
            settings = await kafka_settings(settings, broker.bootstrap)
            # Batches of ~4 KiB (~40 readings), room for two of them.
            kafka = replace(settings.kafka, max_batch_bytes=4096, buffer_bytes=8192, request_timeout_ms=1500)
            stamp = datetime.fromisoformat("2026-01-01T00:00:00+00:00")
            readings = [Reading(stamp, device, n, float(n), "t") for device in range(8) for n in range(100)]
            batch = DecodedBatch(readings=readings, messages=len(readings))
            producer = create_producer(kafka)
            await producer.start()
            try:
                sink = KafkaBridgeSink(producer, kafka, raw=False)
                proxy.freeze()
                with pytest.raises(KafkaError):
                    await sink.write(batch)
                # It filled the buffer (more than one batch) and went no further.
                assert kafka.max_batch_bytes < sink.buffer.peak <= kafka.buffer_bytes
                assert sink.buffer.bytes == 0  # every batch handed over was answered (failed)
                proxy.thaw()
                await sink.write(batch)  # the retry: only what Kafka does not have
                assert sink.buffer.peak <= kafka.buffer_bytes and sink.buffer.bytes == 0
            finally:
                await producer.stop()
            processed = await read_topic(broker.bootstrap, kafka.processed_topic, len(readings))
        finally:
            await proxy.stop()
    got = Counter((r.key, orjson.loads(r.value)["datapoint_id"]) for r in processed)
    # Every reading at least once (bytes a frozen link held may still arrive after the thaw).
    assert set(got) == {(str(r.device_id).encode(), r.datapoint_id) for r in readings}


async def test_missing_topics_stop_the_daemon_with_exit_2(settings: Settings, kafka_bootstrap: str) -> None:
    from worker.pipeline import Daemon

    settings.kafka = replace(
        settings.kafka, bootstrap=kafka_bootstrap, bridge=True, raw_topic="never-created", idempotence=False
    )
    assert await asyncio.wait_for(Daemon(settings).run(handle_signals=False), 30) == 2


async def _true(value: bool) -> bool:
    return value


async def test_migrate_creates_the_topics_once(settings: Settings, kafka_bootstrap: str) -> None:
    import subprocess
    import sys
    import uuid

    from aiokafka import AIOKafkaConsumer

    from .conftest import worker_env

    tag = uuid.uuid4().hex[:8]
    env = {
        **worker_env(settings),
        "IOTFLOW_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "IOTFLOW_KAFKA_BRIDGE": "true",
        "IOTFLOW_KAFKA_RAW_TOPIC": f"raw-m-{tag}",
        "IOTFLOW_KAFKA_PROCESSED_TOPIC": f"processed-m-{tag}",
        "IOTFLOW_KAFKA_PARTITIONS": "3",
    }
    for _ in range(2):  # the second run finds them and changes nothing
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "worker", "migrate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
    await consumer.start()
    try:
        topics = await consumer.topics()
        assert {f"raw-m-{tag}", f"processed-m-{tag}"} <= topics
        assert consumer.partitions_for_topic(f"raw-m-{tag}") == {0, 1, 2}
    finally:
        await consumer.stop()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (None, "empty record"),
        (b"[1]", "not a JSON object"),
        (b'{"v": 2}', "unknown envelope version"),
        (b'{"v": 1, "topic": "t", "payload": 3, "received_at": 1}', "must be strings"),
        (b'{"v": 1, "topic": "t", "payload": "", "received_at": "x"}', "epoch seconds"),
        (b'{"v": 1, "topic": "t", "payload": "!", "received_at": 1, "encoding": "base64"}', "not base64"),
        (b'{"v": 1, "topic": "t", "payload": "", "received_at": 1, "encoding": "rot13"}', "unknown encoding"),
    ],
)
def test_bad_envelopes_say_why(value: bytes | None, problem: str) -> None:
    with pytest.raises(BadEnvelope, match=problem):
        read_envelope(value)


def test_envelopes_round_trip_text_and_binary() -> None:
    for payload in (b'{"temperature": 21.5}', b"\x00\xff\x10"):
        message = RawMessage("devices/d1/telemetry", payload, 1767225600.125, AckToken(0, 0))
        assert read_envelope(raw_envelope(message)) == ("devices/d1/telemetry", payload, 1767225600.125)
    assert device_key("tele/f2-aabbccddee01/sensor-mode/io/sensor-x") == "f2-aabbccddee01"
    assert device_key("odd") == "odd"
