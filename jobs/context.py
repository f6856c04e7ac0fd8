"""What every job needs, opened once per arq worker and kept in its `ctx`.

arq hands each job a plain dict; `resources(ctx)` gives back the typed bundle that
`on_startup` (or a test, or a CLI command) put there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg
import redis.asyncio as aioredis
from asyncpg.pool import PoolConnectionProxy

from jobs.periods import utc_now
from worker.config import Settings
from worker.documents import DocumentStore, open_document_store
from worker.keys import RedisKeys

CTX_KEY = "iotflow"

# A connection of its own or one borrowed from a pool: the jobs use either.
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy


@dataclass
class JobResources:
    settings: Settings
    pool: asyncpg.Pool
    docs: DocumentStore
    redis: aioredis.Redis
    keys: RedisKeys
    clock: Callable[[], datetime] = utc_now  # tests pin it to make periods deterministic
    owns_redis: bool = True

    async def close(self) -> None:
        await self.docs.close()
        if self.owns_redis:
            await self.redis.aclose()
        await self.pool.close()


async def create_jobs_pool(settings: Settings, max_size: int = 4) -> asyncpg.Pool:
    """A pool like worker.db's, plus a lock timeout: a job waiting on a lock should give up and retry."""
    pg = settings.postgres
    pool = await asyncpg.create_pool(
        pg.url,
        min_size=1,
        max_size=max_size,
        timeout=10.0,
        server_settings={
            "search_path": f'"{pg.schema}", public',
            "application_name": "iotflow-jobs",
            "lock_timeout": f"{int(settings.jobs.lock_timeout_s * 1000)}ms",
        },
    )
    assert pool is not None  # create_pool only returns None when not awaited
    return pool


async def open_resources(
    settings: Settings,
    redis: aioredis.Redis | None = None,
    clock: Callable[[], datetime] | None = None,
) -> JobResources:
    """Connect to the stores; a given `redis` (arq's own pool) is borrowed, not closed."""
    pool = await create_jobs_pool(settings, max_size=max(2, settings.jobs.max_jobs))
    client = redis if redis is not None else aioredis.Redis.from_url(settings.redis.url)
    return JobResources(
        settings=settings,
        pool=pool,
        docs=open_document_store(settings.documents, pool),
        redis=client,
        keys=RedisKeys(settings.redis.key_prefix),
        clock=clock or utc_now,
        owns_redis=redis is None,
    )


def resources(ctx: dict[str, Any]) -> JobResources:
    found = ctx.get(CTX_KEY)
    if not isinstance(found, JobResources):
        raise RuntimeError("job context has no resources: was the worker's on_startup run?")
    return found
