"""The Kafka bridge against a real Kafka 4 (KRaft) with the idempotent producer: MQTT in →
PostgreSQL rows and records in raw-iot-data / processed-iot-data; Kafka cut, hung or
killed -9 → nothing acknowledged before Kafka has it, nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
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
from worker.tools.servers import KafkaServer
from worker.tools.simulate import readings_per_message

from .helpers import background, publish, running_daemon, wait_for, wait_for_count, worker_process
from .kafka import RefusingProducerIds, describe_topic, free_port, kafka_settings, log_ends, read_topic
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

    raw = await read_topic(kafka_bootstrap, settings.kafka.raw_topic)
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

    processed = await read_topic(kafka_bootstrap, settings.kafka.processed_topic)
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


@contextlib.asynccontextmanager
async def broker_behind_proxy(directory: Path) -> AsyncIterator[tuple[KafkaServer, TcpProxy]]:
    """A Kafka of the test's own that its clients reach only through a proxy the test can
    cut, freeze or mute (`broker.proxied_bootstrap`); `broker.bootstrap` stays direct."""
    proxy_port = free_port()
    with KafkaServer(directory, advertised_port=proxy_port) as broker:
        assert broker.proxied_port is not None
        proxy = TcpProxy("127.0.0.1", broker.proxied_port)
        proxy.port = proxy_port
        await proxy.restore()  # listen on the advertised port
        try:
            yield broker, proxy
        finally:
            await proxy.stop()


async def test_idempotence_against_a_broker_that_refuses_producer_ids_is_one_line_and_exit_2(
    settings: Settings, private_dir: Path
) -> None:
    """`kafka.idempotence = true` and a broker answering InitProducerId with an error: a
    configuration mismatch, named in one line, exit 2; no traceback, no restart loop. The
    same broker through the same proxy takes the bridge with idempotence off."""
    proxy_port = free_port()
    with KafkaServer(private_dir, advertised_port=proxy_port) as broker:
        assert broker.proxied_port is not None
        proxy = RefusingProducerIds(proxy_port, broker.proxied_port)
        await proxy.start()
        try:
            settings = await kafka_settings(settings, broker.bootstrap, bridge=True)
            env = {
                "IOTFLOW_KAFKA_BRIDGE": "true",
                "IOTFLOW_KAFKA_BOOTSTRAP": broker.proxied_bootstrap,
                "IOTFLOW_KAFKA_RAW_TOPIC": settings.kafka.raw_topic,
                "IOTFLOW_KAFKA_PROCESSED_TOPIC": settings.kafka.processed_topic,
            }
            async with worker_process(settings, **env) as worker:
                code = await worker.wait(120)
            assert code == 2, worker.output[-3000:]
            assert "Traceback" not in worker.output
            (refused,) = [r for r in worker.records() if r["event"] == "stores.refused"]
            assert refused["error"].startswith("kafka.idempotence: ")
            assert "kafka.idempotence = false" in refused["hint"]
            assert proxy.refused >= 1

            async with worker_process(settings, **env, IOTFLOW_KAFKA_IDEMPOTENCE="false") as worker:
                await worker.wait_for_event("supervisor.ready", timeout=60)
                assert await worker.terminate() == 0
        finally:
            await proxy.stop()


async def test_kafka_outage_holds_messages_and_recovers(
    settings: Settings, pg: asyncpg.Connection, private_dir: Path
) -> None:
    """Kafka cut while MQTT publishes: the idempotent producer keeps the batch and sends it
    again until Kafka answers, so the writer holds it (reported slow), acknowledges nothing
    of it meanwhile, and every message reaches Kafka once."""
    async with broker_behind_proxy(private_dir) as (broker, proxy):
        settings = await kafka_settings(settings, broker.proxied_bootstrap, bridge=True)
        settings.pipeline = replace(settings.pipeline, slow_write_s=0.5)
        async with running_daemon(settings) as daemon:
            assert daemon.pipeline is not None
            writer, counters = daemon.pipeline.writer, daemon.metrics.counters
            await publish(settings.mqtt.url, json_messages(0, 50))
            await wait_for(lambda: _true(counters["messages_committed"] == 50))

            proxy.cut()
            await publish(settings.mqtt.url, json_messages(50, 150))
            await wait_for(lambda: _true(counters["sink_slow"] > 0), timeout=20)
            # Kafka has not taken the batch: nothing of it is acknowledged to the broker.
            assert counters["messages_committed"] == 50
            assert (await daemon.pipeline.readiness())["kafka"] is False

            await proxy.restore()
            await wait_for(lambda: _true(counters["messages_committed"] == 200), timeout=30)
            await wait_for(lambda: _true(not writer.down))
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 200)
        raw = await read_topic(broker.bootstrap, settings.kafka.raw_topic)
    assert Counter(read_envelope(r.value)[:2] for r in raw) == Counter(json_messages(0, 200))


async def test_a_stop_while_kafka_is_away_ends_in_bounded_time_and_the_unsent_come_again(
    settings: Settings, pg: asyncpg.Connection, private_dir: Path
) -> None:
    """SIGTERM while Kafka is cut and the idempotent producer holds a batch (which aiokafka
    would resend forever): the daemon gives up on it after its shutdown timeout and one
    request's time, exits 1 saying so, and has acknowledged none of it to MQTT, so the next
    run, with Kafka back, bridges every message once."""
    async with broker_behind_proxy(private_dir) as (broker, proxy):
        settings = await kafka_settings(settings, broker.proxied_bootstrap, bridge=True)
        env = {
            "IOTFLOW_KAFKA_BOOTSTRAP": broker.proxied_bootstrap,
            "IOTFLOW_KAFKA_BRIDGE": "true",
            "IOTFLOW_KAFKA_RAW_TOPIC": settings.kafka.raw_topic,
            "IOTFLOW_KAFKA_PROCESSED_TOPIC": settings.kafka.processed_topic,
            "IOTFLOW_KAFKA_REQUEST_TIMEOUT_MS": "2000",
            "IOTFLOW_RUNTIME_SHUTDOWN_TIMEOUT_S": "2",
        }
        async with worker_process(settings, **env) as worker:
            await worker.wait_for_event("supervisor.ready")
            await publish(settings.mqtt.url, json_messages(0, 50))
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 50)
            proxy.cut()
            await publish(settings.mqtt.url, json_messages(50, 100))
            await worker.wait_for_event("sink.slow")
            # Bounded by the shutdown timeout (2 s) and one request (2 s), not by Kafka's return.
            assert await worker.terminate(30) == 1, worker.output
            assert "kafka.unsent_abandoned" in worker.events()
        await proxy.restore()
        async with worker_process(settings, **env) as worker:
            # The rows may be in PostgreSQL already (stored before the cut Kafka held their
            # acknowledgement): the redelivered messages reaching Kafka say this run has them.
            await worker.wait_for_event("supervisor.ready")

            async def all_bridged() -> bool:
                raw = await read_topic(broker.bootstrap, settings.kafka.raw_topic)
                return {read_envelope(r.value)[:2] for r in raw} >= set(json_messages(0, 150))

            await wait_for(all_bridged, timeout=60, interval=0.5)
            assert await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 150) == 150
            assert await worker.terminate(30) == 0, worker.output
        raw = await read_topic(broker.bootstrap, settings.kafka.raw_topic)
    bridged = Counter(read_envelope(r.value)[:2] for r in raw)
    # The unsent ones come once. A message of the first 50 may come twice: Kafka may have
    # stored it while its answer was cut, and the next run publishes it again under a new
    # producer id (at least once; docs/kafka.md).
    assert set(bridged) == set(json_messages(0, 150))
    assert all(bridged[message] == 1 for message in json_messages(50, 100))


async def test_broker_killed_mid_stream_and_restarted_duplicates_and_loses_nothing(
    settings: Settings, pg: asyncpg.Connection, private_dir: Path
) -> None:
    """The broker writes a batch whose answer never reaches the worker (the proxy mutes it),
    then is SIGKILLed and started again with its log while MQTT keeps publishing. The
    idempotent producer sends the unanswered batch again with the same producer id and
    sequence numbers, and the restarted broker, its producer state rebuilt from the log,
    keeps the copy it has: every message once in raw-iot-data, every reading once in
    processed-iot-data, nothing acknowledged to MQTT before Kafka had it."""
    async with broker_behind_proxy(private_dir) as (broker, proxy):
        settings = await kafka_settings(settings, broker.proxied_bootstrap, bridge=True)
        raw_topic = settings.kafka.raw_topic
        async with running_daemon(settings) as daemon:
            counters = daemon.metrics.counters
            await publish(settings.mqtt.url, json_messages(0, 50))
            await wait_for(lambda: _true(counters["messages_committed"] == 50))

            proxy.mute()
            await publish(settings.mqtt.url, json_messages(50, 100))

            async def written_unanswered() -> bool:
                return sum((await log_ends(broker.bootstrap, raw_topic)).values()) > 50

            await wait_for(written_unanswered, timeout=20)
            assert counters["messages_committed"] == 50
            broker.kill()
            proxy.cut()  # the answer the proxy held back is dropped with the connection
            proxy.thaw()
            await proxy.restore()
            await publish(settings.mqtt.url, json_messages(150, 50))  # while Kafka is away
            assert counters["messages_committed"] == 50
            await asyncio.to_thread(broker.start)  # the same ports, the log kept
            await wait_for(lambda: _true(counters["messages_committed"] == 200), timeout=60)
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 200)
        raw = await read_topic(broker.bootstrap, raw_topic)
        processed = await read_topic(broker.bootstrap, settings.kafka.processed_topic)
    assert Counter(read_envelope(r.value)[:2] for r in raw) == Counter(json_messages(0, 200))
    temperatures = sorted(orjson.loads(r.value)["value"] for r in processed)
    assert temperatures == [float(n) for n in range(200)]  # no gap, no repeat


async def test_the_send_buffer_stays_bounded_while_kafka_hangs(settings: Settings, private_dir: Path) -> None:
    """A broker that takes the connection and answers nothing (frozen): the bridge hands
    the producer no more than `kafka.buffer_bytes` of record batches, and once Kafka
    answers the batch is there exactly once (the producer resent what the frozen link
    held with the same sequence numbers; the sink resends only what it never handed over)."""
    from aiokafka.errors import KafkaTimeoutError

    from schemas.records import DecodedBatch, Reading
    from worker.sinks.kafka import KafkaBridgeSink
    from worker.stores.kafka import create_producer

    async with broker_behind_proxy(private_dir) as (broker, proxy):
        settings = await kafka_settings(settings, broker.proxied_bootstrap)
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
            async with background(sink.write(batch)) as first:
                # It fills the buffer (more than one batch) and goes no further.
                await wait_for(lambda: _true(sink.buffer.bytes > kafka.max_batch_bytes))
                proxy.thaw()
                with contextlib.suppress(KafkaTimeoutError):  # no room in time: the writer retries
                    await first
            if first.exception() is not None:
                await sink.write(batch)  # the retry: only what was never handed over
            assert kafka.max_batch_bytes < sink.buffer.peak <= kafka.buffer_bytes
            assert sink.buffer.bytes == 0
        finally:
            await producer.stop()
        processed = await read_topic(broker.bootstrap, kafka.processed_topic)
    got = Counter((r.key, orjson.loads(r.value)["datapoint_id"]) for r in processed)
    assert got == Counter((str(r.device_id).encode(), r.datapoint_id) for r in readings)


async def test_missing_topics_stop_the_daemon_with_exit_2(settings: Settings, kafka_bootstrap: str) -> None:
    from worker.pipeline import Daemon

    settings.kafka = replace(
        settings.kafka, bootstrap=kafka_bootstrap, bridge=True, raw_topic="never-created"
    )
    assert await asyncio.wait_for(Daemon(settings).run(handle_signals=False), 30) == 2


async def _true(value: bool) -> bool:
    return value


async def test_migrate_creates_the_topics_with_the_configured_partitions_once(
    settings: Settings, kafka_bootstrap: str
) -> None:
    """`iotflow migrate` creates both topics with `kafka.partitions` partitions (read back
    from the broker's metadata); a second run with another count leaves them as they are."""
    import subprocess
    import sys
    import uuid

    from .conftest import worker_env

    tag = uuid.uuid4().hex[:8]
    raw, processed = f"raw-m-{tag}", f"processed-m-{tag}"
    env = {
        **worker_env(settings),
        "IOTFLOW_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "IOTFLOW_KAFKA_BRIDGE": "true",
        "IOTFLOW_KAFKA_RAW_TOPIC": raw,
        "IOTFLOW_KAFKA_PROCESSED_TOPIC": processed,
    }
    for partitions in ("3", "5"):
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "worker", "migrate"],
            env={**env, "IOTFLOW_KAFKA_PARTITIONS": partitions},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        for topic in (raw, processed):
            replicas = await describe_topic(kafka_bootstrap, topic)
            assert {number: len(brokers) for number, brokers in replicas.items()} == {0: 1, 1: 1, 2: 1}


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
