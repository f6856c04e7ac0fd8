"""The Kafka bridge: what intake received to `kafka.raw_topic`, decoded readings to
`kafka.processed_topic` (docs/kafka.md has both formats).

A sink like the others: `write` returns once Kafka acknowledged (acks=all) every
record of the batch, so the writer acknowledges the MQTT messages (or commits the
Kafka offsets) only then. When Kafka is away the sends time out after
`kafka.request_timeout_ms`, the writer retries with backoff (one `sink.unavailable`
line) and intake stops reading: backpressure, not loss. A retry resends only the
records Kafka has not acknowledged yet, so an outage adds no duplicates.

The records go to the producer as whole record batches, one partition at a time
(`create_batch`/`send_batch`), not one `send` per record: a future per Kafka batch
instead of one per record, and each record encoded only when it is appended, so the
encoded records of a writer batch never exist all at once. What is handed to the
producer and not yet acknowledged is bounded by `kafka.buffer_bytes`.
"""

from __future__ import annotations

import asyncio
import functools
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiokafka.errors import KafkaTimeoutError
from aiokafka.partitioner import murmur2

from schemas.envelope import device_key, processed_record, raw_envelope
from schemas.records import DecodedBatch
from worker.config import KafkaSettings

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.producer.message_accumulator import BatchBuilder


@functools.lru_cache(maxsize=65536)
def partition_of(key: bytes, partitions: int) -> int:
    """The partition aiokafka's (and the Java client's) default partitioner picks for
    `key`: murmur2, positive, modulo the count. Cached: keys are devices, and repeat."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class SendBuffer:
    """Bytes of record batches handed to the producer and not yet acknowledged, kept
    at most `limit` (a single batch larger than the limit goes alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self.peak = 0  # the most ever held, for /metrics and the tests
        self._released = asyncio.Event()

    async def reserve(self, size: int, timeout: float) -> None:
        while self.bytes and self.bytes + size > self.limit:
            self._released.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._released.wait()
            except TimeoutError:
                raise KafkaTimeoutError("no room in the send buffer") from None
        self.bytes += size
        self.peak = max(self.peak, self.bytes)

    def release(self, size: int) -> None:
        self.bytes -= size
        self._released.set()


class KafkaBridgeSink:
    """Writes each batch to Kafka before it is acknowledged; the producer is the stores'."""

    name = "kafka"

    def __init__(self, producer: AIOKafkaProducer, settings: KafkaSettings, *, raw: bool) -> None:
        self._producer = producer
        self._settings = settings
        self._raw = raw  # MQTT intake: publish the messages too; Kafka intake read them from there
        self._timeout = settings.request_timeout_ms / 1000
        self.buffer = SendBuffer(settings.buffer_bytes)
        self._batch: DecodedBatch | None = None
        # One byte per record of the batch (messages first, then readings): 1 once Kafka has it.
        self._acknowledged = bytearray()

    async def write(self, batch: DecodedBatch) -> None:
        if batch is not self._batch:  # a new batch; the same one again is a retry
            self._batch = batch
            self._acknowledged = bytearray(self._raw * len(batch.raw) + len(batch.readings))
        sent: list[asyncio.Future[Any]] = []
        failure: BaseException | None = None
        try:
            for topic, partition, indexes in await self._plan(batch):
                await self._send_partition(batch, topic, partition, indexes, sent)
        except Exception as exc:
            failure = exc
        for result in await asyncio.gather(*sent, return_exceptions=True):
            if isinstance(result, BaseException):
                failure = failure or result
        if failure is not None:
            raise failure
        self._batch, self._acknowledged = None, bytearray()

    async def _plan(self, batch: DecodedBatch) -> list[tuple[str, int, array[int]]]:
        """The indexes of the records Kafka does not have yet, by topic and partition, in
        the batch's order (so a device's records stay in order within its partition)."""
        plan: dict[tuple[str, int], array[int]] = {}
        acknowledged = self._acknowledged
        index = 0
        for topic, keys in self._keys(batch):
            partitions = sorted(await self._producer.partitions_for(topic))
            count = len(partitions)
            for key in keys:
                if not acknowledged[index]:
                    partition = partitions[partition_of(key, count)]
                    indexes = plan.get((topic, partition))
                    if indexes is None:
                        indexes = plan[(topic, partition)] = array("I")
                    indexes.append(index)
                index += 1
        return [(topic, partition, indexes) for (topic, partition), indexes in plan.items()]

    def _keys(self, batch: DecodedBatch) -> Iterator[tuple[str, Iterator[bytes]]]:
        if self._raw:
            yield self._settings.raw_topic, (device_key(m.topic).encode() for m in batch.raw)
        yield self._settings.processed_topic, (str(r.device_id).encode() for r in batch.readings)

    async def _send_partition(
        self,
        batch: DecodedBatch,
        topic: str,
        partition: int,
        indexes: array[int],
        sent: list[asyncio.Future[Any]],
    ) -> None:
        """Encode the records into as many full batches as they need and hand each over."""
        raw = len(batch.raw) if self._raw else 0
        builder = self._producer.create_batch()
        first = 0
        for position, index in enumerate(indexes):
            if index < raw:
                message = batch.raw[index]
                key = device_key(message.topic).encode()
                value = raw_envelope(message)
                timestamp: int | None = int(message.received_at * 1000)
            else:
                reading = batch.readings[index - raw]
                key, value, timestamp = str(reading.device_id).encode(), processed_record(reading), None
            if builder.append(key=key, value=value, timestamp=timestamp) is None:  # full
                sent.append(await self._hand_over(builder, topic, partition, indexes[first:position]))
                builder = self._producer.create_batch()
                first = position
                builder.append(key=key, value=value, timestamp=timestamp)  # the first always fits
        sent.append(await self._hand_over(builder, topic, partition, indexes[first:]))

    async def _hand_over(
        self, builder: BatchBuilder, topic: str, partition: int, indexes: array[int]
    ) -> asyncio.Future[Any]:
        builder.close()  # complete: no linger, the writer has batched already
        size = builder.size()
        await self.buffer.reserve(size, self._timeout)
        try:
            future: asyncio.Future[Any] = await self._producer.send_batch(builder, topic, partition=partition)
        except BaseException:
            self.buffer.release(size)
            raise
        acknowledged = self._acknowledged

        def done(future: asyncio.Future[Any]) -> None:
            self.buffer.release(size)
            if not future.cancelled() and future.exception() is None:
                for index in indexes:
                    acknowledged[index] = 1

        future.add_done_callback(done)
        return future

    async def reset(self) -> None:
        """Nothing to drop: the producer reconnects by itself."""

    async def close(self) -> None:
        """The producer belongs to the stores, which close it after the writer."""
