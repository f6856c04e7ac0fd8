"""Durable outboxes: what a readings store that is down has not received, kept until it returns.

Two kinds, one interface (`Outbox`), both first in, first out:
- `PostgresOutbox`, the `outbox` table (migration 15), for the store that is not PostgreSQL;
- `JournalOutbox`, an append-only file under `storage.data_dir`, for PostgreSQL itself.

A record is one batch (`encode_batch`: readings, dead letters, the devices' users; not
the acks, which belong to this process's broker session), as zlib-compressed JSON. The journal frames each
record as

    length (4 bytes, big-endian) · CRC-32 of the body (4 bytes, big-endian) · body

and fsyncs after every append, before the batch's messages are acknowledged. A record
cut short by a kill (a torn tail) or damaged fails its length or checksum: it and
everything after it are dropped when the journal is opened, with one log line; they
were never acknowledged, so the broker still holds them. Replay keeps its position in
memory and empties the file once everything is delivered: a restart in the middle
replays from the start, and the stores' idempotent writes absorb the repeats.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import os
import struct
import zlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Protocol

import asyncpg
import orjson
import structlog

from schemas.records import DeadLetter, DecodedBatch, Reading, Reason, TextReading

log = structlog.get_logger("worker.sinks.outbox")

FORMAT_VERSION = 1


# --- the record ----------------------------------------------------------------------------------------


def encode_batch(batch: DecodedBatch) -> bytes:
    """The parts of `batch` a readings store writes, as one record body: JSON with the
    readings in columns (orjson encodes a column of datetimes in C: a few times faster than
    rows), zlib-compressed at level 1 (a 5,000-reading batch: ~300 kB → ~25 kB for under a
    millisecond, which the outbox's table, WAL and fsyncs then do not have to carry)."""
    readings = batch.readings
    document = orjson.dumps(
        {
            "v": FORMAT_VERSION,
            "t": [r.timestamp for r in readings],  # RFC 3339, microseconds, UTC offset
            "d": [r.device_id for r in readings],
            "p": [r.datapoint_id for r in readings],
            "x": [r.value for r in readings],
            "l": [r.label for r in readings],
            # Strings and booleans, for a store with a text column (Cassandra), as rows: rare.
            "text": [[t.timestamp, t.device_id, t.datapoint_id, t.text, t.label] for t in batch.texts],
            "dead": [
                [
                    d.topic,
                    base64.b64encode(d.payload).decode(),
                    d.reason.value,
                    d.detail,
                    d.received_at,
                    d.fingerprint.hex(),
                    d.topic_size,
                    d.reason_size,
                ]
                for d in batch.dead_letters
            ],
            "users": {str(device): user for device, user in batch.device_users.items()},
        }
    )
    return zlib.compress(document, 1)


def decode_batch(body: bytes) -> DecodedBatch:
    record = orjson.loads(zlib.decompress(body))
    if record.get("v") != FORMAT_VERSION:
        raise ValueError(f"outbox record format {record.get('v')!r}, expected {FORMAT_VERSION}")
    parsed: dict[str, datetime] = {}  # the readings of a message share their time
    times = [parsed.get(t) or parsed.setdefault(t, datetime.fromisoformat(t)) for t in record["t"]]
    columns = zip(times, record["d"], record["p"], record["x"], record["l"], strict=True)
    return DecodedBatch(
        readings=[Reading(*row) for row in columns],
        texts=[
            TextReading(datetime.fromisoformat(at), device, datapoint, text, label)
            for at, device, datapoint, text, label in record["text"]
        ],
        dead_letters=[
            DeadLetter(topic, base64.b64decode(data), Reason(reason), detail, at, bytes.fromhex(fp), ts, rs)
            for topic, data, reason, detail, at, fp, ts, rs in record["dead"]
        ],
        device_users={int(device): user for device, user in record["users"].items()},
    )


# --- the interface -------------------------------------------------------------------------------------

Deliver = Callable[[bytes], Awaitable[object]]


class Outbox(Protocol):
    kind: str  # "postgres" or "journal", for log lines

    async def append(self, body: bytes, readings: int) -> None:
        """Keep one record durably; raises if it could not."""

    async def replay_head(self, deliver: Deliver) -> bool:
        """Hand the oldest record to `deliver` and drop it once `deliver` returned; False
        when there is none to hand (empty, or another worker is replaying this outbox)."""

    async def remaining(self) -> int:
        """Records not yet delivered (an emptied journal file is truncated here)."""

    async def close(self) -> None: ...


# --- PostgreSQL ----------------------------------------------------------------------------------------


class PostgresOutbox:
    """Rows of `outbox` for one store. One replayer per store across all workers (an
    advisory lock held by the replay's transaction), so rows go out in `id` order."""

    kind = "postgres"

    def __init__(self, pool: asyncpg.Pool, store: str) -> None:
        self._pool = pool
        self._store = store

    async def append(self, body: bytes, readings: int) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO outbox (store, body, readings) VALUES ($1, $2, $3)", self._store, body, readings
            )

    async def replay_head(self, deliver: Deliver) -> bool:
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtext('iotflow.outbox.' || $1))", self._store
            ):
                return False
            row = await conn.fetchrow(
                "SELECT id, body FROM outbox WHERE store = $1 ORDER BY id LIMIT 1", self._store
            )
            if row is None:
                return False
            await deliver(row["body"])
            await conn.execute("DELETE FROM outbox WHERE id = $1", row["id"])
        return True

    async def remaining(self) -> int:
        async with self._pool.acquire() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE store = $1", self._store))

    async def close(self) -> None:
        """The pool belongs to `Stores`."""


# --- the local journal ---------------------------------------------------------------------------------

_HEADER = struct.Struct(">II")  # body length, CRC-32 of the body
# The replay position file next to the journal: the offset of the oldest record not yet
# delivered, and the CRC-32 of its 8 bytes (a torn or damaged position is ignored).
_POSITION = struct.Struct(">QI")
MAX_RECORD_BYTES = 1 << 30  # a longer length field is damage, not a record


class JournalUnusable(RuntimeError):
    """The journal cannot be opened (no such directory, no permission, held by another
    process): a configuration problem, so the pipeline stops rather than wait for it."""


class JournalBusy(JournalUnusable):
    """Another process holds the journal: two workers must not share one `storage.data_dir`."""


class Journal:
    """The file itself; blocking calls, run on a thread by `JournalOutbox`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # an OSError would otherwise pass for a store outage, forever
            raise JournalUnusable(
                f"{path}: {exc.strerror or exc} (storage.data_dir must be a writable directory)"
            ) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise JournalBusy(f"{path} is held by another process: one storage.data_dir per worker") from None
        position_path = path.with_name(path.name + ".pos")
        try:
            self._position_fd = os.open(position_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            os.close(self._fd)
            raise JournalUnusable(f"{position_path}: {exc.strerror or exc}") from None
        wanted = self._read_position()  # None: damaged
        self.records, self.end, skipped = self._scan(wanted or 0)
        if wanted is None or skipped is None:  # damage, or not where a record starts
            log.warning(
                "outbox.journal_position_ignored",
                path=str(position_path),
                position=wanted,
                hint="the journal is replayed from its start; repeated batches are harmless",
            )
        # Where the replay begins: after the records an earlier run delivered.
        self.start, self.skipped = (wanted or 0, skipped) if skipped is not None else (0, 0)

    def _read_position(self) -> int | None:
        data = os.pread(self._position_fd, _POSITION.size, 0)
        if not data:
            return 0  # a new journal
        if len(data) < _POSITION.size:
            return None
        offset, checksum = _POSITION.unpack(data)
        return offset if zlib.crc32(data[:8]) == checksum else None

    def _scan(self, wanted: int) -> tuple[int, int, int | None]:
        """Count the whole records; drop a torn or damaged tail. (records, end offset, records
        before offset `wanted`, None when `wanted` is not where a record starts)"""
        size = os.fstat(self._fd).st_size
        offset = records = 0
        skipped = 0 if wanted == 0 else None
        while offset < size:
            found = self.read_at(offset, size)
            if found is None:
                break
            offset = found[1]
            records += 1
            if offset == wanted:
                skipped = records
        if offset < size:
            log.warning(
                "outbox.journal_tail_dropped",
                path=str(self.path),
                kept_records=records,
                dropped_bytes=size - offset,
                hint="a record cut short by a kill or damaged; it was never acknowledged",
            )
            os.ftruncate(self._fd, offset)
            os.fsync(self._fd)
        return records, offset, skipped

    def read_at(self, offset: int, end: int) -> tuple[bytes, int] | None:
        return _read_record(self._fd, offset, end)

    def append(self, body: bytes) -> None:
        record = _HEADER.pack(len(body), zlib.crc32(body)) + body
        view = memoryview(record)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self.records += 1
        self.end += len(record)

    def mark(self, offset: int) -> None:
        """The replay has delivered every record before `offset`. Not fsynced: a position
        lost to a power cut is an older one, and only repeats batches (idempotent writes)."""
        packed = offset.to_bytes(8, "big")
        os.pwrite(self._position_fd, _POSITION.pack(offset, zlib.crc32(packed)), 0)

    def clear(self) -> None:
        # The position goes back to 0 durably before the records go: a crash in between
        # replays them again, never skips records appended after the truncation.
        self.mark(0)
        os.fsync(self._position_fd)
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self.records = self.end = 0

    def close(self) -> None:
        os.close(self._position_fd)
        os.close(self._fd)  # releases the lock


def _read_record(fd: int, offset: int, end: int) -> tuple[bytes, int] | None:
    """The record at `offset` and the next offset; None if it is not whole and intact."""
    header = os.pread(fd, _HEADER.size, offset)
    if len(header) < _HEADER.size:
        return None
    length, checksum = _HEADER.unpack(header)
    start = offset + _HEADER.size
    if length > MAX_RECORD_BYTES or start + length > end:
        return None
    body = os.pread(fd, length, start)
    if len(body) < length or zlib.crc32(body) != checksum:
        return None
    return body, start + length


def read_journal(path: Path) -> list[bytes]:
    """The intact records of a journal, oldest first, without taking its lock (inspection)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size, offset, bodies = os.fstat(fd).st_size, 0, []
        while (found := _read_record(fd, offset, size)) is not None:
            body, offset = found
            bodies.append(body)
        return bodies
    finally:
        os.close(fd)


class JournalOutbox:
    """The journal as an `Outbox`: file I/O on a thread, so the event loop never waits on a disk."""

    kind = "journal"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._journal: Journal | None = None
        self._cursor = 0  # offset of the oldest record not yet delivered
        self._delivered = 0  # records before the cursor
        self._lock = asyncio.Lock()  # appends and truncation never overlap

    async def _opened(self) -> Journal:
        if self._journal is None:
            self._journal = journal = await asyncio.to_thread(Journal, self.path)
            self._cursor, self._delivered = journal.start, journal.skipped  # where a replay stopped
        return self._journal

    async def append(self, body: bytes, readings: int) -> None:
        async with self._lock:
            journal = await self._opened()
            await asyncio.to_thread(journal.append, body)

    async def replay_head(self, deliver: Deliver) -> bool:
        journal = await self._opened()
        if self._cursor >= journal.end:
            return False
        found = await asyncio.to_thread(journal.read_at, self._cursor, journal.end)
        if found is None:  # the scan and our own appends vouch for every record before `end`
            raise RuntimeError(f"{self.path}: record at {self._cursor} unreadable after it was checked")
        body, following = found
        await deliver(body)
        await asyncio.to_thread(journal.mark, following)  # a restart resumes after it
        self._cursor = following
        self._delivered += 1
        return True

    async def remaining(self) -> int:
        async with self._lock:
            journal = await self._opened()
            left = journal.records - self._delivered
            if left == 0 and journal.end:
                await asyncio.to_thread(journal.clear)
                self._cursor = self._delivered = 0
            return left

    async def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
