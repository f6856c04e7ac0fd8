"""The document store (docs/storage.md): MongoDB, or PostgreSQL JSONB with the same shapes.

Documents are plain dicts addressed by (collection, key); the key is MongoDB's
`_id`. `insert` is idempotent on the key, which is what makes redelivery and
job retries harmless: the second insert of the same alert is a no-op. A document
that would break a unique natural key (schemas/mongo.py) is refused the same way.
The `_many` variants do a whole batch in one round trip (MongoDB: one unordered
bulk write, whose duplicate-key errors are the redelivered documents).

One contract, tested on both backends (tests/test_documents_contract.py):
- filters are equality on top-level fields;
- results come in key order (bytewise) unless `order_by` names a field; `scan` reads a
  whole collection in key order a page at a time, for readers that must not hold it all
  at once (the rules' `device_configs`);
- times are the documents' own: `delete_before` and `order_by="created_at"` go by the
  document's `created_at` field, so a document without one is never removed by age;
- datetimes come back as datetimes from MongoDB (millisecond precision) and as ISO-8601
  text from PostgreSQL; `worker.rules.events.parse_time` reads either;
- `near` finds documents whose GeoJSON `location` is within a distance: MongoDB's
  `$nearSphere` on the 2dsphere index; PostgreSQL, and a MongoDB-protocol server without
  that index (FerretDB refuses it), a bounding box on the coordinates, then the exact
  distance on the sphere MongoDB uses.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg
import orjson
import structlog

from worker.config import DocumentSettings

if TYPE_CHECKING:
    from pymongo import AsyncMongoClient

    from schemas.mongo import MongoIndex

log = structlog.get_logger("worker.stores.documents")

Document = dict[str, Any]
# MongoDB's spherical geometry uses this radius (geoconstants.h): the same here, so both
# backends agree on what is inside a distance.
EARTH_RADIUS_KM = 6378.1
# Fields read as times when ordering on PostgreSQL (JSONB text would order by collation).
TIME_FIELDS = frozenset({"created_at", "updated_at", "timestamp", "generated_at", "fired_at", "resolved_at"})
DUPLICATE_KEY = 11000  # MongoDB's error code
SCAN_PAGE = 500
MONGODB_TIMEOUTS = {"serverSelectionTimeoutMS": 10_000, "socketTimeoutMS": 30_000}


class DocumentStore(Protocol):
    async def insert(self, collection: str, key: str, doc: Document) -> bool:
        """Store `doc` under `key` unless present; True when it was new."""

    async def insert_many(self, collection: str, docs: Mapping[str, Document]) -> set[str]:
        """`insert` for each key → document, in one round trip; the keys that were new."""

    async def upsert(self, collection: str, key: str, doc: Document) -> None: ...

    async def upsert_many(self, collection: str, docs: Mapping[str, Document]) -> None: ...

    async def update(self, collection: str, key: str, changes: Document) -> bool:
        """Set top-level fields of an existing document; False when there is none."""

    async def replace_versioned(
        self, collection: str, key: str, doc: Document, field: str, expected: int
    ) -> bool:
        """Store `doc` under `key` if the stored one's integer `field` is `expected` (a missing
        field, or no document, counts as 0), in one atomic step: of two writers that read the
        same version, one wins and the other gets False."""

    async def update_many(self, collection: str, keys: Collection[str], changes: Document) -> int:
        """`update` of each of `keys` with the same changes; how many documents exist."""

    async def get(self, collection: str, key: str) -> Document | None: ...

    async def get_many(self, collection: str, keys: Collection[str]) -> dict[str, Document]:
        """The documents of those keys that exist, by key."""

    async def find(
        self,
        collection: str,
        where: Document | None = None,
        *,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 100,
    ) -> list[Document]: ...

    def scan(self, collection: str, page: int = SCAN_PAGE) -> AsyncGenerator[Document, None]:
        """Every document of `collection` in key order, `page` documents fetched at a time."""

    async def delete_before(self, collection: str, before: datetime, where: Document | None = None) -> int:
        """Remove documents whose `created_at` is before `before` (and that match `where`)."""

    async def count_per_device(
        self,
        collection: str,
        start: datetime,
        end: datetime,
        *,
        time_field: str = "created_at",
        where: Document | None = None,
    ) -> dict[int, int]:
        """Documents per `device_id` whose `time_field` is in [start, end) and that match `where`."""

    async def near(
        self, collection: str, lon: float, lat: float, km: float, *, limit: int = 100
    ) -> list[tuple[float, Document]]:
        """(distance in km, document) for documents whose `location` point is within `km`
        of (lon, lat), nearest first."""

    async def change_marker(self, collection: str) -> str | None:
        """A value that moves whenever `collection` changes, cheap to read; None when the
        backend has none (the caller then re-reads the collection to find out)."""

    async def ping(self) -> bool:
        """True when the backend answers (for /readyz)."""

    async def close(self) -> None: ...


def distance_km(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Great-circle distance (haversine) on MongoDB's sphere."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    a = (
        math.sin((phi2 - phi1) / 2) ** 2
        + math.cos(phi1) * math.cos(phi2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def bounding_box(lon: float, lat: float, km: float) -> tuple[float, float, list[tuple[float, float]]]:
    """(lat_min, lat_max, longitude ranges) holding every point within `km`: the ranges are
    split at the antimeridian, and span everything when the circle reaches a pole."""
    angle = km / EARTH_RADIUS_KM
    lat_min, lat_max = lat - math.degrees(angle), lat + math.degrees(angle)
    if lat_min <= -90 or lat_max >= 90 or angle >= math.pi / 2:
        return max(lat_min, -90.0), min(lat_max, 90.0), [(-180.0, 180.0)]
    # The widest longitude offset of a spherical cap (its tangent points), not angle/cos(lat).
    spread = math.degrees(math.asin(min(1.0, math.sin(angle) / math.cos(math.radians(lat)))))
    low, high = lon - spread, lon + spread
    if low < -180:
        return lat_min, lat_max, [(low + 360, 180.0), (-180.0, high)]
    if high > 180:
        return lat_min, lat_max, [(low, 180.0), (-180.0, high - 360)]
    return lat_min, lat_max, [(low, high)]


def point_of(doc: Mapping[str, Any]) -> tuple[float, float] | None:
    """(lon, lat) of a document's GeoJSON `location` Point, if it has one."""
    location = doc.get("location")
    if not isinstance(location, dict) or location.get("type") != "Point":
        return None
    coordinates = location.get("coordinates")
    if not isinstance(coordinates, list) or len(coordinates) != 2:
        return None
    return float(coordinates[0]), float(coordinates[1])


def nearest(
    candidates: Iterable[Document], lon: float, lat: float, km: float, limit: int
) -> list[tuple[float, Document]]:
    """(distance, document) of the candidates within `km` of (lon, lat), nearest first (ties by
    key), at most `limit`: what a bounding box's candidates become."""
    found = []
    for doc in candidates:
        point = point_of(doc)
        if point is not None and (distance := distance_km(lon, lat, *point)) <= km:
            found.append((distance, doc))
    found.sort(key=lambda item: (item[0], item[1]["_id"]))
    return found[:limit]


def _json_default(value: Any) -> Any:
    raise TypeError(f"cannot store {type(value).__name__} in a document")


def _dumps(doc: Mapping[str, Any]) -> str:
    # Naive datetimes as UTC, as MongoDB reads them: every stored time carries its offset,
    # which is what makes `iotflow_doc_time` immutable (schemas/sql/0017_document_indexes.sql).
    return orjson.dumps(doc, default=_json_default, option=orjson.OPT_NAIVE_UTC).decode()


def _time(field: str) -> str:
    """The SQL expression of a document's time field (indexed for `created_at`)."""
    return f"iotflow_doc_time(doc->>'{field}')"


class PostgresDocumentStore:
    """Documents in the `documents` JSONB table; datetimes are stored as ISO-8601 text."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def insert(self, collection: str, key: str, doc: Document) -> bool:
        return key in await self.insert_many(collection, {key: doc})

    async def insert_many(self, collection: str, docs: Mapping[str, Document]) -> set[str]:
        if not docs:
            return set()
        # No conflict target: a natural key's unique index refuses a document as quietly as
        # the primary key does, as MongoDB's unordered bulk write does.
        rows = await self._pool.fetch(
            "INSERT INTO documents (collection, key, doc) "
            "SELECT $1, k, d::jsonb FROM unnest($2::text[], $3::text[]) AS t(k, d) "
            "ON CONFLICT DO NOTHING RETURNING key",
            collection,
            list(docs),
            [_dumps(doc) for doc in docs.values()],
        )
        return {row["key"] for row in rows}

    async def upsert(self, collection: str, key: str, doc: Document) -> None:
        await self.upsert_many(collection, {key: doc})

    async def upsert_many(self, collection: str, docs: Mapping[str, Document]) -> None:
        if not docs:
            return
        await self._pool.execute(
            "INSERT INTO documents (collection, key, doc) "
            "SELECT $1, k, d::jsonb FROM unnest($2::text[], $3::text[]) AS t(k, d) "
            "ON CONFLICT (collection, key) DO UPDATE SET doc = excluded.doc, updated_at = now()",
            collection,
            list(docs),
            [_dumps(doc) for doc in docs.values()],
        )

    async def update(self, collection: str, key: str, changes: Document) -> bool:
        status = await self._pool.execute(
            "UPDATE documents SET doc = doc || $3::jsonb, updated_at = now() "
            "WHERE collection = $1 AND key = $2",
            collection,
            key,
            _dumps(changes),
        )
        return bool(status.endswith(" 1"))

    async def replace_versioned(
        self, collection: str, key: str, doc: Document, field: str, expected: int
    ) -> bool:
        # One statement: the row lock taken by the update (or the insert's conflict) makes a
        # second writer re-check the version the first one wrote.
        stored = "coalesce((documents.doc ->> $4)::bigint, 0)"
        if expected == 0:
            sql = (
                "INSERT INTO documents (collection, key, doc) VALUES ($1, $2, $3::jsonb) "
                "ON CONFLICT (collection, key) DO UPDATE SET doc = excluded.doc, updated_at = now() "
                f"WHERE {stored} = $5 RETURNING 1"
            )
        else:
            sql = (
                "UPDATE documents SET doc = $3::jsonb, updated_at = now() "
                f"WHERE collection = $1 AND key = $2 AND {stored} = $5 RETURNING 1"
            )
        return await self._pool.fetchval(sql, collection, key, _dumps(doc), field, expected) is not None

    async def update_many(self, collection: str, keys: Collection[str], changes: Document) -> int:
        if not keys:
            return 0
        status = await self._pool.execute(
            "UPDATE documents SET doc = doc || $3::jsonb, updated_at = now() "
            "WHERE collection = $1 AND key = ANY($2::text[])",
            collection,
            list(keys),
            _dumps(changes),
        )
        return int(status.split()[-1])

    async def get(self, collection: str, key: str) -> Document | None:
        raw = await self._pool.fetchval(
            "SELECT doc FROM documents WHERE collection = $1 AND key = $2", collection, key
        )
        return None if raw is None else {"_id": key, **orjson.loads(raw)}

    async def get_many(self, collection: str, keys: Collection[str]) -> dict[str, Document]:
        if not keys:
            return {}
        rows = await self._pool.fetch(
            "SELECT key, doc FROM documents WHERE collection = $1 AND key = ANY($2::text[])",
            collection,
            list(keys),
        )
        return {row["key"]: {"_id": row["key"], **orjson.loads(row["doc"])} for row in rows}

    async def find(
        self,
        collection: str,
        where: Document | None = None,
        *,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 100,
    ) -> list[Document]:
        args: list[Any] = [collection, _dumps(where or {}), limit]
        direction = "DESC" if descending else "ASC"
        # Ties (and no order_by) go by key, bytewise as MongoDB compares `_id` strings.
        order = f'key COLLATE "C" {direction}'
        # MongoDB puts missing fields (null) first going up, last going down.
        nulls = "NULLS LAST" if descending else "NULLS FIRST"
        if order_by in TIME_FIELDS:
            order = f"{_time(order_by)} {direction} {nulls}, {order}"
        elif order_by:
            args.append(order_by)
            order = f"doc->$4 {direction} {nulls}, {order}"
        rows = await self._pool.fetch(
            f"SELECT key, doc FROM documents WHERE collection = $1 AND doc @> $2::jsonb "
            f"ORDER BY {order} LIMIT $3",
            *args,
        )
        return [{"_id": row["key"], **orjson.loads(row["doc"])} for row in rows]

    async def scan(self, collection: str, page: int = SCAN_PAGE) -> AsyncGenerator[Document, None]:
        # A cursor (it needs a transaction) rather than pages of LIMIT/OFFSET: one snapshot,
        # one sort, and never more than `page` rows on the client.
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            rows = conn.cursor(
                'SELECT key, doc FROM documents WHERE collection = $1 ORDER BY key COLLATE "C"',
                collection,
                prefetch=page,
            )
            async for row in rows:
                yield {"_id": row["key"], **orjson.loads(row["doc"])}

    async def delete_before(self, collection: str, before: datetime, where: Document | None = None) -> int:
        status = await self._pool.execute(
            f"DELETE FROM documents WHERE collection = $1 AND {_time('created_at')} < $2 "
            "AND doc @> $3::jsonb",
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
        where: Document | None = None,
    ) -> dict[int, int]:
        rows = await self._pool.fetch(
            "SELECT (doc->>'device_id')::integer AS device_id, count(*) AS n FROM documents "
            "WHERE collection = $1 AND doc @> $2::jsonb AND doc ? 'device_id' "
            "AND iotflow_doc_time(doc->>$3) >= $4 AND iotflow_doc_time(doc->>$3) < $5 GROUP BY 1",
            collection,
            _dumps(where or {}),
            time_field,
            start,
            end,
        )
        return {row["device_id"]: row["n"] for row in rows}

    async def near(
        self, collection: str, lon: float, lat: float, km: float, *, limit: int = 100
    ) -> list[tuple[float, Document]]:
        lat_min, lat_max, lon_ranges = bounding_box(lon, lat, km)
        (west1, east1), (west2, east2) = (lon_ranges * 2)[:2]
        # The index documents_location holds these expressions (0017_document_indexes.sql).
        rows = await self._pool.fetch(
            "SELECT key, doc FROM documents WHERE collection = $1 "
            "AND (doc#>>'{location,coordinates,1}')::float8 BETWEEN $2 AND $3 "
            "AND ((doc#>>'{location,coordinates,0}')::float8 BETWEEN $4 AND $5 "
            "OR (doc#>>'{location,coordinates,0}')::float8 BETWEEN $6 AND $7)",
            collection,
            lat_min,
            lat_max,
            west1,
            east1,
            west2,
            east2,
        )
        candidates = ({"_id": row["key"], **orjson.loads(row["doc"])} for row in rows)
        return nearest(candidates, lon, lat, km, limit)

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

        # Timeouts so a hung server surfaces as an error the callers retry, not as silence;
        # the URL's own options win (PyMongo lets keyword arguments override the URL's).
        url = settings.mongodb_url
        timeouts: dict[str, Any] = {k: v for k, v in MONGODB_TIMEOUTS.items() if k.lower() not in url.lower()}
        self._client: AsyncMongoClient[Document] = AsyncMongoClient(url, tz_aware=True, **timeouts)
        self._db = self._client[settings.mongodb_database]

    async def insert(self, collection: str, key: str, doc: Document) -> bool:
        return key in await self.insert_many(collection, {key: doc})

    async def insert_many(self, collection: str, docs: Mapping[str, Document]) -> set[str]:
        from pymongo import InsertOne
        from pymongo.errors import BulkWriteError

        if not docs:
            return set()
        keys = list(docs)
        try:
            await self._db[collection].bulk_write(
                [InsertOne({**doc, "_id": key}) for key, doc in docs.items()], ordered=False
            )
        except BulkWriteError as exc:
            new = inserted_despite(keys, exc.details)
            if new is None:
                raise
            return new
        return set(keys)

    async def upsert(self, collection: str, key: str, doc: Document) -> None:
        await self._db[collection].replace_one({"_id": key}, {**doc, "_id": key}, upsert=True)

    async def upsert_many(self, collection: str, docs: Mapping[str, Document]) -> None:
        from pymongo import ReplaceOne

        if docs:
            await self._db[collection].bulk_write(
                [ReplaceOne({"_id": key}, {**doc, "_id": key}, upsert=True) for key, doc in docs.items()],
                ordered=False,
            )

    async def update(self, collection: str, key: str, changes: Document) -> bool:
        result = await self._db[collection].update_one({"_id": key}, {"$set": changes})
        return bool(result.matched_count)

    async def replace_versioned(
        self, collection: str, key: str, doc: Document, field: str, expected: int
    ) -> bool:
        from pymongo.errors import DuplicateKeyError

        version: Document = {field: expected}
        if expected == 0:  # no document yet: the upsert inserts; one already there refuses it
            version = {"$or": [{field: 0}, {field: None}]}
        try:
            result = await self._db[collection].replace_one(
                {"_id": key, **version}, {**doc, "_id": key}, upsert=expected == 0
            )
        except DuplicateKeyError:  # another writer's document is there, at another version
            return False
        return bool(result.matched_count or result.upserted_id is not None)

    async def update_many(self, collection: str, keys: Collection[str], changes: Document) -> int:
        if not keys:
            return 0
        result = await self._db[collection].update_many({"_id": {"$in": list(keys)}}, {"$set": changes})
        return int(result.matched_count)

    async def get(self, collection: str, key: str) -> Document | None:
        return await self._db[collection].find_one({"_id": key})

    async def get_many(self, collection: str, keys: Collection[str]) -> dict[str, Document]:
        if not keys:
            return {}
        cursor = self._db[collection].find({"_id": {"$in": list(keys)}})
        return {doc["_id"]: doc async for doc in cursor}

    async def find(
        self,
        collection: str,
        where: Document | None = None,
        *,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 100,
    ) -> list[Document]:
        direction = -1 if descending else 1
        order = [(order_by, direction)] if order_by and order_by != "_id" else []
        cursor = self._db[collection].find(where or {}).sort([*order, ("_id", direction)]).limit(limit)
        return [doc async for doc in cursor]

    async def scan(self, collection: str, page: int = SCAN_PAGE) -> AsyncGenerator[Document, None]:
        async for doc in self._db[collection].find({}).sort("_id", 1).batch_size(page):
            yield doc

    async def delete_before(self, collection: str, before: datetime, where: Document | None = None) -> int:
        result = await self._db[collection].delete_many({**(where or {}), "created_at": {"$lt": before}})
        return int(result.deleted_count)

    async def count_per_device(
        self,
        collection: str,
        start: datetime,
        end: datetime,
        *,
        time_field: str = "created_at",
        where: Document | None = None,
    ) -> dict[int, int]:
        match = {**(where or {}), time_field: {"$gte": start, "$lt": end}}
        pipeline = [{"$match": match}, {"$group": {"_id": "$device_id", "n": {"$sum": 1}}}]
        cursor = await self._db[collection].aggregate(pipeline)
        return {int(doc["_id"]): int(doc["n"]) async for doc in cursor if doc["_id"] is not None}

    async def near(
        self, collection: str, lon: float, lat: float, km: float, *, limit: int = 100
    ) -> list[tuple[float, Document]]:
        if not await self.has_geo_index(collection):
            return await self._near_in_box(collection, lon, lat, km, limit)
        # $nearSphere needs the 2dsphere index (schemas/mongo.py) and returns nearest first;
        # $maxDistance is in metres for a GeoJSON point.
        query = {
            "location": {
                "$nearSphere": {
                    "$geometry": {"type": "Point", "coordinates": [lon, lat]},
                    "$maxDistance": km * 1000,
                }
            }
        }
        found = []
        async for doc in self._db[collection].find(query).limit(limit):
            point = point_of(doc)
            if point is not None:
                found.append((distance_km(lon, lat, *point), doc))
        return found

    async def _near_in_box(
        self, collection: str, lon: float, lat: float, km: float, limit: int
    ) -> list[tuple[float, Document]]:
        """`near` without a 2dsphere index (a server that refused it, as FerretDB does): the
        PostgreSQL backend's way, candidates in the bounding box, then the exact distance.
        Asked per call rather than remembered: a later `migrate` may add the index, and one
        `listIndexes` is nothing beside an interactive query."""
        lat_min, lat_max, lon_ranges = bounding_box(lon, lat, km)
        query = {
            "location.type": "Point",
            "location.coordinates.1": {"$gte": lat_min, "$lte": lat_max},
            "$or": [{"location.coordinates.0": {"$gte": west, "$lte": east}} for west, east in lon_ranges],
        }
        return nearest([doc async for doc in self._db[collection].find(query)], lon, lat, km, limit)

    async def change_marker(self, collection: str) -> str | None:
        return None  # no cheap "last changed" per collection; a change stream would be the way

    async def apply_indexes(
        self, indexes: Sequence[MongoIndex], unwanted: Collection[tuple[str, str]]
    ) -> list[MongoIndex]:
        """Make the collections' indexes what `indexes` says (`iotflow migrate`): create the
        missing ones, change a TTL in place (`collMod`), rebuild one whose definition changed,
        and drop the `unwanted` (collection, name) pairs that exist (TTLs turned off).

        An index the server refuses (`refused_by_server`) is not an error: one warning line
        says what was refused, the server's reason and what the daemon does instead; its
        fallback index, if it names one, is created in its place. Returns the refused ones."""
        from pymongo.errors import OperationFailure

        collections = {index.collection for index in indexes} | {c for c, _ in unwanted}
        existing = {c: await self.indexes(c) for c in collections}
        for collection, name in unwanted:
            if name in existing[collection]:
                await self._db[collection].drop_index(name)
                log.info("migrate.mongodb_index_dropped", collection=collection, index=name)
        refused = []
        for index in indexes:
            have = existing[index.collection]
            try:
                await self._ensure_index(index, have.get(index.name))
            except OperationFailure as exc:
                if not refused_by_server(exc):
                    raise
                refused.append(index)
                log.warning(
                    "migrate.mongodb_index_refused",
                    collection=index.collection,
                    index=index.name,
                    reason=" ".join(str(exc.details.get("errmsg") if exc.details else exc).split()),
                    code=exc.code,
                    instead=index.instead,
                )
                if index.fallback is not None:
                    await self._ensure_index(index.fallback, have.get(index.fallback.name))
                continue
            if index.fallback is not None and index.fallback.name in have:
                # The server took the index itself now (an upgrade): its stand-in goes.
                await self._db[index.collection].drop_index(index.fallback.name)
                log.info(
                    "migrate.mongodb_index_dropped", collection=index.collection, index=index.fallback.name
                )
        return refused

    async def _ensure_index(self, index: MongoIndex, have: Document | None) -> None:
        from pymongo import IndexModel

        if have is not None and same_definition(have, index):
            if have.get("expireAfterSeconds") != index.expire_after_s:
                await self._db.command(
                    "collMod",
                    index.collection,
                    index={"name": index.name, "expireAfterSeconds": index.expire_after_s},
                )
                log.info("migrate.mongodb_ttl_changed", index=index.name, seconds=index.expire_after_s)
            return
        if have is not None:  # same name, other keys or options: ours, so rebuild it
            await self._db[index.collection].drop_index(index.name)
        options: dict[str, Any] = {"name": index.name}
        if index.unique:
            options["unique"] = True
        if index.partial is not None:
            options["partialFilterExpression"] = index.partial
        if index.expire_after_s is not None:
            options["expireAfterSeconds"] = index.expire_after_s
        await self._db[index.collection].create_indexes([IndexModel(list(index.keys), **options)])
        log.info("migrate.mongodb_index", collection=index.collection, index=index.name)

    async def has_geo_index(self, collection: str) -> bool:
        """Whether `location` has a 2dsphere index, which `$nearSphere` needs."""
        return any(
            doc["key"].get("location") == "2dsphere" for doc in (await self.indexes(collection)).values()
        )

    async def server_info(self) -> Document:
        """`buildInfo`: the version, and `ferretdbVersion` on FerretDB (for migrate's summary line)."""
        return dict(await self._client.admin.command("buildInfo"))

    async def indexes(self, collection: str) -> dict[str, Document]:
        """The collection's indexes as `listIndexes` describes them, by name."""
        cursor = await self._db[collection].list_indexes()
        return {str(doc["name"]): dict(doc) async for doc in cursor}

    async def drop_database(self) -> None:
        """Remove the whole database (tests' throwaway databases)."""
        await self._client.drop_database(self._db.name)

    async def ping(self) -> bool:
        await self._client.admin.command("ping")
        return True

    async def close(self) -> None:
        await self._client.close()


def inserted_despite(keys: Sequence[str], details: Mapping[str, Any]) -> set[str] | None:
    """The keys an unordered bulk insert stored, from its BulkWriteError's `details`, when
    every error is a duplicate key (a document stored before: a redelivery); None when
    any other error happened (the caller raises, and the batch is retried)."""
    errors = details.get("writeErrors", [])
    if details.get("writeConcernErrors") or any(error.get("code") != DUPLICATE_KEY for error in errors):
        return None
    return set(keys) - {keys[error["index"]] for error in errors}


# What a MongoDB-protocol server answers for an index kind or command it lacks. The answer,
# not the server's name, decides: FerretDB 2 (on DocumentDB) has TTL and partial indexes that
# 1.x refuses, and other servers (DocumentDB, Cosmos DB) refuse other kinds; asking each
# index is exact for whatever server is there, and a real MongoDB never gives these codes
# for our definitions (a mistake in them, e.g. conflicting options, is still an error).
NOT_IMPLEMENTED = 238  # FerretDB: partialFilterExpression, expireAfterSeconds, collMod
COMMAND_NOT_FOUND = 59
COMMAND_NOT_SUPPORTED = 115
INDEX_NOT_FOUND = 27  # FerretDB 1.24's answer to an index type it lacks ("2dsphere")
REFUSED_CODES = frozenset({NOT_IMPLEMENTED, COMMAND_NOT_FOUND, COMMAND_NOT_SUPPORTED, INDEX_NOT_FOUND})


def refused_by_server(exc: Exception) -> bool:
    """Whether `exc` (a PyMongo OperationFailure) is the server saying it lacks the feature."""
    return getattr(exc, "code", None) in REFUSED_CODES


def same_definition(have: Mapping[str, Any], index: MongoIndex) -> bool:
    """Whether an existing index (`listIndexes` form) has the wanted keys and options; the
    TTL's length is not part of it (collMod changes that in place)."""
    keys = [(name, int(order) if isinstance(order, float) else order) for name, order in have["key"].items()]
    return (
        keys == list(index.keys)
        and bool(have.get("unique")) == index.unique
        and have.get("partialFilterExpression") == index.partial
        and ("expireAfterSeconds" in have) == (index.expire_after_s is not None)
    )


def open_document_store(settings: DocumentSettings, pool: asyncpg.Pool) -> DocumentStore:
    """The configured backend; only `Stores` calls this."""
    if settings.backend == "mongodb":
        return MongoDocumentStore(settings)
    return PostgresDocumentStore(pool)
