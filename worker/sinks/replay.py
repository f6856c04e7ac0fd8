"""Dead letters replayed: decoded again as the daemon decodes now, stored by its writers.

A batch of `dead_letters` rows goes through the decoder's own `decode` (the codecs of
`pipeline.codecs`, the devices, datapoints and ranges PostgreSQL holds now: the
registry reads it directly, not through Redis, whose entries may predate the fix) at
each row's first `received_at`, so a message without a time of its own gets the time it
first arrived, every time it is replayed. Its readings go to the readings store(s) of
`timeseries.backend` with the daemon's writers, and the rows are settled in the
transaction that stores them: a row whose message became readings is deleted, one still
rejected takes its new reason. Cassandra, when configured, is written first (upserts), so
a row leaves only once every readings store has its readings; a crash between the two
leaves the row, and the next replay writes the same readings again, which changes
nothing. No rate limit applies, no rule is evaluated (the readings are history), and
Redis hot state is not touched (it holds the latest values, which these are not).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import asyncpg

from schemas.records import AckToken, DeadLetter, DecodedBatch, RawMessage, Reason
from worker.decode.decoder import Decoder, configured_codecs, configured_mappings, decode_limits, fingerprint
from worker.decode.registry import DatapointBudget, DeviceRegistry
from worker.metrics import Metrics
from worker.runtime.mailbox import Mailbox
from worker.sinks.postgres import PostgresTimeseriesWriter, Within
from worker.sinks.postgres_core import PostgresCoreWriter
from worker.stores import Stores
from worker.stores.dead_letters import Selection, replay_batch, replay_bounds, settle
from worker.stores.postgres import Connection

_NO_ACK = AckToken(0, 0)
BATCH_SIZE = 1000  # dead letters per batch (and per transaction), by default
# A batch whose transaction lost a deadlock to the daemon (both touching one row) runs again.
_ROLLBACK_RETRIES = 5


@dataclass
class Tally:
    """What a replay did (or, dry, would do)."""

    replayed: int = 0  # dead letters that became readings and left the table
    readings: int = 0  # readings they made (newly stored; a dry run: decoded)
    rejected: Counter[str] = field(default_factory=Counter)  # still rejected, by reason code
    capped: int = 0  # never replayed: the stored payload or topic is not the whole message

    def add(self, other: Tally) -> None:
        self.replayed += other.replayed
        self.readings += other.readings
        self.rejected.update(other.rejected)
        self.capped += other.capped

    @property
    def done(self) -> int:
        return self.replayed + sum(self.rejected.values()) + self.capped


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one dead letter becomes: readings (`rejected` empty) or a new reason."""

    id: int
    topic: str
    readings: int
    rejected: str  # `code: detail`, or "" when it became readings
    capped: bool = False


class ReadingsWriter:
    """The readings store(s) of `timeseries.backend`, in the order that lets a dead letter
    leave only once each has its readings: Cassandra first, then the PostgreSQL transaction
    (readings or, with Cassandra alone, last-seen; and the dead letters, settled by `within`).
    Not the outbox of both mode: a replay is run again later, so a store that is down stops it."""

    def __init__(self, stores: Stores) -> None:
        backend = stores.settings.timeseries.backend
        self._postgres: PostgresTimeseriesWriter | PostgresCoreWriter = (
            PostgresCoreWriter(stores) if backend == "cassandra" else PostgresTimeseriesWriter(stores)
        )
        self._cassandra = None
        if backend != "postgres":
            from worker.sinks.cassandra import CassandraTimeseriesWriter

            assert stores.cassandra is not None  # open_stores opens it for these backends
            self._cassandra = CassandraTimeseriesWriter(stores.cassandra)

    async def write(self, batch: DecodedBatch, within: Within) -> int:
        """Readings newly stored (Cassandra alone: all of them, it cannot tell)."""
        stored = len(batch.readings)
        if self._cassandra is not None:
            stored = await self._cassandra.write(batch)
        inserted = await self._postgres.write(batch, within)
        return stored if inserted is None else inserted


class DeadLetterReplay:
    """Decodes dead-letter rows again and stores what they become (`replay`), or only says
    what each would become (`judge`: a dry run, which registers nothing)."""

    def __init__(self, stores: Stores, dry_run: bool = False) -> None:
        settings = stores.settings
        pipeline = settings.pipeline
        registry = DeviceRegistry(
            stores.postgres,
            None,  # PostgreSQL itself: a cache entry may predate the fix being replayed for
            stores.keys,
            pipeline.unknown_devices == "register" and not dry_run,
            DatapointBudget(pipeline.max_new_datapoints_per_hour),
        )
        # The daemon's decoder, used for its `decode` alone: its mailboxes stay empty.
        self._decoder = Decoder(
            Mailbox(1),
            Mailbox(1),
            configured_codecs(settings),
            decode_limits(settings),
            registry,
            Metrics(),
            mappings=configured_mappings(settings),
        )
        self._writer = None if dry_run else ReadingsWriter(stores)

    async def replay(self, rows: list[dict[str, Any]]) -> Tally:
        """Store the readings of `rows` (from `replay_batch`) and settle the rows, at once."""
        assert self._writer is not None, "a dry run stores nothing"
        tally = Tally()
        ids: dict[bytes, int] = {}
        messages = []
        for row in rows:
            if row["capped"]:
                tally.capped += 1
                continue
            message = _message(row)
            ids[fingerprint(message.topic, message.payload)] = row["id"]
            messages.append(message)
        if not messages:
            return tally
        batch = await self._decoder.decode(messages)
        verdicts = _verdicts(batch.dead_letters)
        # A message that became readings leaves the table; one with skipped fields stays under
        # that reason, as the daemon would have kept it (its readings are stored all the same).
        resolved = [letter_id for key, letter_id in ids.items() if key not in verdicts]
        reasons = [(ids[key], letter.description, letter.reason_size) for key, letter in verdicts.items()]
        tally.rejected.update(
            letter.reason.value for letter in verdicts.values() if letter.reason is not Reason.SKIPPED_FIELDS
        )
        tally.replayed = len(ids) - sum(tally.rejected.values())

        async def settled(conn: Connection) -> None:
            await settle(conn, resolved, reasons)

        tally.readings = await self._writer.write(replace(batch, dead_letters=[]), settled)
        return tally

    async def judge(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        """What each of `rows` would become now; nothing is written."""
        verdicts = []
        for row in rows:
            if row["capped"]:
                verdicts.append(Verdict(row["id"], row["topic"], 0, "", capped=True))
                continue
            batch = await self._decoder.decode([_message(row)])
            failed = [d for d in batch.dead_letters if d.reason is not Reason.SKIPPED_FIELDS]
            reason = failed[0].description if failed else ""
            verdicts.append(Verdict(row["id"], row["topic"], len(batch.readings) + len(batch.texts), reason))
        return verdicts


def _message(row: dict[str, Any]) -> RawMessage:
    received_at: datetime = row["received_at"]
    return RawMessage(row["topic"], bytes(row["payload"]), received_at.timestamp(), _NO_ACK)


def _verdicts(letters: list[DeadLetter]) -> dict[bytes, DeadLetter]:
    """Each message's dead letter: its rejection, else its skipped fields (readings stored)."""
    found: dict[bytes, DeadLetter] = {}
    for letter in letters:
        if letter.fingerprint not in found or letter.reason is not Reason.SKIPPED_FIELDS:
            found[letter.fingerprint] = letter
    return found


async def _batches(
    stores: Stores, selection: Selection, batch_size: int
) -> AsyncIterator[tuple[list[dict[str, Any]], int]]:
    """The selected dead letters a batch at a time, oldest id first, up to the highest id
    selected now (rows stored later are left to a later run); each with the rows to go through."""
    async with stores.postgres.acquire() as conn:
        top, replayable, capped = await replay_bounds(conn, selection)
    after = 0
    while True:
        async with stores.postgres.acquire() as conn:
            rows = await replay_batch(conn, selection, after, top, batch_size)
        if not rows:
            return
        yield rows, replayable + capped
        after = rows[-1]["id"]


async def replay_dead_letters(
    stores: Stores,
    selection: Selection,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[Tally, int], None] = lambda tally, total: None,
) -> Tally:
    """Replay the selected dead letters, a transaction per batch, oldest id first, up to the
    highest id selected now; `progress(tally so far, rows to go through)` after each batch."""
    replay = DeadLetterReplay(stores)
    total = Tally()
    async for rows, to_go_through in _batches(stores, selection, batch_size):
        for attempt in range(_ROLLBACK_RETRIES):
            try:
                done = await replay.replay(rows)
                break
            except asyncpg.exceptions.TransactionRollbackError:
                if attempt == _ROLLBACK_RETRIES - 1:
                    raise
        total.add(done)
        progress(total, to_go_through)
    return total


async def judge_dead_letters(
    stores: Stores, selection: Selection, batch_size: int = BATCH_SIZE
) -> AsyncIterator[Verdict]:
    """What each selected dead letter would become now, oldest id first; nothing is written."""
    replay = DeadLetterReplay(stores, dry_run=True)
    async for rows, _ in _batches(stores, selection, batch_size):
        for verdict in await replay.judge(rows):
            yield verdict
