"""What every job needs, opened once per arq worker and kept in its `ctx`.

arq hands each job a plain dict; `resources(ctx)` gives back the typed bundle that
`on_startup` (or a test, or a CLI command) put there. The connections in it belong
to one `Stores` (worker/stores), opened for the jobs with a lock timeout: a job
waiting on a lock should give up and retry rather than hold a connection forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from jobs.periods import utc_now
from worker.config import Settings
from worker.stores import Stores, open_stores
from worker.stores.cassandra import CassandraStore
from worker.stores.documents import DocumentStore
from worker.stores.keys import RedisKeys

CTX_KEY = "iotflow"


@dataclass
class JobResources:
    settings: Settings
    pool: asyncpg.Pool
    docs: DocumentStore
    redis: aioredis.Redis
    keys: RedisKeys
    clock: Callable[[], datetime] = utc_now  # tests pin it to make periods deterministic
    cassandra: CassandraStore | None = None  # when timeseries.backend uses Cassandra

    @property
    def postgres(self) -> asyncpg.Pool:
        """The pool under the name `Stores` gives it (worker.stores.timeseries reads either)."""
        return self.pool

    @classmethod
    def of(cls, stores: Stores, clock: Callable[[], datetime] | None = None) -> JobResources:
        return cls(
            stores.settings,
            stores.postgres,
            stores.documents,
            stores.redis,
            stores.keys,
            clock or utc_now,
            stores.cassandra,
        )


@contextlib.asynccontextmanager
async def open_resources(
    settings: Settings, clock: Callable[[], datetime] | None = None
) -> AsyncIterator[JobResources]:
    """The stores the jobs use, for the duration of the block."""
    async with open_stores(
        settings,
        application_name="iotflow-jobs",
        pool_size=max(2, settings.jobs.max_jobs) + 1,
        lock_timeout_s=settings.jobs.lock_timeout_s,
        command_timeout_s=float(settings.jobs.job_timeout_s),  # a rollup of a busy hour takes a while
    ) as stores:
        yield JobResources.of(stores, clock)


def resources(ctx: dict[str, Any]) -> JobResources:
    found = ctx.get(CTX_KEY)
    if not isinstance(found, JobResources):
        raise RuntimeError("job context has no resources: was the worker's on_startup run?")
    return found
