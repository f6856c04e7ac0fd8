"""The Kafka bridge: what intake received to `kafka.raw_topic`, decoded readings to
`kafka.processed_topic` (docs/kafka.md has both formats).

A sink like the others: `write` returns once Kafka acknowledged (acks=all) every
record of the batch, so the writer acknowledges the MQTT messages (or commits the
Kafka offsets) only then. When Kafka is away the sends time out after
`kafka.request_timeout_ms`, the writer retries with backoff (one `sink.unavailable`
line) and intake stops reading: backpressure, not loss. A retry resends only the
records Kafka has not acknowledged yet, so an outage adds no duplicates.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from schemas.envelope import device_key, processed_record, raw_envelope
from schemas.records import DecodedBatch
from worker.config import KafkaSettings

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

Record = tuple[str, bytes, bytes, int | None]  # topic, key, value, timestamp (ms)


class KafkaBridgeSink:
    """Writes each batch to Kafka before it is acknowledged; the producer is the stores'."""

    name = "kafka"

    def __init__(self, producer: AIOKafkaProducer, settings: KafkaSettings, *, raw: bool) -> None:
        self._producer = producer
        self._settings = settings
        self._raw = raw  # MQTT intake: publish the messages too; Kafka intake read them from there
        self._batch: DecodedBatch | None = None
        self._records: list[Record] = []
        self._acknowledged: set[int] = set()  # indexes into _records Kafka has

    def records(self, batch: DecodedBatch) -> list[Record]:
        records: list[Record] = []
        if self._raw:
            topic = self._settings.raw_topic
            records.extend(
                (topic, device_key(m.topic).encode(), raw_envelope(m), int(m.received_at * 1000))
                for m in batch.raw
            )
        topic = self._settings.processed_topic
        records.extend((topic, str(r.device_id).encode(), processed_record(r), None) for r in batch.readings)
        return records

    async def write(self, batch: DecodedBatch) -> None:
        if batch is not self._batch:  # a new batch; the same one again is a retry
            self._batch = batch
            self._records = self.records(batch)
            self._acknowledged = set()
        pending: list[tuple[int, asyncio.Future[Any]]] = []
        failure: BaseException | None = None
        try:
            for index, (topic, key, value, timestamp_ms) in enumerate(self._records):
                if index in self._acknowledged:
                    continue
                # Waits while the partition's batch is full: the producer's buffer is bounded.
                future = await self._producer.send(topic, value, key=key, timestamp_ms=timestamp_ms)
                pending.append((index, future))
        except Exception as exc:
            failure = exc
        results = await asyncio.gather(*(future for _, future in pending), return_exceptions=True)
        for (index, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                failure = failure or result
            else:
                self._acknowledged.add(index)
        if failure is not None:
            raise failure
        self._batch, self._records, self._acknowledged = None, [], set()

    async def reset(self) -> None:
        """Nothing to drop: the producer reconnects by itself."""

    async def close(self) -> None:
        """The producer belongs to the stores, which close it after the writer."""
