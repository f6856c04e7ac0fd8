"""The writer actor: gathers decoded batches, commits them to every sink, then acknowledges.

A batch commits when it holds `batch_size` rows or its oldest message was decoded
`flush_interval` ago (time queued behind the previous commit counts). Under a backlog
one commit takes every decoded batch waiting (the mailboxes bound how many): capping
it at `batch_size` cost 10-40% more CPU per message in a flood. A durable sink
that fails is retried with backoff, forever: while it is down the mailboxes fill,
intake stops, and the broker keeps the rest. Nothing is acknowledged until every
durable sink has the batch.

Derived sinks (hot state: content that can be rebuilt from the durable stores) get a
batch only after the durable sinks committed it, and the ack does not wait for them:
each runs beside the next batch's durable writes, one batch at a time, in order. They
absorb their own outages (worker/sinks/hot_state.py); what they raise is a bug.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from operator import attrgetter

import structlog

from schemas.records import AckToken, DecodedBatch
from worker.metrics import Metrics
from worker.retry import retry_transient
from worker.runtime.actor import MailboxActor
from worker.runtime.cancel import cancel_and_wait
from worker.runtime.mailbox import Mailbox
from worker.sinks.base import Sink, Startable

log = structlog.get_logger("worker.sinks.writer")
_timestamp = attrgetter("timestamp")


class BatchWriter(MailboxActor[DecodedBatch]):
    name = "writer"
    batch_max = 64

    def __init__(
        self,
        mailbox: Mailbox[DecodedBatch],
        sinks: Sequence[Sink],
        acknowledge: Callable[[list[AckToken]], int],
        metrics: Metrics,
        batch_size: int,
        flush_interval_s: float,
        slow_write_s: float = 5.0,
        derived: Sequence[Sink] = (),
    ) -> None:
        super().__init__(mailbox)
        self._sinks = list(sinks)
        self._derived = list(derived)
        self._derived_write: asyncio.Task[None] | None = None  # the previous batch's
        self._acknowledge = acknowledge
        self._metrics = metrics
        self._batch_size = batch_size
        self._flush_interval = flush_interval_s
        self._slow_write_s = slow_write_s
        self._pending = DecodedBatch()
        self._pending_since = 0.0
        self.down: set[str] = set()  # sinks currently failing, for /readyz

    async def run(self) -> None:
        for sink in (*self._sinks, *self._derived):
            if isinstance(sink, Startable):
                await sink.start()
        await super().run()

    def next_timeout(self) -> float:
        if self.stopping:
            return 0.0
        if not self._pending.messages:
            return self.idle_timeout
        return max(0.0, self._pending_since + self._flush_interval - time.monotonic())

    async def handle(self, items: list[DecodedBatch]) -> None:
        if not self._pending.messages:
            self._pending_since = items[0].created
        for batch in items:
            self._pending.extend(batch)
        if len(self._pending.readings) + len(self._pending.dead_letters) >= self._batch_size:
            await self._commit()

    async def tick(self) -> None:
        if self._pending.messages and time.monotonic() - self._pending_since >= self._flush_interval:
            await self._commit()

    async def drained(self) -> None:
        if self._pending.messages:
            await self._commit()
        await self._derived_done()

    async def _commit(self) -> None:
        batch, self._pending = self._pending, DecodedBatch()
        # All sinks at once; a crash in one cancels the others (nothing is acknowledged then).
        async with asyncio.TaskGroup() as group:
            writes = [group.create_task(self._write_until_stored(sink, batch)) for sink in self._sinks]
        self._acknowledge(batch.acks)
        stored = [count for task in writes if (count := task.result()) is not None]
        self._record(batch, min(stored) if stored else len(batch.readings))
        await self._derived_done()
        if self._derived:
            self._derived_write = asyncio.create_task(self._write_derived(batch), name="writer.derived")

    async def _write_derived(self, batch: DecodedBatch) -> None:
        async with asyncio.TaskGroup() as group:
            for sink in self._derived:
                group.create_task(self._timed(sink, batch))

    async def _timed(self, sink: Sink, batch: DecodedBatch) -> None:
        started = time.monotonic()
        await sink.write(batch)
        self._metrics.observe_write(sink.name, time.monotonic() - started)

    async def _derived_done(self) -> None:
        """Wait for the previous batch's derived writes; what they raised is raised here."""
        if self._derived_write is not None:
            task, self._derived_write = self._derived_write, None
            await task

    async def _write_until_stored(self, sink: Sink, batch: DecodedBatch) -> int | None:
        def down(exc: BaseException) -> None:
            self.down.add(sink.name)
            self._metrics.inc("sink_errors", sink=sink.name)

        started = time.monotonic()
        watch = asyncio.create_task(self._report_slow(sink.name, batch), name=f"slow.{sink.name}")
        try:
            stored = await retry_transient(
                lambda: sink.write(batch),
                "sink",
                reset=sink.reset,
                on_down=down,
                on_up=lambda: self.down.discard(sink.name),
                sink=sink.name,
                holding=batch.messages,
            )
        finally:
            watch.cancel()
        self._metrics.observe_write(sink.name, time.monotonic() - started)
        return stored

    async def _report_slow(self, sink: str, batch: DecodedBatch) -> None:
        """While a store holds a batch past `slow_write_s`, say so once per period: a frozen
        server raises nothing until its timeouts, and silence is the worst answer."""
        started = time.monotonic()
        while True:
            await asyncio.sleep(self._slow_write_s)
            self._metrics.inc("sink_slow", sink=sink)
            log.warning(
                "sink.slow",
                sink=sink,
                holding=batch.messages,
                rows=len(batch.readings) + len(batch.dead_letters),
                waited_s=round(time.monotonic() - started, 1),
            )

    def _record(self, batch: DecodedBatch, written: int) -> None:
        """`written`: readings the readings store newly stored (every reading when no sink
        stores readings); the rest of the batch's readings were duplicates it refused.
        A write retried after its commit was lost in transit counts its rows as duplicates."""
        metrics = self._metrics
        metrics.inc("messages_committed", batch.messages)
        metrics.inc("readings_written", written)
        metrics.inc("readings_duplicate", len(batch.readings) - written)
        metrics.inc("batches_committed")
        metrics.observe_batch(len(batch.readings) + len(batch.dead_letters))
        if batch.dead_letters:
            reasons = Counter(letter.reason.value for letter in batch.dead_letters)
            for reason, count in reasons.items():
                metrics.inc("dead_letters", count, reason=reason)
            truncated = sum(letter.truncated for letter in batch.dead_letters)
            if truncated:
                metrics.inc("dead_letters_truncated", truncated)
            log.warning(
                "dead_letters.stored",
                count=len(batch.dead_letters),
                reasons=dict(reasons),
                example=batch.dead_letters[0].description[:200],
            )
        # Publish→commit latency: the reading's own timestamp is when the device sent it.
        # Counted per distinct timestamp (the readings of one message share one), in C by
        # Counter, then observed once each: a Python step per reading was ~3% of the worker.
        now = datetime.now(UTC)
        observe = metrics.observe_commit_latency
        for timestamp, count in Counter(map(_timestamp, batch.readings)).items():
            observe((now - timestamp).total_seconds(), count)

    async def close(self) -> None:
        if self._derived_write is not None:  # after a crash: drained() did not wait for it
            await cancel_and_wait(self._derived_write)
        for sink in (*self._sinks, *self._derived):
            await sink.close()
