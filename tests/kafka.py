"""Kafka for the tests: helpers around a real Kafka (the session's KafkaServer, or one a
test starts for itself to kill or to put behind a proxy)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from worker.config import Settings
from worker.stores.kafka import create_topics
from worker.tools.embedded import free_port
from worker.tools.servers import KafkaServer

__all__ = [
    "RefusingProducerIds",
    "committed",
    "describe_topic",
    "free_port",
    "kafka_settings",
    "log_ends",
    "produce",
    "read_topic",
    "served_again",
]


async def kafka_settings(settings: Settings, bootstrap: str, **changes: object) -> Settings:
    """`settings` with Kafka on `bootstrap`: topics and group of the test's own (created
    here, 4 partitions), short timeouts, the idempotent producer as configured by default."""
    tag = uuid.uuid4().hex[:8]
    settings.kafka = replace(
        settings.kafka,
        bootstrap=bootstrap,
        raw_topic=f"raw-{tag}",
        processed_topic=f"processed-{tag}",
        group=f"iotflow-{tag}",
        partitions=4,
        request_timeout_ms=3000,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        **changes,  # type: ignore[arg-type]
    )
    await create_topics(settings.kafka, [settings.kafka.raw_topic, settings.kafka.processed_topic])
    return settings


@contextlib.asynccontextmanager
async def _consumer(bootstrap: str, **options: object) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **options)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def describe_topic(bootstrap: str, topic: str) -> dict[int, list[int]]:
    """The topic's partitions and each one's replicas (broker ids), from a Metadata request
    of the admin client ({} when the topic does not exist)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described["error_code"] != 0:
        return {}
    return {p["partition"]: p["replicas"] for p in described["partitions"]}


async def log_ends(bootstrap: str, topic: str) -> dict[int, int]:
    """Each partition's log end offset (the offset the next record will get)."""
    partitions = await describe_topic(bootstrap, topic)
    async with _consumer(bootstrap) as consumer:
        ends = await consumer.end_offsets([TopicPartition(topic, number) for number in partitions])
        return {tp.partition: offset for tp, offset in ends.items()}


async def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[ConsumerRecord]:
    """Every record of `topic` (all partitions, from the start) up to the log ends as they
    are when called."""
    ends = await log_ends(bootstrap, topic)
    async with _consumer(bootstrap) as consumer:
        tps = [TopicPartition(topic, number) for number in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout
        unread = {tp for tp in tps if ends[tp.partition] > 0}
        while unread:
            for tp, batch in (await consumer.getmany(*unread, timeout_ms=200)).items():
                records.extend(r for r in batch if r.offset < ends[tp.partition])
                if await consumer.position(tp) >= ends[tp.partition]:
                    unread.discard(tp)
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: {len(records)} records read of the log ends {ends}")
        return records


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
    async with _consumer(bootstrap, group_id=group) as consumer:
        result = {}
        for number in range(partitions):
            offset = await consumer.committed(TopicPartition(topic, number))
            result[number] = -1 if offset is None else offset
        return result


@contextlib.asynccontextmanager
async def served_again(server: KafkaServer) -> AsyncIterator[KafkaServer]:
    """For a test that kills the session's broker: it is serving again when the test ends,
    passed or failed (the next test expects it). Started in a thread: the test's daemon
    shares this event loop."""
    try:
        yield server
    finally:
        if not server.running:
            await asyncio.to_thread(server.start)


INIT_PRODUCER_ID = 22  # the Kafka API key an idempotent producer asks its id with
UNKNOWN_SERVER_ERROR = -1


class RefusingProducerIds:
    """A proxy in front of a real broker (one whose metadata names `port`, see KafkaServer's
    `advertised_port`) that forwards every request but InitProducerId, which it answers
    itself with UNKNOWN_SERVER_ERROR: what a broker without idempotent producers says.
    Requests and responses are passed whole frames at a time, and the refusal waits for
    the answers already due on that connection, so the client sees them in order."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port = port
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.refused = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        due = asyncio.Condition()  # the number of forwarded requests not yet answered
        pending = [0]

        async def upstream() -> None:
            while frame := await _frame(reader):
                api_key, api_version, correlation = struct.unpack_from(">hhi", frame, 4)
                if api_key == INIT_PRODUCER_ID and api_version < 2:  # v0, v1: no tagged fields
                    async with due:
                        await due.wait_for(lambda: pending[0] == 0)
                        body = struct.pack(">iihqh", correlation, 0, UNKNOWN_SERVER_ERROR, -1, -1)
                        writer.write(struct.pack(">i", len(body)) + body)
                        self.refused += 1
                    continue
                async with due:
                    pending[0] += 1
                up_writer.write(frame)

        async def downstream() -> None:
            while frame := await _frame(up_reader):
                writer.write(frame)
                async with due:
                    pending[0] -= 1
                    due.notify_all()

        try:
            await asyncio.gather(upstream(), downstream())
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for end in (writer, up_writer):
                self._writers.discard(end)
                end.transport.abort()


async def _frame(reader: asyncio.StreamReader) -> bytes:
    """One length-prefixed Kafka frame, prefix included; b"" at the end of the stream."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError:
        return b""
    (size,) = struct.unpack(">i", head)
    return head + await reader.readexactly(size)
