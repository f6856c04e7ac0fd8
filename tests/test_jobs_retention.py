"""Retention removes exactly what is past its age, kind by kind, and raw data by partition."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime

import asyncpg
import pytest

from jobs import tasks
from jobs.context import JobResources
from jobs.retention import apply_retention, drop_raw_before
from jobs.rollups import RAW_HORIZON
from worker.config import Settings

from .test_jobs_support import Clock, ctx_of, insert_readings, res, utc

__all__ = ["res"]

NOW = utc("2026-06-15 12:00")


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def aged(res: JobResources) -> JobResources:
    """Short ages: raw 10 d, hourly 10 d, daily 20 d, dead letters 7 d, documents 30 d, runs 30 d."""
    res.settings = replace(
        res.settings,
        jobs=replace(
            res.settings.jobs,
            retention_raw_days=10,
            retention_rollups_hourly_days=10,
            retention_rollups_daily_days=20,
            retention_dead_letters_days=7,
            retention_resolved_alerts_days=30,
            retention_event_logs_days=30,
            retention_job_runs_days=30,
        ),
        # Readings up to a day old are accepted; the raw cutoff may not pass that.
        pipeline=replace(res.settings.pipeline, max_age_s=86400),
    )
    return res


async def partitions(pg: asyncpg.Connection) -> list[str]:
    rows = await pg.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'decoded_data'::regclass ORDER BY 1"
    )
    return [row["relname"] for row in rows]


async def set_watermark(pg: asyncpg.Connection, moment: datetime) -> None:
    await pg.execute("INSERT INTO rollup_watermarks (name, watermark) VALUES ('hourly', $1)", moment)


@pytest.mark.usefixtures("partitioned")
async def test_raw_partitions_go_whole_once_their_upper_bound_passes_the_cutoff(
    settings: Settings, pg: asyncpg.Connection, aged: JobResources
) -> None:
    await set_watermark(pg, NOW)
    # Cutoff: 2026-06-05 12:00. Partitions are one day wide.
    await insert_readings(
        pg,
        settings,
        [
            (utc("2026-06-03 08:00"), 1, 1, 1.0),  # partition ends 06-04: dropped
            (utc("2026-06-04 23:59:59"), 1, 1, 2.0),  # ends 06-05 00:00: dropped
            (utc("2026-06-05 01:00"), 1, 1, 3.0),  # older than the cutoff, but its partition is not
            (utc("2026-06-06 00:00"), 1, 1, 4.0),
        ],
    )
    before = await partitions(pg)
    removed = {item.kind: item for item in await apply_retention(aged, NOW)}

    assert removed["raw"].partitions == ["decoded_data_p20260603", "decoded_data_p20260604"]
    assert await partitions(pg) == [p for p in before if p not in removed["raw"].partitions]
    values = [row["value"] for row in await pg.fetch("SELECT value FROM decoded_data ORDER BY timestamp")]
    assert values == [3.0, 4.0]
    # Nothing is left detached behind the parent's back.
    assert await pg.fetchval("SELECT count(*) FROM pg_class WHERE relname = 'decoded_data_p20260603'") == 0


async def test_raw_readings_not_yet_rolled_up_are_kept(
    settings: Settings, pg: asyncpg.Connection, aged: JobResources
) -> None:
    await insert_readings(pg, settings, [(utc("2026-06-01 08:00"), 1, 1, 1.0)])
    removed = {item.kind: item for item in await apply_retention(aged, NOW)}
    assert "raw" not in removed  # no rollup has run: nothing may go
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 1

    # The watermark stands at 06-02 03:00; minus the 2 h late window: 06-02 01:00.
    await set_watermark(pg, utc("2026-06-02 03:00"))
    await insert_readings(pg, settings, [(utc("2026-05-31 08:00"), 1, 1, 0.0)])
    removed = {item.kind: item for item in await apply_retention(aged, NOW)}
    assert removed["raw"].cutoff == utc("2026-06-02 01:00")
    # The partitions (or the hypertable's one-day chunks) of 05-31 and 06-01.
    assert len(removed["raw"].partitions) == 2
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 0


async def test_each_kind_loses_exactly_what_is_past_its_age(
    pg: asyncpg.Connection, aged: JobResources
) -> None:
    await set_watermark(pg, NOW)
    for bucket in ("2026-06-05 10:00", "2026-06-05 11:00", "2026-06-05 12:00"):
        await pg.execute(
            "INSERT INTO rollup_hourly VALUES ($1, 1, 1, 1, 0, 0, 0, 0, 0, $1)", utc(bucket)
        )  # hourly cutoff 06-05 12:00: the first two have ended by then
    for bucket in ("2026-05-25 00:00", "2026-05-26 00:00"):
        await pg.execute("INSERT INTO rollup_daily VALUES ($1, 1, 1, 1, 0, 0, 0, 0, 0, $1)", utc(bucket))
    for n, received in enumerate(("2026-06-08 11:59:59", "2026-06-08 12:00:01")):  # cutoff 06-08 12:00
        await pg.execute(
            "INSERT INTO dead_letters (fingerprint, topic, payload, payload_size, reason, received_at, "
            "last_received_at) VALUES ($1, 't', '', 0, 'bad', $2, $2)",
            hashlib.sha256(str(n).encode()).digest(),
            utc(received),
        )
    # Documents: cutoff 05-16 12:00, by the document's own `created_at` (as on MongoDB).
    documents = {
        ("alerts", "resolved-old"): ("resolved", "2026-05-16 11:00"),
        ("alerts", "open-old"): ("open", "2026-05-16 11:00"),
        ("alerts", "resolved-new"): ("resolved", "2026-05-16 13:00"),
        ("event_logs", "old"): (None, "2026-05-01 00:00"),
        ("event_logs", "new"): (None, "2026-06-01 00:00"),
    }
    for (collection, key), (status, created) in documents.items():
        await aged.docs.insert(
            collection, key, {"device_id": 1, "status": status, "created_at": utc(created)}
        )

    result = await tasks.retention(ctx_of(aged), period="2026-06-15")

    assert result["status"] == "done"
    assert result["removed"] == {
        "raw": 0,
        "rollups_hourly": 2,
        "rollups_daily": 1,
        "dead_letters": 1,
        "job_runs": 0,
        "resolved_alerts": 1,
        "event_logs": 1,
    }
    hourly = [row["bucket"] for row in await pg.fetch("SELECT bucket FROM rollup_hourly")]
    assert hourly == [utc("2026-06-05 12:00")]
    daily = [row["bucket"] for row in await pg.fetch("SELECT bucket FROM rollup_daily")]
    assert daily == [utc("2026-05-26 00:00")]
    assert await pg.fetchval("SELECT received_at FROM dead_letters") == utc("2026-06-08 12:00:01")
    left = await pg.fetch("SELECT collection, key FROM documents ORDER BY 1, 2")
    assert [(row["collection"], row["key"]) for row in left] == [
        ("alerts", "open-old"),
        ("alerts", "resolved-new"),
        ("event_logs", "new"),
    ]


async def test_an_age_of_zero_keeps_a_kind_forever(pg: asyncpg.Connection, aged: JobResources) -> None:
    aged.settings = replace(aged.settings, jobs=replace(aged.settings.jobs, retention_dead_letters_days=0))
    await pg.execute(
        "INSERT INTO dead_letters (fingerprint, topic, payload, payload_size, reason, received_at, "
        "last_received_at) VALUES ('\\x00', 't', '', 0, 'bad', '2000-01-01+00', '2000-01-01+00')"
    )
    kinds = {item.kind for item in await apply_retention(aged, NOW)}
    assert "dead_letters" not in kinds
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 1


async def test_raw_chunks_of_a_hypertable_go_by_drop_chunks_and_move_the_horizon(
    settings: Settings, pg: asyncpg.Connection, aged: JobResources, hypertable: None
) -> None:
    await set_watermark(pg, NOW)
    # Cutoff 2026-06-05 12:00; chunks are one day wide.
    await insert_readings(
        pg,
        settings,
        [
            (utc("2026-06-03 08:00"), 1, 1, 1.0),  # chunk ends 06-04: dropped
            (utc("2026-06-04 23:59:59"), 1, 1, 2.0),  # ends 06-05 00:00: dropped
            (utc("2026-06-05 01:00"), 1, 1, 3.0),  # older than the cutoff, but its chunk is not
            (utc("2026-06-06 00:00"), 1, 1, 4.0),
        ],
    )
    result = await tasks.retention(ctx_of(aged), period="2026-06-15")

    assert result["status"] == "done"
    assert len(result["partitions"]) == 2
    values = [row["value"] for row in await pg.fetch("SELECT value FROM decoded_data ORDER BY timestamp")]
    assert values == [3.0, 4.0]
    horizon = await pg.fetchval("SELECT watermark FROM rollup_watermarks WHERE name = $1", RAW_HORIZON)
    assert horizon == utc("2026-06-05 12:00")


async def plain_table_refusing_deletes(pg: asyncpg.Connection) -> None:
    """`decoded_data` as an unpartitioned table (partitioning off) whose DELETE fails."""
    await pg.execute("DROP TABLE decoded_data")
    await pg.execute(
        "CREATE TABLE decoded_data (timestamp timestamptz NOT NULL, device_id integer NOT NULL, "
        "datapoint_id integer NOT NULL, value double precision, "
        "PRIMARY KEY (timestamp, device_id, datapoint_id))"
    )
    await pg.execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
    )
    await pg.execute(
        "CREATE TRIGGER refuse BEFORE DELETE ON decoded_data FOR EACH ROW EXECUTE FUNCTION refuse()"
    )
    await pg.execute("INSERT INTO decoded_data VALUES ('2026-06-01 08:00+00', 1, 1, 1.0)")


async def test_a_failed_raw_drop_leaves_the_raw_horizon_where_it_was(
    pg: asyncpg.Connection, aged: JobResources
) -> None:
    await plain_table_refusing_deletes(pg)
    with pytest.raises(asyncpg.RaiseError, match="refused by the test"):
        await drop_raw_before(aged.pool, utc("2026-06-05 00:00"))
    # The readings are still there, so later backfills must still recompute their hours.
    assert await pg.fetchval("SELECT count(*) FROM rollup_watermarks WHERE name = $1", RAW_HORIZON) == 0
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 1

    await pg.execute("DROP TRIGGER refuse ON decoded_data")
    removed = await drop_raw_before(aged.pool, utc("2026-06-05 00:00"))
    assert removed.rows == 1
    horizon = await pg.fetchval("SELECT watermark FROM rollup_watermarks WHERE name = $1", RAW_HORIZON)
    assert horizon == utc("2026-06-05 00:00")


async def test_one_kind_failing_leaves_the_other_kinds_to_run(
    pg: asyncpg.Connection, aged: JobResources
) -> None:
    await set_watermark(pg, NOW)
    await plain_table_refusing_deletes(pg)  # raw retention, the first kind, fails
    await pg.execute(
        "INSERT INTO dead_letters (fingerprint, topic, payload, payload_size, reason, received_at, "
        "last_received_at) VALUES ('\\x00', 't', '', 0, 'bad', '2000-01-01+00', '2000-01-01+00')"
    )
    await pg.execute(
        "INSERT INTO rollup_hourly VALUES ('2000-01-01+00', 1, 1, 1, 0, 0, 0, 0, 0, '2000-01-01+00')"
    )
    await aged.docs.insert("event_logs", "old", {"device_id": 1, "created_at": utc("2000-01-01 00:00")})

    with pytest.raises(asyncpg.RaiseError, match="refused by the test"):
        await tasks.retention(ctx_of(aged), period="2026-06-15")

    assert await pg.fetchval("SELECT status FROM job_runs WHERE job = 'retention'") == "failed"
    for table in ("dead_letters", "rollup_hourly", "documents"):
        assert await pg.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 1
