"""The document store (SPEC §5): MongoDB, or PostgreSQL JSONB with the same shapes.

Documents are plain dicts addressed by (collection, key); the key is MongoDB's
`_id`. `insert` is idempotent on the key, which is what makes redelivery and
job retries harmless: the second insert of the same alert is a no-op.
Filters are equality on top-level fields, which both backends index; the two range
queries the jobs need (`count_per_device`, `delete_before`) run natively on each.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

import asyncpg
import orjson

from worker.config import DocumentSettings


class DocumentStore(Protocol):
    async def insert(self, collection: str, key: str, doc: dict[str, Any]) -> bool:
        """Store `doc` under `key` unless present; True when it was new."""

    async def upsert(self, collection: str, key: str, doc: dict[str, Any]) -> None: ...

    async def update(self, collection: str, key: str, changes: dict[str, Any]) -> bool:
        """Set top-level fields of an existing document; False when there is none."""

    async def get(self, collection: str, key: str) -> dict[str, Any] | None: ...

    async def find(
        self,
        collection: str,
        where: dict[str, Any] | None = None,
        *,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 100,
    ) -> list[dict[str, Any]]: ...

    async def delete_before(
        self, collection: str, before: datetime, where: dict[str, Any] | None = None
    ) -> int:
        """Remove documents created before `before` (and matching `where`); return how many."""

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

    async def change_marker(self, collection: str) -> str | None:
        """A value that moves whenever `collection` changes, cheap to read; None when the
        backend has none (the caller then re-reads the collection to find out)."""

    async def ping(self) -> bool:
        """True when the backend answers (for /readyz)."""

    async def close(self) -> None: ...


def _json_default(value: Any) -> Any:
    raise TypeError(f"cannot store {type(value).__name__} in a document")


def _dumps(doc: dict[str, Any]) -> str:
    return orjson.dumps(doc, default=_json_default).decode()


class PostgresDocumentStore:
    """Documents in the `documents` JSONB table; datetimes are stored as ISO-8601 text."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def insert(self, collection: str, key: str, doc: dict[str, Any]) -> bool:
        status = await self._pool.execute(
            "INSERT INTO documents (collection, key, doc) VALUES ($1, $2, $3::jsonb) "
            "ON CONFLICT (collection, key) DO NOTHING",
            collection,
            key,
            _dumps(doc),
        )
        return bool(status.endswith(" 1"))

    async def upsert(self, collection: str, key: str, doc: dict[str, Any]) -> None:
        await self._pool.execute(
            "INSERT INTO documents (collection, key, doc) VALUES ($1, $2, $3::jsonb) "
            "ON CONFLICT (collection, key) DO UPDATE SET doc = excluded.doc, updated_at = now()",
            collection,
            key,
            _dumps(doc),
        )

    async def update(self, collection: str, key: str, changes: dict[str, Any]) -> bool:
        status = await self._pool.execute(
            "UPDATE documents SET doc = doc || $3::jsonb, updated_at = now() "
            "WHERE collection = $1 AND key = $2",
            collection,
            key,
            _dumps(changes),
        )
        return bool(status.endswith(" 1"))

    async def get(self, collection: str, key: str) -> dict[str, Any] | None:
        raw = await self._pool.fetchval(
            "SELECT doc FROM documents WHERE collection = $1 AND key = $2", collection, key
        )
        return None if raw is None else {"_id": key, **orjson.loads(raw)}

    async def find(
        self,
        collection: str,
        where: dict[str, Any] | None = None,
        *,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        # The table's own indexed `created_at` column is when the document was first stored.
        order = "created_at"
        args: list[Any] = [collection, _dumps(where or {}), limit]
        if order_by and order_by != "created_at":
            order = "doc->$4"
            args.append(order_by)
        rows = await self._pool.fetch(
            f"SELECT key, doc FROM documents WHERE collection = $1 AND doc @> $2::jsonb "
            f"ORDER BY {order} {'DESC' if descending else 'ASC'} LIMIT $3",
            *args,
        )
        return [{"_id": row["key"], **orjson.loads(row["doc"])} for row in rows]

    async def delete_before(
        self, collection: str, before: datetime, where: dict[str, Any] | None = None
    ) -> int:
        status = await self._pool.execute(
            "DELETE FROM documents WHERE collection = $1 AND created_at < $2 AND doc @> $3::jsonb",
            collection,
            before,
            _dumps(where or {}),
        )
        return int(status.split()[-1])

    async def count_per_device(
        self,
        collection: str,
        start: datetime,
        end: datetime,
        *,
        time_field: str = "created_at",
        where: dict[str, Any] | None = None,
    ) -> dict[int, int]:
        # Times inside documents are ISO-8601 text here: cast them for the range.
        rows = await self._pool.fetch(
            "SELECT (doc->>'device_id')::integer AS device_id, count(*) AS n FROM documents "
            "WHERE collection = $1 AND doc @> $2::jsonb AND doc ? 'device_id' "
            "AND (doc->>$3)::timestamptz >= $4 AND (doc->>$3)::timestamptz < $5 GROUP BY 1",
            collection,
            _dumps(where or {}),
            time_field,
            start,
            end,
        )
        return {row["device_id"]: row["n"] for row in rows}

    async def change_marker(self, collection: str) -> str | None:
        marker: str = await self._pool.fetchval(
            "SELECT count(*)::text || '/' || coalesce(max(updated_at)::text, '') "
            "FROM documents WHERE collection = $1",
            collection,
        )
        return marker

    async def ping(self) -> bool:
        return True  # the PostgreSQL pool's own check covers it

    async def close(self) -> None:
        """The pool belongs to the caller."""


class MongoDocumentStore:
    """Documents in MongoDB through PyMongo's async API; `key` is `_id`."""

    def __init__(self, settings: DocumentSettings) -> None:
        from pymongo import AsyncMongoClient

        # Timeouts so a hung server surfaces as an error the callers retry, not as silence.
        self._client: Any = AsyncMongoClient(
            settings.mongodb_url, tz_aware=True, serverSelectionTimeoutMS=10_000, socketTimeoutMS=30_000
        )
        self._db = self._client[settings.mongodb_database]

    async def insert(self, collection: str, key: str, doc: dict[str, Any]) -> bool:
        from pymongo.errors import DuplicateKeyError

        try:
            await self._db[collection].insert_one({**doc, "_id": key})
        except DuplicateKeyError:
            return False
        return True

    async def upsert(self, collection: str, key: str, doc: dict[str, Any]) -> None:
        await self._db[collection].replace_one({"_id": key}, {**doc, "_id": key}, upsert=True)

    async def update(self, collection: str, key: str, changes: dict[str, Any]) -> bool:
        result = await self._db[collection].update_one({"_id": key}, {"$set": changes})
        return bool(result.matched_count)

    async def get(self, collection: str, key: str) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self._db[collection].find_one({"_id": key})
        return doc

    async def find(
        self,
        collection: str,
        where: dict[str, Any] | None = None,
        *,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        cursor = self._db[collection].find(where or {})
        cursor = cursor.sort(order_by or "_id", -1 if descending else 1).limit(limit)
        return [doc async for doc in cursor]

    async def delete_before(
        self, collection: str, before: datetime, where: dict[str, Any] | None = None
    ) -> int:
        # Documents carry their own creation time as `created_at` (SPEC §5 shapes).
        result = await self._db[collection].delete_many({**(where or {}), "created_at": {"$lt": before}})
        return int(result.deleted_count)

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

    async def change_marker(self, collection: str) -> str | None:
        return None  # no cheap "last changed" per collection; a change stream would be the way

    async def ping(self) -> bool:
        await self._client.admin.command("ping")
        return True

    async def close(self) -> None:
        await self._client.close()


def open_document_store(settings: DocumentSettings, pool: asyncpg.Pool) -> DocumentStore:
    """The configured backend; only `Stores` calls this."""
    if settings.backend == "mongodb":
        return MongoDocumentStore(settings)
    return PostgresDocumentStore(pool)
