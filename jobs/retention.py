"""Retention: remove what is older than its kind's configured age, and log what went.

Raw readings go a whole partition at a time (detached concurrently, then dropped, so the
ingest path is not blocked), never row by row: a partition goes once its upper bound is
at or before the cutoff. The raw cutoff never passes the rollup watermark minus the late
window (hours the incremental rollup has not reached stay; readings that arrived too late
for it are not protected: only a backfill rolls them up) nor the pipeline's oldest accepted
reading (a partition that can still receive data stays, or the writer would have to
recreate it). Rollups go by bucket, dead letters by `received_at`, documents by creation
time, and for alerts only resolved ones.
An age of 0 keeps a kind forever. Each kind runs whatever happened to the others.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import asyncpg
import structlog

from jobs.context import JobResources
from jobs.periods import DAY, HOUR, parse_time
from jobs.rollups import LOCK_RAW, RAW_HORIZON, read_watermark
from worker.stores.partitions import PARENT, is_partitioned
from worker.stores.postgres import Connection

log = structlog.get_logger("jobs.retention")

_UPPER_BOUND = re.compile(r"TO \('([^']+)'\)")


@dataclass
class Removed:
    kind: str
    cutoff: datetime
    rows: int = 0
    partitions: list[str] = field(default_factory=list)
    rows_estimated: bool = False


async def apply_retention(res: JobResources, now: datetime) -> list[Removed]:
    """Every kind is tried, whatever happened to the ones before it; a kind that failed is
    logged (`retention.failed`) and, once the others ran, its error is raised for the runner
    to retry or record. A retry repeats them all: each kind is idempotent."""
    cfg = res.settings.jobs
    removed: list[Removed] = []
    failures: list[BaseException] = []

    async def attempt(kind: str, step: Callable[[], Awaitable[Removed | None]]) -> None:
        try:
            item = await step()
        except Exception as exc:
            log.error("retention.failed", kind=kind, error=repr(exc))
            failures.append(exc)
            return
        if item is not None:
            removed.append(_logged(item))

    if cfg.retention_raw_days:

        async def raw() -> Removed | None:
            cutoff = await _raw_cutoff(res, now, now - timedelta(days=cfg.retention_raw_days))
            return None if cutoff is None else await drop_raw_before(res.pool, cutoff)

        await attempt("raw", raw)
    tables = (
        ("rollups_hourly", cfg.retention_rollups_hourly_days, "rollup_hourly", "bucket", HOUR),
        ("rollups_daily", cfg.retention_rollups_daily_days, "rollup_daily", "bucket", DAY),
        ("dead_letters", cfg.retention_dead_letters_days, "dead_letters", "received_at", timedelta()),
        ("job_runs", cfg.retention_job_runs_days, "job_runs", "started_at", timedelta()),
    )
    for kind, days, table, column, width in tables:
        if days:
            cutoff = now - timedelta(days=days)
            await attempt(kind, partial(_delete_rows, res.pool, kind, table, column, width, cutoff))
    documents = (
        ("resolved_alerts", cfg.retention_resolved_alerts_days, "alerts", {"status": "resolved"}),
        ("event_logs", cfg.retention_event_logs_days, "event_logs", None),
    )
    for kind, days, collection, where in documents:
        if days:
            cutoff = now - timedelta(days=days)
            await attempt(kind, partial(_delete_documents, res, kind, collection, cutoff, where))
    if failures:
        raise failures[0]
    return removed


async def _delete_documents(
    res: JobResources, kind: str, collection: str, cutoff: datetime, where: dict[str, Any] | None
) -> Removed:
    return Removed(kind, cutoff, await res.docs.delete_before(collection, cutoff, where))


def _logged(item: Removed) -> Removed:
    """One line per kind as soon as it is done, so a later failure does not hide it."""
    log.info(
        "retention.removed",
        kind=item.kind,
        cutoff=item.cutoff.isoformat(),
        rows=item.rows,
        rows_estimated=item.rows_estimated,
        partitions=item.partitions,
    )
    return item


async def _raw_cutoff(res: JobResources, now: datetime, wanted: datetime) -> datetime | None:
    cfg = res.settings
    if not cfg.timeseries.uses_postgres:
        return None  # Cassandra holds the readings: its TTL is their retention (docs/storage.md)
    cutoff = min(wanted, now - timedelta(seconds=cfg.pipeline.max_age_s))
    if cfg.jobs.rollups_enabled:
        watermark = await read_watermark(res.pool)
        if watermark is None:
            log.warning("retention.raw_waits", reason="no rollup has run yet; raw readings are kept")
            return None
        cutoff = min(cutoff, watermark - timedelta(seconds=cfg.jobs.late_window_s))
    if cutoff < wanted:
        log.info("retention.raw_cutoff_held", wanted=wanted.isoformat(), cutoff=cutoff.isoformat())
    return cutoff


async def _delete_rows(
    pool: asyncpg.Pool, kind: str, table: str, column: str, width: timedelta, cutoff: datetime
) -> Removed:
    """Rows whose whole span [column, column + width) ends at or before the cutoff."""
    if width:
        status = await pool.execute(f"DELETE FROM {table} WHERE {column} <= $1", cutoff - width)
    else:
        status = await pool.execute(f"DELETE FROM {table} WHERE {column} < $1", cutoff)
    return Removed(kind, cutoff, int(status.split()[-1]))


async def drop_raw_before(pool: asyncpg.Pool, cutoff: datetime) -> Removed:
    """Drop raw readings older than `cutoff` the cheapest way the table allows.

    Under the exclusive raw lock, so no rollup bucket is being recomputed from the data
    that goes. Without partitions (a hypertable, or a plain table) the cutoff is recorded as
    the raw horizon in the drop's own transaction, once the drop succeeded: rollups before
    it are then never recomputed (from data that is gone), and a failed drop moves nothing.
    """
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1, $2)", *LOCK_RAW)
        try:
            return await _drop_raw(conn, cutoff)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", *LOCK_RAW)


async def _drop_raw(conn: Connection, cutoff: datetime) -> Removed:
    if await is_partitioned(conn):  # a pool proxy behaves the same
        return await _drop_partitions(conn, cutoff)  # the partitions left are the horizon
    # The drop and the horizon commit together: a failed drop leaves the horizon where it was
    # (rollups keep recomputing hours whose data is still there); a successful one is never
    # without it.
    async with conn.transaction():
        extension = await _timescale_schema(conn)
        if extension is not None and await _is_hypertable(conn):
            # Chunks entirely before the cutoff go; the recorded horizon errs on the safe side.
            names = await conn.fetch(
                f'SELECT "{extension}".drop_chunks(to_regclass($1), older_than => $2::timestamptz)::text '
                "AS name",
                PARENT,
                cutoff,
            )
            result = Removed("raw", cutoff, partitions=[row["name"] for row in names])
        else:
            # A plain table (partitioning off): the only way left is row by row.
            status = await conn.execute(f"DELETE FROM {PARENT} WHERE timestamp < $1", cutoff)
            result = Removed("raw", cutoff, rows=int(status.split()[-1]))
        await conn.execute(
            "INSERT INTO rollup_watermarks (name, watermark) VALUES ($1, $2) ON CONFLICT (name) "
            "DO UPDATE SET watermark = greatest(rollup_watermarks.watermark, excluded.watermark), "
            "updated_at = now()",
            RAW_HORIZON,
            cutoff,
        )
    return result


async def _drop_partitions(conn: Connection, cutoff: datetime) -> Removed:
    """Detach and drop each partition whose upper bound is at or before the cutoff.

    `rows` is then PostgreSQL's estimate (`reltuples`): counting a day of readings exactly
    would cost a scan of the very data being thrown away.
    """
    removed = Removed("raw", cutoff, rows_estimated=True)
    for part in await _partitions(conn):
        if part.upper is None or part.upper > cutoff:
            if part.pending:
                log.warning("retention.pending_detach_kept", partition=part.name)
            continue
        if part.pending:
            # An earlier run was interrupted between its two phases; finish it.
            await conn.execute(f'ALTER TABLE {PARENT} DETACH PARTITION "{part.name}" FINALIZE')
        else:
            # CONCURRENTLY takes no lock that blocks writers of the parent. It cannot run in a
            # transaction block; asyncpg's execute outside `transaction()` is not one.
            await conn.execute(f'ALTER TABLE {PARENT} DETACH PARTITION "{part.name}" CONCURRENTLY')
        await conn.execute(f'DROP TABLE "{part.name}"')
        removed.partitions.append(part.name)
        removed.rows += part.estimated_rows
    return removed


@dataclass(frozen=True)
class _Partition:
    name: str
    upper: datetime | None  # None: the default partition
    estimated_rows: int
    pending: bool  # a detach was started and not finished


async def _partitions(conn: Connection) -> list[_Partition]:
    """Partitions of the raw table; bounds are read with the session in UTC to parse unambiguously."""
    async with conn.transaction():
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        rows = await conn.fetch(
            "SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound, "
            "greatest(c.reltuples, 0)::bigint AS estimate, i.inhdetachpending AS pending "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass($1) ORDER BY c.relname",
            PARENT,
        )
    partitions = []
    for row in rows:
        match = _UPPER_BOUND.search(row["bound"])
        upper = parse_time(match.group(1)) if match else None
        partitions.append(_Partition(row["name"], upper, int(row["estimate"]), bool(row["pending"])))
    return partitions


async def _timescale_schema(conn: Connection) -> str | None:
    """The schema of TimescaleDB's functions in this database, or None without the extension."""
    schema: str | None = await conn.fetchval(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'timescaledb'"
    )
    return schema


async def _is_hypertable(conn: Connection) -> bool:
    """Read from TimescaleDB's catalog table: no extension function is called, so this holds
    even where the library is not preloaded."""
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM _timescaledb_catalog.hypertable h "
            "JOIN pg_namespace n ON n.nspname = h.schema_name "
            "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = h.table_name "
            "WHERE c.oid = to_regclass($1)",
            PARENT,
        )
    )
