"""The flush deadline counts from when a batch was decoded, not from when the writer took it."""

from __future__ import annotations

import time

from schemas.records import AckToken, DecodedBatch
from worker.metrics import Metrics
from worker.runtime.mailbox import Mailbox
from worker.sinks.writer import BatchWriter


class Recorder:
    """A durable sink that keeps what it was given."""

    name = "recorder"

    def __init__(self) -> None:
        self.batches: list[DecodedBatch] = []

    async def write(self, batch: DecodedBatch) -> int:
        self.batches.append(batch)
        return len(batch.readings)

    async def reset(self) -> None:
        """Nothing to drop."""

    async def close(self) -> None:
        """Nothing to close."""


def _writer(sink: Recorder, acked: list[AckToken]) -> BatchWriter:
    def acknowledge(tokens: list[AckToken]) -> int:
        acked.extend(tokens)
        return len(tokens)

    return BatchWriter(Mailbox(10), [sink], acknowledge, Metrics(), batch_size=1000, flush_interval_s=0.5)


async def test_a_batch_that_waited_behind_a_commit_is_due_at_once() -> None:
    sink, acked = Recorder(), list[AckToken]()
    writer = _writer(sink, acked)
    # Decoded a second ago (it sat in the mailbox while the previous batch committed).
    late = DecodedBatch(acks=[AckToken(1, 7)], messages=1, created=time.monotonic() - 1.0)
    await writer.handle([late])
    assert writer.next_timeout() == 0.0
    await writer.tick()
    assert [a.mid for a in acked] == [7]
    await writer.close()


async def test_a_fresh_batch_waits_for_company() -> None:
    sink, acked = Recorder(), list[AckToken]()
    writer = _writer(sink, acked)
    await writer.handle([DecodedBatch(acks=[AckToken(1, 8)], messages=1)])
    assert writer.next_timeout() > 0.0
    await writer.tick()
    assert acked == []  # not due yet: a partial batch waits up to flush_interval
    await writer.drained()
    assert [a.mid for a in acked] == [8]
    await writer.close()
