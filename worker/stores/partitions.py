"""Range partitions of `decoded_data` when TimescaleDB is absent: one table per period."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

import asyncpg

from worker.stores.postgres import Connection

PARENT = "decoded_data"
EPOCH = date(1970, 1, 1)


def partition_start(day: date, width_days: int) -> date:
    """First day of the partition holding `day`; partitions tile time from 1970-01-01."""
    offset = (day - EPOCH).days // width_days * width_days
    return EPOCH + timedelta(days=offset)


def partition_name(start: date) -> str:
    return f"{PARENT}_p{start:%Y%m%d}"


async def is_partitioned(conn: Connection) -> bool:
    kind = await conn.fetchval("SELECT c.relkind::text FROM pg_class c WHERE c.oid = to_regclass($1)", PARENT)
    return kind == "p"


class PartitionKeeper:
    """Creates the partitions a batch needs before it is written, once per period."""

    def __init__(self, width_days: int) -> None:
        self.width_days = width_days
        self._known: set[date] = set()

    def missing(self, timestamps: Iterable[datetime]) -> set[date]:
        starts = {partition_start(ts.astimezone(UTC).date(), self.width_days) for ts in timestamps}
        return starts - self._known

    async def ensure(self, conn: Connection, starts: Iterable[date]) -> None:
        for start in sorted(starts):
            end = start + timedelta(days=self.width_days)
            # Another worker may create it between our check and our create.
            with contextlib.suppress(asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {partition_name(start)} PARTITION OF {PARENT} "
                    f"FOR VALUES FROM ('{start.isoformat()}+00') TO ('{end.isoformat()}+00')"
                )
            self._known.add(start)

    def forget(self) -> None:
        """After a reconnect the database may have been rebuilt; check again."""
        self._known.clear()
