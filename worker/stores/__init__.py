"""The owner of every store connection: opened in one place, handed out, closed last.

`open_stores(settings)` connects to what the configuration asks for — the
PostgreSQL pool (relational core, time series, and the documents when there is
no MongoDB), the Redis client (hot state, caches, pub/sub), the document
store, the Cassandra session when `timeseries.backend` uses it (connected on
first use), and the Kafka producer when `kafka.bridge` is on — and closes them, in
reverse order, when its `async with` ends: after the daemon's actors, the jobs or a
command, which receive them from it and never open connections of their own.
Adding a store means one entry here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import redis.asyncio as aioredis
import structlog

from worker.config import Settings
from worker.stores.cassandra import CassandraStore
from worker.stores.documents import DocumentStore, open_document_store
from worker.stores.keys import RedisKeys
from worker.stores.postgres import create_pool
from worker.stores.redis import redis_client

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

log = structlog.get_logger("worker.stores")

HEALTH_TIMEOUT_S = 2.0
# The daemon's users of the pool at once: the time-series writer (one per write), the
# registry, the rules source, the alert documents (two writers), a readiness probe, and
# the notification actor's round (held while it sends).
DEFAULT_POOL_SIZE = 7


@dataclass(frozen=True, slots=True)
class Stores:
    settings: Settings
    postgres: asyncpg.Pool
    redis: aioredis.Redis
    documents: DocumentStore
    keys: RedisKeys
    kafka: AIOKafkaProducer | None = None  # the bridge's producer, when kafka.bridge is on
    cassandra: CassandraStore | None = None  # when timeseries.backend is cassandra or both

    async def health(self) -> dict[str, bool]:
        """Which stores answer now, for /readyz; never raises."""
        checks = {
            "postgres": self._check(self._postgres_answers()),
            "redis": self._check(self.redis.ping()),
        }
        if self.settings.documents.backend == "mongodb":
            checks["mongodb"] = self._check(self.documents.ping())
        if self.kafka is not None:
            checks["kafka"] = self._check(self._kafka_answers())
        if self.cassandra is not None:
            checks["cassandra"] = self._check(self.cassandra.ping())
        names = list(checks)
        results = await asyncio.gather(*checks.values())
        return dict(zip(names, results, strict=True))

    async def verify(self) -> None:
        """Talk to every store once, so a wrong password or an unknown database shows at
        start instead of at the first write; raises what the first one that fails raises."""
        await self._postgres_answers()
        await self.redis.ping()
        if self.settings.documents.backend == "mongodb":
            await self.documents.ping()
        if self.kafka is not None:
            from worker.stores.kafka import check_topics

            await check_topics(self.kafka, self.settings.kafka_topics)
        # Only when Cassandra is the one time-series store: in "both" mode the pipeline
        # starts without it (docs/storage.md).
        if self.cassandra is not None and self.settings.timeseries.backend == "cassandra":
            await self.cassandra.ping()

    async def _kafka_answers(self) -> bool:
        from worker.stores.kafka import existing_topics

        assert self.kafka is not None
        return bool(await existing_topics(self.kafka))

    async def _postgres_answers(self) -> bool:
        async with self.postgres.acquire(timeout=HEALTH_TIMEOUT_S) as conn:
            return bool(await conn.fetchval("SELECT true", timeout=HEALTH_TIMEOUT_S))

    @staticmethod
    async def _check(probe: Awaitable[object]) -> bool:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                return bool(await probe)
        except Exception:
            return False


@contextlib.asynccontextmanager
async def open_stores(
    settings: Settings,
    *,
    application_name: str = "iotflow",
    pool_size: int = DEFAULT_POOL_SIZE,
    lock_timeout_s: float | None = None,
    command_timeout_s: float | None = None,
    kafka: bool = False,
) -> AsyncIterator[Stores]:
    """Connect to every configured store; close them all when the block ends.

    `kafka`: the daemon's stores, which include the bridge's producer when
    `kafka.bridge` is on; the jobs and the commands never write to Kafka.

    Raises what the first failing connection raises (the callers decide whether that
    is worth waiting out); whatever was opened before it is closed again.
    """
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(
            settings.postgres,
            max_size=pool_size,
            application_name=application_name,
            lock_timeout_s=lock_timeout_s,
            command_timeout_s=command_timeout_s,
        )
        stack.push_async_callback(pool.close)
        client = redis_client(settings.redis)
        stack.push_async_callback(client.aclose)
        documents = open_document_store(settings.documents, pool)
        stack.push_async_callback(documents.close)
        producer = None
        if kafka and settings.kafka.bridge:
            from worker.stores.kafka import close_producer, create_producer, start_producer

            producer = create_producer(settings.kafka)
            # start() connects and, when idempotent, fetches a producer id; the close flushes,
            # for a request's time at most (what is left was never acknowledged upstream).
            stack.push_async_callback(close_producer, producer, settings.kafka.request_timeout_ms / 1000)
            await start_producer(producer, settings.kafka)
        cassandra = None
        if settings.timeseries.uses_cassandra:
            cassandra = CassandraStore(settings.cassandra)  # connects on first use
            stack.push_async_callback(cassandra.close)
        stores = Stores(
            settings,
            pool,
            client,
            documents,
            RedisKeys(settings.redis.key_prefix),
            kafka=producer,
            cassandra=cassandra,
        )
        log.debug(
            "stores.opened",
            documents=settings.documents.backend,
            timeseries=settings.timeseries.backend,
            kafka=producer is not None,
        )
        yield stores
