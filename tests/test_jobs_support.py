"""Shared helpers of the tests/test_jobs_* modules (no tests here): resources with a pinned
clock, a unique arq queue per test, and writers of crafted raw readings and devices."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from jobs.context import CTX_KEY, JobResources, open_resources
from worker.config import Settings
from worker.stores.partitions import PartitionKeeper, is_partitioned
from worker.stores.redis import delete_matching


def utc(text: str) -> datetime:
    """'2026-03-10 10:20' → an aware UTC datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


class Clock:
    """A clock the test moves by hand; the jobs read it instead of the real time."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def with_unique_queue(settings: Settings, **jobs: Any) -> Settings:
    """The test's own queue, under its own Redis prefix (so `drop_arq_keys` finds its keys)."""
    queue = f"{settings.redis.key_prefix}jobs"
    return replace(settings, jobs=replace(settings.jobs, queue_name=queue, **jobs))


@pytest.fixture
async def drop_arq_keys(settings: Settings) -> AsyncIterator[None]:
    """arq's own keys (`arq:job:…`, `arq:result:…`) hold the queue name in their middle."""
    yield
    await delete_matching(settings.redis, f"arq:*{settings.redis.key_prefix}*")


@pytest.fixture
def clock() -> Clock:
    return Clock(utc("2026-03-10 12:10"))


@pytest.fixture
async def res(settings: Settings, clock: Clock) -> AsyncIterator[JobResources]:
    async with open_resources(with_unique_queue(settings), clock=clock) as resources:
        yield resources


def ctx_of(res: JobResources, **extra: Any) -> dict[str, Any]:
    """The ctx a job function gets from arq, for a direct call."""
    return {CTX_KEY: res, **extra}


async def insert_readings(
    conn: asyncpg.Connection, settings: Settings, rows: Iterable[tuple[datetime, int, int, float | None]]
) -> None:
    """(timestamp, device_id, datapoint_id, value) rows, creating the partitions they need first
    (a TimescaleDB hypertable makes its chunks itself, and refuses partitions)."""
    rows = list(rows)
    if await is_partitioned(conn):
        keeper = PartitionKeeper(settings.postgres.partition_days)
        await keeper.ensure(conn, keeper.missing(ts for ts, *_ in rows))
    await conn.executemany(
        "INSERT INTO decoded_data (timestamp, device_id, datapoint_id, value) VALUES ($1, $2, $3, $4)", rows
    )


async def add_device(
    conn: asyncpg.Connection,
    key: str,
    *,
    max_silence_s: int | None = None,
    labels: Iterable[str] = (),
    created_at: datetime | None = None,
) -> tuple[int, dict[str, int]]:
    """A device of the demo user and its datapoints; (device id, {label: datapoint id})."""
    device_id: int = await conn.fetchval(
        "INSERT INTO devices (device_key, user_id, name, max_silence_s, created_at) "
        "VALUES ($1, (SELECT id FROM users WHERE username = 'demo'), $1, $2, coalesce($3, now())) RETURNING id",
        key,
        max_silence_s,
        created_at,
    )
    datapoints = {}
    for label in labels:
        datapoints[label] = await conn.fetchval(
            "INSERT INTO datapoints (device_id, label) VALUES ($1, $2) RETURNING id", device_id, label
        )
    return device_id, datapoints
