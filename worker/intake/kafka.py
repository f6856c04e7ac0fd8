"""Kafka intake: `kafka.raw_topic` in the consumer group `kafka.group`, offsets committed
only after the writers committed the batch.

Each record becomes the same `RawMessage` MQTT intake makes (from the raw envelope,
`schemas/envelope.py`), its `AckToken` naming the partition, the offset and the
assignment it came with. When the writer acknowledges, the highest contiguous
acknowledged offset of each partition is committed (manual commits only). On a
rebalance, `on_partitions_revoked` commits what is done of the partitions leaving
and forgets the rest: their owner-to-be starts at the committed offset and delivers
it again, so nothing is skipped (and the idempotent writes absorb the repeats).
Records are read in order per partition and the stages keep that order, so the
readings of one device (one key, one partition) are written in the order received.

Memory stays bounded the way it does for MQTT: the mailbox is bounded, intake waits
when it is full, and the consumer fetches no more than `kafka.max_poll_records` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from schemas.envelope import BadEnvelope, read_envelope
from schemas.records import AckToken, RawMessage
from worker.config import KafkaSettings
from worker.intake import read_until_stopped
from worker.metrics import Metrics
from worker.retry import Backoff, is_transient
from worker.runtime.actor import Actor
from worker.runtime.cancel import cancel_and_wait
from worker.runtime.mailbox import Mailbox
from worker.stores.kafka import create_consumer, start

log = structlog.get_logger("worker.intake")

COMMIT_INTERVAL_S = 0.2


@dataclass(slots=True)
class _Partition:
    """What intake owes one assigned partition: offsets handed on, in order, and those
    the writer has acknowledged."""

    generation: int
    outstanding: deque[int] = field(default_factory=deque)
    acknowledged: set[int] = field(default_factory=set)
    commit_to: int | None = None  # next offset to commit (last contiguous acknowledged + 1)
    committed: int | None = None

    def advance(self) -> None:
        outstanding, acknowledged = self.outstanding, self.acknowledged
        while outstanding and outstanding[0] in acknowledged:
            offset = outstanding.popleft()
            acknowledged.discard(offset)
            self.commit_to = offset + 1


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, intake: KafkaIntake) -> None:
        self._intake = intake

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._intake.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._intake.assigned(assigned)


class KafkaIntake(Actor):
    """Reads `raw_topic` into the decoder's mailbox; commits what the writer committed."""

    name = "intake"

    def __init__(self, settings: KafkaSettings, mailbox: Mailbox[RawMessage], metrics: Metrics) -> None:
        self._settings = settings
        self._mailbox = mailbox
        self._metrics = metrics
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: dict[int, _Partition] = {}
        self._generation = 0
        self._dirty = asyncio.Event()
        self._stop_reading = asyncio.Event()
        self._close = asyncio.Event()
        self._reading_stopped = asyncio.Event()
        self._reading_stopped.set()
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        backoff = Backoff()
        failures = 0
        while not self._close.is_set():
            consumer = create_consumer(self._settings)
            try:
                consumer.subscribe([self._settings.raw_topic], listener=_Rebalance(self))
                await start(consumer, self._settings)
                self._consumer = consumer
                failures = 0
                await self._session(consumer)
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if self._stop_reading.is_set():
                    return
                failures += 1
                delay = backoff.delay(failures)
                log.warning("kafka.disconnected", error=repr(exc), retry_in_s=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._close.wait()
            finally:
                self._consumer = None
                self.subscribed.clear()
                self._partitions.clear()
                self._reading_stopped.set()
                await consumer.stop()

    async def _session(self, consumer: AIOKafkaConsumer) -> None:
        log.info("kafka.subscribed", topic=self._settings.raw_topic, group=self._settings.group)
        self._reading_stopped.clear()
        committer = asyncio.create_task(self._commit_loop(consumer), name="kafka.commit")
        try:
            await read_until_stopped(self._read(consumer), self._stop_reading)
            self._reading_stopped.set()
            # Stay in the group while the pipeline drains, so its acknowledgements get committed.
            await self._close.wait()
            await self._commit(consumer)
        finally:
            await cancel_and_wait(committer)
            if not committer.cancelled():
                committer.result()  # what ended the commit loop early

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        mailbox, metrics = self._mailbox, self._metrics
        while True:
            fetched = await consumer.getmany(timeout_ms=500, max_records=self._settings.max_poll_records)
            self.subscribed.set()
            for tp, records in fetched.items():
                fetched_with = self._partitions.get(tp.partition)
                for record in records:
                    # The assignment may have changed while we waited on a full mailbox:
                    # the rest of this fetch is the next owner's (or a new assignment's).
                    state = self._partitions.get(tp.partition)
                    if state is None or state is not fetched_with:
                        break
                    state.outstanding.append(record.offset)
                    token = AckToken(state.generation, record.offset, tp.partition)
                    try:
                        topic, payload, received_at = read_envelope(record.value)
                        message = RawMessage(topic, payload, received_at, token)
                    except BadEnvelope as exc:
                        message = RawMessage(
                            f"kafka:{tp.topic}/{tp.partition}/{record.offset}",
                            record.value or b"",
                            time.time(),
                            token,
                            rejected=str(exc),
                        )
                    await mailbox.put(message)
                    metrics.counters["messages_received"] += 1

    def assigned(self, partitions: set[TopicPartition]) -> None:
        self._generation += 1
        for tp in partitions:
            if tp.partition not in self._partitions:
                self._partitions[tp.partition] = _Partition(self._generation)
        log.info("kafka.assigned", partitions=sorted(tp.partition for tp in partitions))

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Commit what is done of the partitions leaving; forget the rest (redelivered)."""
        consumer = self._consumer
        if consumer is not None and partitions:
            await self._commit(consumer, {tp.partition for tp in partitions})
        dropped = 0
        for tp in partitions:
            state = self._partitions.pop(tp.partition, None)
            if state is not None:
                dropped += len(state.outstanding)
        if partitions:
            self._metrics.inc("kafka_revocations")
            self._metrics.inc("kafka_uncommitted_dropped", dropped)
            log.info(
                "kafka.revoked", partitions=sorted(tp.partition for tp in partitions), uncommitted=dropped
            )

    def ack(self, tokens: Iterable[AckToken]) -> int:
        """Mark the given records done; tokens of a revoked assignment are skipped."""
        partitions = self._partitions
        touched: set[int] = set()
        sent = 0
        for token in tokens:
            state = partitions.get(token.partition)
            if state is None or state.generation != token.generation:
                continue
            state.acknowledged.add(token.mid)
            touched.add(token.partition)
            sent += 1
        for number in touched:
            partitions[number].advance()
        if touched:
            self._dirty.set()
        return sent

    async def _commit_loop(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(COMMIT_INTERVAL_S)  # one commit for many writer batches
            self._dirty.clear()
            await self._commit(consumer)

    async def _commit(self, consumer: AIOKafkaConsumer, only: set[int] | None = None) -> None:
        offsets = {
            TopicPartition(self._settings.raw_topic, number): state.commit_to
            for number, state in self._partitions.items()
            if state.commit_to is not None
            and state.commit_to != state.committed
            and (only is None or number in only)
        }
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # Lost the assignment meanwhile (a rebalance) or the coordinator moved: the
            # records come again to whoever owns them now, and the next commit catches up.
            log.warning("kafka.commit_failed", error=repr(exc))
            self._dirty.set()
            return
        for tp, offset in offsets.items():
            state = self._partitions.get(tp.partition)
            if state is not None:
                state.committed = offset

    @property
    def partitions(self) -> set[int]:
        """The partitions of raw_topic assigned now."""
        return set(self._partitions)

    @property
    def buffered(self) -> int:
        return 0  # the consumer's prefetch is bounded by aiokafka's fetch sizes

    @property
    def unacknowledged(self) -> int:
        """Records handed on and not yet acknowledged by the writer, over the assigned partitions."""
        return sum(len(state.outstanding) - len(state.acknowledged) for state in self._partitions.values())

    @property
    def connected(self) -> bool:
        return self._consumer is not None and self.subscribed.is_set()

    async def stop(self) -> None:
        self._stop_reading.set()
        await self._reading_stopped.wait()

    async def close(self) -> None:
        self._stop_reading.set()
        self._close.set()
