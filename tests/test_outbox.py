"""Both mode: one readings store down, nothing lost (docs/storage.md).

The second readings store is a real PostgreSQL sink in a schema of its own (Cassandra's
place; `OtherStore`), taken away through a TCP proxy: refusing connections (cut) or
accepting and never answering (frozen). The primary is the ordinary PostgreSQL sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from schemas.records import AckToken, DeadLetter, DecodedBatch, Reading, Reason, TextReading
from worker.config import Settings
from worker.metrics import Metrics
from worker.runtime.mailbox import Mailbox
from worker.sinks.mirror import MirroredReadings, mirrored_readings
from worker.sinks.outbox import (
    Journal,
    JournalBusy,
    JournalOutbox,
    JournalUnusable,
    PostgresOutbox,
    decode_batch,
    encode_batch,
    read_journal,
)
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.sinks.writer import BatchWriter
from worker.stores import Stores, open_stores
from worker.stores.migrate import migrate
from worker.tools.embedded import ServiceUrls

from .conftest import worker_env
from .helpers import ROOT, background, wait_for
from .outbox_worker import READINGS_PER_BATCH, OtherStore, batch_number, numbered_batch
from .tcpproxy import TcpProxy
from .test_outages import proxied


async def _true(value: bool) -> bool:
    return value


# --- the record and the journal ------------------------------------------------------------------------


def test_an_outbox_record_holds_what_a_readings_store_writes() -> None:
    at = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    batch = DecodedBatch(
        readings=[Reading(at, 7, 11, 21.5, "temperature"), Reading(at, 8, 12, -3e-9, "humidity")],
        dead_letters=[
            DeadLetter(
                "devices/x/telemetry", b"\x00\xffbad", Reason.BAD_JSON, "line 1", 1.5, b"\x01" * 32, 19, 20
            )
        ],
        texts=[TextReading(at, 7, 13, "open", "door"), TextReading(at, 7, 14, "true", "alarm")],
        device_users={7: 3, 8: None},
        messages=3,
    )
    again = decode_batch(encode_batch(batch))
    assert again.readings == batch.readings
    assert again.texts == batch.texts
    assert again.dead_letters == batch.dead_letters
    assert again.device_users == batch.device_users
    assert again.acks == []  # acks belong to the broker session that received them


def test_an_outbox_record_leaves_out_only_what_no_readings_store_writes() -> None:
    """A field added to DecodedBatch must go into the record or onto this list: a store
    replayed from its outbox would otherwise miss it without a word."""
    import dataclasses

    # The broker's, the counters', other sinks', the writer's clock, the HTTP answers'.
    left_out = {"acks", "messages", "alerts", "raw", "created", "answered"}
    kept = {"readings", "texts", "dead_letters", "device_users"}
    assert {f.name for f in dataclasses.fields(DecodedBatch)} == left_out | kept


def test_a_torn_tail_is_dropped_and_the_whole_records_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "outbox.journal"
    journal = Journal(path)
    for n in range(3):
        journal.append(f"record {n}".encode())
    whole = path.stat().st_size
    journal.close()
    with path.open("ab") as file:  # a kill in the middle of the fourth append
        file.write(b"\x00\x00\x00\x40\x12\x34\x56\x78partial")

    journal = Journal(path)
    assert (journal.records, journal.end) == (3, whole)
    assert path.stat().st_size == whole
    journal.close()
    assert read_journal(path) == [b"record 0", b"record 1", b"record 2"]


def test_a_damaged_record_fails_its_checksum_and_ends_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "outbox.journal"
    journal = Journal(path)
    for n in range(3):
        journal.append(f"record {n}".encode())
    journal.close()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last record's body no longer matches its CRC-32
    path.write_bytes(bytes(data))
    assert zlib.crc32(b"record 2") != zlib.crc32(bytes(data[-8:]))

    journal = Journal(path)
    assert journal.records == 2
    journal.close()
    assert read_journal(path) == [b"record 0", b"record 1"]


def test_a_journal_that_cannot_be_opened_is_a_configuration_error_not_an_outage(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(JournalUnusable, match="storage.data_dir"):
        Journal(blocker / "outbox.journal")


def test_one_journal_has_one_writer(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "outbox.journal")
    try:
        with pytest.raises(JournalBusy):
            Journal(tmp_path / "outbox.journal")
    finally:
        journal.close()


# --- both mode against real stores ---------------------------------------------------------------------


@pytest.fixture
async def other_settings(settings: Settings, service_urls: ServiceUrls) -> AsyncIterator[Settings]:
    """A second migrated schema: the other readings store."""
    other = replace(
        settings, postgres=replace(settings.postgres, schema=f"test_other_{uuid.uuid4().hex[:8]}")
    )
    await migrate(other.postgres)
    yield other
    conn = await asyncpg.connect(service_urls.postgres_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{other.postgres.schema}" CASCADE')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def proxied_stores(settings: Settings) -> AsyncIterator[tuple[TcpProxy, Stores]]:
    proxy, url = await proxied(settings.postgres.url)
    try:
        async with open_stores(replace(settings, postgres=replace(settings.postgres, url=url))) as stores:
            yield proxy, stores
    finally:
        await proxy.stop()


async def _temperature(pg: asyncpg.Connection) -> tuple[int, int]:
    row = await pg.fetchrow(
        "SELECT d.id, p.id FROM devices d JOIN datapoints p ON p.device_id = d.id "
        "WHERE d.device_key = 'sim-json-01' AND p.label = 'temperature'"
    )
    assert row is not None
    return row[0], row[1]


async def _batches_in(pool: asyncpg.Pool) -> list[int]:
    """The batch numbers whose every reading is in `decoded_data` of the pool's schema."""
    rows = await pool.fetch(
        "SELECT floor(value / 1000)::int AS n, count(*) FROM decoded_data GROUP BY 1 ORDER BY 1"
    )
    assert all(row["count"] == READINGS_PER_BATCH for row in rows), rows
    return [row["n"] for row in rows]


async def _outbox_rows(pool: asyncpg.Pool, store: str) -> list[int]:
    rows = await pool.fetch("SELECT body FROM outbox WHERE store = $1 ORDER BY id", store)
    return [batch_number(decode_batch(row["body"])) for row in rows]


def _sink(
    primary: Stores, other: Stores, journal: Path, metrics: Metrics, timeout_s: float = 5.0
) -> MirroredReadings:
    return MirroredReadings(
        PostgresTimeseriesWriter(primary),
        OtherStore(other),
        (JournalOutbox(journal), PostgresOutbox(primary.postgres, "other")),
        metrics,
        timeout_s,
    )


async def test_with_the_other_store_refusing_postgres_gets_everything_and_the_outbox_the_missed_batches(
    stores: Stores, other_settings: Settings, pg: asyncpg.Connection, private_dir: Path
) -> None:
    device, point = await _temperature(pg)
    metrics = Metrics()
    async with proxied_stores(other_settings) as (proxy, other):
        sink = _sink(stores, other, private_dir / "outbox.journal", metrics)
        try:
            await sink.start()
            await sink.write(numbered_batch(0, device, point))
            proxy.cut()
            for number in range(1, 5):
                await sink.write(numbered_batch(number, device, point))  # returned: acknowledgeable

            assert await _batches_in(stores.postgres) == [0, 1, 2, 3, 4]
            assert await _outbox_rows(stores.postgres, "other") == [1, 2, 3, 4]  # exactly the missed ones
            assert metrics.count("outbox_appended", sink="other") == 4
            assert metrics.gauges["outbox_backlog_batches"]() == 4.0
            assert (
                not (private_dir / "outbox.journal").exists()
                or read_journal(private_dir / "outbox.journal") == []
            )

            await proxy.restore()  # recovery needs no help: the sink's replayer finds it back
            await wait_for(lambda: _true(metrics.gauges["outbox_backlog_batches"]() == 0.0), timeout=30)
            assert await _outbox_rows(stores.postgres, "other") == []
            assert await _batches_in(other.postgres) == [0, 1, 2, 3, 4]
            sink_other = sink._lanes[1].sink
            assert isinstance(sink_other, OtherStore)
            assert sink_other.received == [0, 1, 2, 3, 4]  # replayed in order, after the one written live

            await sink.write(numbered_batch(5, device, point))  # the store is written directly again
            assert metrics.count("outbox_appended", sink="other") == 4
            assert sink_other.received[-1] == 5
        finally:
            await sink.close()


async def test_a_store_that_accepts_and_never_answers_is_down_after_the_write_timeout(
    stores: Stores, other_settings: Settings, pg: asyncpg.Connection, private_dir: Path
) -> None:
    device, point = await _temperature(pg)
    metrics = Metrics()
    async with proxied_stores(other_settings) as (proxy, other):
        sink = _sink(stores, other, private_dir / "outbox.journal", metrics, timeout_s=0.5)
        try:
            await sink.write(numbered_batch(0, device, point))
            proxy.freeze()
            await sink.write(numbered_batch(1, device, point))  # waits out the timeout, then holds it
            await sink.write(numbered_batch(2, device, point))  # behind the backlog: no wait at all
            assert await _batches_in(stores.postgres) == [0, 1, 2]
            assert await _outbox_rows(stores.postgres, "other") == [1, 2]
            assert metrics.count("sink_errors", sink="other") >= 1

            proxy.thaw()
            await wait_for(lambda: _true(metrics.gauges["outbox_backlog_batches"]() == 0.0), timeout=60)
            assert await _batches_in(other.postgres) == [0, 1, 2]
        finally:
            await sink.close()


async def test_with_postgres_down_the_journal_holds_the_missed_batches_and_replays_them(
    settings: Settings, other_settings: Settings, pg: asyncpg.Connection, private_dir: Path
) -> None:
    device, point = await _temperature(pg)
    metrics = Metrics()
    journal = private_dir / "outbox.journal"
    async with proxied_stores(settings) as (proxy, primary), open_stores(other_settings) as other:
        sink = _sink(primary, other, journal, metrics)
        try:
            await sink.write(numbered_batch(0, device, point))
            proxy.cut()
            for number in range(1, 4):
                await sink.write(numbered_batch(number, device, point))

            assert [batch_number(decode_batch(body)) for body in read_journal(journal)] == [1, 2, 3]
            assert await _batches_in(other.postgres) == [0, 1, 2, 3]
            assert await pg.fetchval("SELECT count(*) FROM decoded_data") == READINGS_PER_BATCH
            assert metrics.count("outbox_appended", sink="postgres") == 3

            await proxy.restore()
            await wait_for(lambda: _true(metrics.gauges["outbox_backlog_batches"]() == 0.0), timeout=30)
            assert await _batches_in(primary.postgres) == [0, 1, 2, 3]
            assert journal.stat().st_size == 0  # emptied once everything was delivered
        finally:
            await sink.close()


async def test_with_both_stores_down_nothing_is_acknowledged(
    settings: Settings, other_settings: Settings, pg: asyncpg.Connection, private_dir: Path
) -> None:
    device, point = await _temperature(pg)
    metrics = Metrics()
    acked: list[AckToken] = []
    journal = private_dir / "outbox.journal"
    async with (
        proxied_stores(settings) as (proxy, primary),
        proxied_stores(other_settings) as (other_proxy, other),
    ):
        writer = BatchWriter(
            Mailbox(10),
            [_sink(primary, other, journal, metrics)],
            acknowledge=lambda tokens: _take(acked, tokens),
            metrics=metrics,
            batch_size=1_000,
            flush_interval_s=60.0,
        )
        batch = numbered_batch(1, device, point)
        batch.acks = [AckToken(generation=1, mid=7)]

        async def commit_it() -> None:
            await writer.handle([batch])
            await writer.drained()  # commits the partial batch

        try:
            proxy.cut()
            other_proxy.cut()
            async with background(commit_it()) as commit:
                await commit_attempts(metrics, 2)  # both failed, twice: the writer is retrying
                assert acked == []
                assert not journal.exists() or read_journal(journal) == []
                assert await pg.fetchval("SELECT count(*) FROM outbox") == 0
                await proxy.restore()
                await asyncio.wait_for(commit, 30)  # the batch committed in PostgreSQL
            assert acked == batch.acks  # in one store (PostgreSQL) and in the other's outbox
            assert await _outbox_rows(primary.postgres, "other") == [1]
            assert await _batches_in(primary.postgres) == [1]
        finally:
            await writer.close()


def _take(acked: list[AckToken], tokens: list[AckToken]) -> int:
    acked.extend(tokens)
    return len(tokens)


async def commit_attempts(metrics: Metrics, attempts: int) -> None:
    async def probe() -> bool:
        return (
            metrics.count("sink_errors", sink="postgres") >= attempts
            and metrics.count("sink_errors", sink="other") >= attempts
        )

    await wait_for(probe, timeout=30)


async def test_kill_9_during_an_outage_loses_nothing_from_the_journal(
    settings: Settings, other_settings: Settings, pg: asyncpg.Connection, private_dir: Path
) -> None:
    """A worker killed while PostgreSQL is away: every batch it acknowledged is in the
    journal (a torn last record at most, never acknowledged), replayed by the next run."""
    device, point = await _temperature(pg)
    proxy, url = await proxied(settings.postgres.url)
    env = worker_env(replace(settings, postgres=replace(settings.postgres, url=url)))
    env.update(
        IOTFLOW_STORAGE_DATA_DIR=str(private_dir),
        OUTBOX_OTHER_URL=other_settings.postgres.url,
        OUTBOX_OTHER_SCHEMA=other_settings.postgres.schema,
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.outbox_worker",
        str(device),
        str(point),
        env=env,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    acked: list[int] = []
    try:
        assert process.stdin is not None and process.stdout is not None
        assert await _said(process.stdout) == b"ready"
        proxy.cut()
        process.stdin.write(b"go\n")
        await process.stdin.drain()
        while len(acked) < 20:
            line = await _said(process.stdout)
            assert line.startswith(b"acked "), line
            acked.append(int(line.split()[1]))
        process.kill()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    journal = private_dir / "outbox-postgres.journal"
    held = [batch_number(decode_batch(body)) for body in read_journal(journal)]
    assert held == list(range(1, len(held) + 1))  # in order, nothing missing in between
    assert set(acked) <= set(held)
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 0

    try:
        await proxy.restore()
        metrics = Metrics()
        async with open_stores(settings) as primary, open_stores(other_settings) as other:
            sink = mirrored_readings(
                PostgresTimeseriesWriter(primary),
                OtherStore(other),
                replace_data_dir(primary, private_dir),
                metrics,
            )
            try:
                await sink.start()  # the next run replays what the killed one left
                expected = len(held) * READINGS_PER_BATCH

                async def replayed() -> bool:
                    return bool(await pg.fetchval("SELECT count(*) FROM decoded_data") >= expected)

                await wait_for(replayed, timeout=30)
                assert await _batches_in(primary.postgres) == held
                await wait_for(lambda: _true(os.path.getsize(journal) == 0), timeout=30)
            finally:
                await sink.close()
    finally:
        await proxy.stop()


async def _said(stdout: asyncio.StreamReader) -> bytes:
    """The child's next protocol line (`ready`, `acked N`), past its log lines."""
    while True:
        line = await asyncio.wait_for(stdout.readline(), 30)
        assert line, "the child ended"
        if line.startswith((b"ready", b"acked ")):
            return line.rstrip()


def replace_data_dir(stores: Stores, data_dir: Path) -> Stores:
    settings = replace(stores.settings, storage=replace(stores.settings.storage, data_dir=str(data_dir)))
    return replace(stores, settings=settings)


async def _replay_one(outbox: JournalOutbox) -> bytes:
    got: list[bytes] = []

    async def deliver(body: bytes) -> None:
        got.append(body)

    assert await outbox.replay_head(deliver)
    return got[0]


async def test_a_restart_in_the_middle_of_a_replay_resumes_after_what_was_delivered(tmp_path: Path) -> None:
    path = tmp_path / "outbox.journal"
    outbox = JournalOutbox(path)
    for n in range(4):
        await outbox.append(f"record {n}".encode(), 1)
    assert [await _replay_one(outbox) for _ in range(2)] == [b"record 0", b"record 1"]
    await outbox.close()  # a restart (a kill -9 leaves the same files: the position is written per record)

    again = JournalOutbox(path)
    try:
        assert await again.remaining() == 2
        assert await _replay_one(again) == b"record 2"
        assert await _replay_one(again) == b"record 3"
        assert await again.remaining() == 0  # emptied: the file and the position start over
        assert path.stat().st_size == 0
        await again.append(b"record 4", 1)
    finally:
        await again.close()
    fresh = JournalOutbox(path)
    try:
        assert await fresh.remaining() == 1
        assert await _replay_one(fresh) == b"record 4"
    finally:
        await fresh.close()


@pytest.mark.parametrize("damage", ["checksum", "not a record start"])
async def test_a_damaged_position_replays_the_journal_from_its_start(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "outbox.journal"
    outbox = JournalOutbox(path)
    for n in range(3):
        await outbox.append(f"record {n}".encode(), 1)
    await _replay_one(outbox)
    await outbox.close()
    position = path.with_name(path.name + ".pos")
    data = bytearray(position.read_bytes())
    if damage == "checksum":
        data[7] ^= 0x01  # another offset under the CRC-32 of the old one
    else:
        data[:] = (3).to_bytes(8, "big") + zlib.crc32((3).to_bytes(8, "big")).to_bytes(4, "big")
    position.write_bytes(bytes(data))

    journal = Journal(path)
    assert (journal.start, journal.skipped, journal.records) == (0, 0, 3)
    journal.close()
    again = JournalOutbox(path)
    try:
        assert await again.remaining() == 3
        assert await _replay_one(again) == b"record 0"  # a repeat, which the stores absorb
    finally:
        await again.close()
