"""The two document queries the jobs need beyond worker.documents' narrow interface.

Counting alerts per device in a period and deleting only *resolved* alerts need a range
or a filter on a field, which `DocumentStore` does not offer; each backend answers them
natively here instead of the jobs fetching documents to filter them in Python.

PostgreSQL: time fields inside documents are ISO-8601 text (worker.documents stores
datetimes that way) and are cast to timestamptz in the query; deletions go by the row's
`created_at`, like `DocumentStore.delete_before`. MongoDB: fields hold BSON dates.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

import asyncpg
import orjson

from worker.config import DocumentSettings


class DocumentQueries(Protocol):
    async def count_per_device(
        self,
        collection: str,
        start: datetime,
        end: datetime,
        *,
        time_field: str = "created_at",
        where: dict[str, Any] | None = None,
    ) -> dict[int, int]:
        """Documents per `device_id` whose `time_field` is in [start, end) and that match `where`."""

    async def delete_before_where(self, collection: str, before: datetime, where: dict[str, Any]) -> int:
        """Remove documents created before `before` that match `where`; return how many."""

    async def close(self) -> None: ...


class PostgresDocumentQueries:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def count_per_device(
        self,
        collection: str,
        start: datetime,
        end: datetime,
        *,
        time_field: str = "created_at",
        where: dict[str, Any] | None = None,
    ) -> dict[int, int]:
        rows = await self._pool.fetch(
            "SELECT (doc->>'device_id')::integer AS device_id, count(*) AS n FROM documents "
            "WHERE collection = $1 AND doc @> $2::jsonb AND doc ? 'device_id' "
            "AND (doc->>$3)::timestamptz >= $4 AND (doc->>$3)::timestamptz < $5 "
            "GROUP BY 1",
            collection,
            orjson.dumps(where or {}).decode(),
            time_field,
            start,
            end,
        )
        return {row["device_id"]: row["n"] for row in rows}

    async def delete_before_where(self, collection: str, before: datetime, where: dict[str, Any]) -> int:
        status = await self._pool.execute(
            "DELETE FROM documents WHERE collection = $1 AND created_at < $2 AND doc @> $3::jsonb",
            collection,
            before,
            orjson.dumps(where).decode(),
        )
        return int(status.split()[-1])

    async def close(self) -> None:
        """The pool belongs to the caller."""


class MongoDocumentQueries:
    """Not exercised by the test suite (no MongoDB on the test machines); same semantics."""

    def __init__(self, settings: DocumentSettings) -> None:
        from pymongo import AsyncMongoClient

        self._client: Any = AsyncMongoClient(settings.mongodb_url, tz_aware=True)
        self._db = self._client[settings.mongodb_database]

    async def count_per_device(
        self,
        collection: str,
        start: datetime,
        end: datetime,
        *,
        time_field: str = "created_at",
        where: dict[str, Any] | None = None,
    ) -> dict[int, int]:
        match = {**(where or {}), time_field: {"$gte": start, "$lt": end}}
        pipeline = [{"$match": match}, {"$group": {"_id": "$device_id", "n": {"$sum": 1}}}]
        cursor = await self._db[collection].aggregate(pipeline)
        return {int(doc["_id"]): int(doc["n"]) async for doc in cursor if doc["_id"] is not None}

    async def delete_before_where(self, collection: str, before: datetime, where: dict[str, Any]) -> int:
        result = await self._db[collection].delete_many({**where, "created_at": {"$lt": before}})
        return int(result.deleted_count)

    async def close(self) -> None:
        await self._client.close()


def open_document_queries(settings: DocumentSettings, pool: asyncpg.Pool) -> DocumentQueries:
    if settings.backend == "mongodb":
        return MongoDocumentQueries(settings)
    return PostgresDocumentQueries(pool)
