"""The document store's contract, one suite for both backends: PostgreSQL JSONB always,
and the MongoDB backend against IOTFLOW_TEST_MONGODB_URL or the suite's own FerretDB 1.24
(docs/storage.md, "MongoDB or FerretDB", says how to run it and what FerretDB refuses).

Rules, jobs and the CLI go through `DocumentStore` only, so what passes here on both
backends behaves the same on either: write and read back, redelivery, natural keys,
retention by the documents' own times, the indexes and TTLs `iotflow migrate` creates,
device metadata and the near query.
"""

from __future__ import annotations

import math
import random
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from jobs.context import JobResources
from jobs.retention import apply_retention
from schemas.mongo import DAY_S, EVENT_LOGS_TTL, RESOLVED_ALERTS_TTL, mongo_indexes
from worker.cli.devices import MetadataChange, devices_near, get_metadata, set_metadata
from worker.config import Settings
from worker.rules.events import parse_time
from worker.stores import Stores, open_stores
from worker.stores.devices import UnknownDevice
from worker.stores.documents import (
    EARTH_RADIUS_KM,
    DocumentStore,
    MongoDocumentStore,
    bounding_box,
    distance_km,
    inserted_despite,
    same_definition,
)
from worker.stores.migrate import migrate_documents, server_name
from worker.tools.servers import FerretDBServer

from .helpers import Cli

# What FerretDB 1.24 refuses of `iotflow migrate`'s indexes (partial, TTL, 2dsphere).
FERRETDB_REFUSES = {"event_logs_pending", EVENT_LOGS_TTL, RESOLVED_ALERTS_TTL, "device_metadata_location"}


async def _on_ferretdb(docs: DocumentStore) -> bool:
    """Whether the MongoDB backend's server is FerretDB: what a test expects of it (the daemon
    itself goes by the server's answers)."""
    return isinstance(docs, MongoDocumentStore) and "ferretdbVersion" in await docs.server_info()


@pytest.fixture(params=["postgres", "mongodb"])
async def backend_settings(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Settings]:
    """The test's settings with `documents.backend` set to the parameter, migrated."""
    if request.param == "postgres":
        yield settings
        return
    documents = replace(
        settings.documents,
        backend="mongodb",
        mongodb_url=request.getfixturevalue("mongodb_url"),
        mongodb_database=f"iotflow_test_{uuid.uuid4().hex[:10]}",
    )
    mongo = replace(settings, documents=documents)
    assert await migrate_documents(mongo)
    yield mongo
    store = MongoDocumentStore(documents)
    try:
        await store.drop_database()
    finally:
        await store.close()


@pytest.fixture
async def docs_stores(backend_settings: Settings) -> AsyncIterator[Stores]:
    async with open_stores(backend_settings) as opened:
        yield opened


def _plain(value: Any) -> Any:
    """Times as UTC datetimes to the millisecond (MongoDB's precision), whatever the backend."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, str | datetime):
        try:
            at = parse_time(value)
        except ValueError:
            return value
        assert at is not None
        return at.astimezone(UTC).replace(microsecond=at.microsecond // 1000 * 1000)
    return value


# --- write, read back, redelivery --------------------------------------------------------------------


async def test_a_document_reads_back_as_written(docs_stores: Stores) -> None:
    docs = docs_stores.documents
    at = datetime(2026, 11, 20, 5, 13, 20, 123456, tzinfo=UTC)
    alert = {
        "device_id": 7,
        "user_id": None,
        "alert_type": "threshold",
        "severity": "high",
        "details": {"measurement": "temperature", "value": 31.5, "threshold": 30, "unit": "°C"},
        "status": "active",
        "acknowledged": False,
        "created_at": at,
        "resolved_at": None,
        "tags": ["a", "b"],
    }
    assert await docs.insert("alerts", "r1:7:1", alert) is True
    stored = await docs.get("alerts", "r1:7:1")
    assert stored is not None and stored.pop("_id") == "r1:7:1"
    assert _plain(stored) == _plain(alert)
    (found,) = await docs.find("alerts", {"device_id": 7, "status": "active"})
    assert _plain(found) == _plain({**alert, "_id": "r1:7:1"})
    assert await docs.get("alerts", "absent") is None
    assert set(await docs.get_many("alerts", ["r1:7:1", "absent"])) == {"r1:7:1"}


async def test_redelivery_is_harmless(docs_stores: Stores) -> None:
    docs = docs_stores.documents
    batch = {f"e{n}": {"device_id": n, "event_type": "alert.fired", "n": n} for n in range(3)}
    assert await docs.insert_many("event_logs", batch) == set(batch)
    again = {**{key: {**doc, "n": -1} for key, doc in batch.items()}, "e3": {"device_id": 3, "n": 3}}
    assert await docs.insert_many("event_logs", again) == {"e3"}  # the rest: stored before
    assert await docs.insert("event_logs", "e0", {"n": -1}) is False
    stored = await docs.find("event_logs", limit=10)
    assert [(doc["_id"], doc["n"]) for doc in stored] == [("e0", 0), ("e1", 1), ("e2", 2), ("e3", 3)]
    assert await docs.insert_many("event_logs", {}) == set()


async def test_a_natural_key_is_unique_whoever_writes(docs_stores: Stores) -> None:
    docs = docs_stores.documents
    assert await docs.insert("device_metadata", "7", {"device_id": 7, "tags": []}) is True
    assert await docs.insert_many("device_metadata", {"other": {"device_id": 7}, "8": {"device_id": 8}}) == {
        "8"
    }
    assert await docs.get("device_metadata", "other") is None


async def test_update_upsert_and_find(docs_stores: Stores) -> None:
    docs = docs_stores.documents
    await docs.upsert_many("event_logs", {f"e{n}": {"device_id": n % 2, "n": n} for n in (2, 0, 1)})
    assert await docs.update("event_logs", "e1", {"seen": True}) is True
    assert await docs.update("event_logs", "absent", {"seen": True}) is False
    assert await docs.update_many("event_logs", ["e0", "e2", "absent"], {"notified": True}) == 2
    found = await docs.find("event_logs", {"device_id": 0}, order_by="n", descending=True)
    assert [d["n"] for d in found] == [2, 0]
    assert [d["_id"] for d in await docs.find("event_logs")] == ["e0", "e1", "e2"]  # key order
    assert [d["_id"] for d in await docs.find("event_logs", {"notified": True})] == ["e0", "e2"]
    await docs.upsert("event_logs", "e1", {"device_id": 1, "n": 10})
    assert (await docs.get("event_logs", "e1") or {}).get("seen") is None  # replaced whole


async def test_replace_versioned_writes_only_over_the_version_named(docs_stores: Stores) -> None:
    docs = docs_stores.documents
    assert (
        await docs.replace_versioned("device_configs", "d:1", {"v": 1, "n": "a"}, "v", 0) is True
    )  # none yet
    assert await docs.replace_versioned("device_configs", "d:1", {"v": 1, "n": "b"}, "v", 0) is False
    assert await docs.replace_versioned("device_configs", "d:1", {"v": 2, "n": "c"}, "v", 2) is False
    assert await docs.replace_versioned("device_configs", "d:1", {"v": 2, "n": "d"}, "v", 1) is True
    assert (await docs.get("device_configs", "d:1") or {}).get("n") == "d"
    await docs.upsert("device_configs", "d:2", {"n": "no version yet"})  # counts as 0
    assert await docs.replace_versioned("device_configs", "d:2", {"v": 1}, "v", 1) is False
    assert await docs.replace_versioned("device_configs", "d:2", {"v": 1}, "v", 0) is True
    assert await docs.replace_versioned("device_configs", "absent", {"v": 4}, "v", 3) is False
    assert await docs.get("device_configs", "absent") is None


async def test_scan_reads_the_whole_collection_in_key_order_a_page_at_a_time(docs_stores: Stores) -> None:
    docs = docs_stores.documents
    await docs.upsert_many("device_configs", {f"device:{n}": {"device_id": n} for n in (3, 10, 1, 2, 20)})
    await docs.upsert("event_logs", "other", {"n": 0})
    scanned = [doc async for doc in docs.scan("device_configs", page=2)]
    assert [doc["_id"] for doc in scanned] == ["device:1", "device:10", "device:2", "device:20", "device:3"]
    assert scanned[0] == {"_id": "device:1", "device_id": 1}
    assert [doc async for doc in docs.scan("alerts")] == []


async def test_newest_first_goes_by_the_documents_created_at(docs_stores: Stores) -> None:
    docs = docs_stores.documents
    base = datetime(2026, 11, 20, tzinfo=UTC)
    # Stored in another order than their times, one with an offset other than UTC's.
    times = {"b": base + timedelta(hours=1), "c": base, "a": (base + timedelta(hours=2)).astimezone()}
    for key, at in times.items():
        await docs.insert("alerts", key, {"device_id": 1, "created_at": at})
    newest = await docs.find("alerts", order_by="created_at", descending=True)
    assert [d["_id"] for d in newest] == ["a", "b", "c"]
    assert [d["_id"] for d in await docs.find("alerts", order_by="created_at", limit=2)] == ["c", "b"]


# --- retention, counts --------------------------------------------------------------------------------


async def test_delete_before_goes_by_the_documents_created_at(docs_stores: Stores) -> None:
    docs = docs_stores.documents
    now = datetime.now(UTC)
    await docs.insert("event_logs", "old", {"created_at": now - timedelta(days=3)})
    await docs.insert("event_logs", "new", {"created_at": now - timedelta(hours=1)})
    await docs.insert("event_logs", "timeless", {"device_id": 1})  # never removed by age
    assert await docs.delete_before("event_logs", now - timedelta(days=1)) == 1
    assert [d["_id"] for d in await docs.find("event_logs")] == ["new", "timeless"]


async def test_delete_before_can_filter(docs_stores: Stores) -> None:
    docs = docs_stores.documents
    old = datetime.now(UTC) - timedelta(days=3)
    await docs.insert("alerts", "r", {"created_at": old, "status": "resolved"})
    await docs.insert("alerts", "a", {"created_at": old, "status": "active"})
    deleted = await docs.delete_before("alerts", datetime.now(UTC), {"status": "resolved"})
    assert deleted == 1
    assert await docs.get("alerts", "r") is None and await docs.get("alerts", "a") is not None


async def test_count_per_device_in_a_time_range(docs_stores: Stores) -> None:
    docs = docs_stores.documents
    base = datetime(2026, 11, 20, tzinfo=UTC)
    for n, (device, hours) in enumerate([(1, 1), (1, 5), (2, 2), (1, 30), (3, 3)]):
        status = "resolved" if n == 1 else "active"
        await docs.insert(
            "alerts",
            f"a{n}",
            {"device_id": device, "created_at": base + timedelta(hours=hours), "status": status},
        )
    counts = await docs.count_per_device("alerts", base, base + timedelta(days=1))
    assert counts == {1: 2, 2: 1, 3: 1}
    resolved = await docs.count_per_device(
        "alerts", base, base + timedelta(days=1), where={"status": "resolved"}
    )
    assert resolved == {1: 1}


async def test_the_retention_job_expires_documents_by_their_own_times(docs_stores: Stores) -> None:
    """Expiry on every backend: the job deletes what is past its kind's age, by `created_at`;
    on a server without TTL indexes (PostgreSQL, FerretDB) it is the only expiry."""
    docs = docs_stores.documents
    jobs = docs_stores.settings.jobs
    now = datetime(2026, 11, 20, 12, tzinfo=UTC)
    past_logs = now - timedelta(days=jobs.retention_event_logs_days, seconds=1)
    past_alerts = now - timedelta(days=jobs.retention_resolved_alerts_days, seconds=1)
    await docs.insert_many(
        "event_logs",
        {"old": {"created_at": past_logs}, "new": {"created_at": now - timedelta(days=1)}, "timeless": {}},
    )
    await docs.insert_many(
        "alerts",
        {
            "resolved-old": {"status": "resolved", "created_at": past_alerts},
            "active-old": {"status": "active", "created_at": past_alerts},
            "resolved-new": {"status": "resolved", "created_at": now - timedelta(days=1)},
        },
    )
    removed = {item.kind: item.rows for item in await apply_retention(JobResources.of(docs_stores), now)}
    assert removed["event_logs"] == 1 and removed["resolved_alerts"] == 1
    assert [d["_id"] for d in await docs.find("event_logs")] == ["new", "timeless"]
    assert [d["_id"] for d in await docs.find("alerts")] == ["active-old", "resolved-new"]
    if await _on_ferretdb(docs):
        assert isinstance(docs, MongoDocumentStore)
        for collection in ("event_logs", "alerts"):  # nothing else expires them there
            assert not any("expireAfterSeconds" in ix for ix in (await docs.indexes(collection)).values())


# --- indexes and TTLs ---------------------------------------------------------------------------------


async def test_the_indexes_are_present(docs_stores: Stores) -> None:
    settings = docs_stores.settings
    wanted = mongo_indexes(
        settings.jobs.retention_event_logs_days, settings.jobs.retention_resolved_alerts_days
    )
    docs = docs_stores.documents
    if isinstance(docs, MongoDocumentStore):
        refused = FERRETDB_REFUSES if await _on_ferretdb(docs) else set()
        for index in wanted:
            have = await docs.indexes(index.collection)
            if index.name in refused:  # absent, and its stand-in there instead
                assert index.name not in have and index.instead, index
                if index.fallback is not None:
                    assert same_definition(have[index.fallback.name], index.fallback)
                continue
            assert index.name in have and same_definition(have[index.name], index), (index, have)
            if index.fallback is not None:
                assert index.fallback.name not in have  # only where the index itself is refused
        return
    names = {
        row["indexname"]
        for row in await docs_stores.postgres.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND tablename = 'documents'",
            settings.postgres.schema,
        )
    }
    assert names >= {
        "documents_pkey",  # (collection, key): the `_id`
        "documents_doc",  # containment filters
        "documents_doc_created",  # retention and newest first, by the document's created_at
        "documents_analytics_report",
        "documents_user_preferences_user",
        "documents_device_metadata_device",
        "documents_location",  # the near query's bounding box
    }
    assert "documents_created" not in names  # the row's insert time: not what anything goes by


async def test_ttl_follows_the_retention_settings(docs_stores: Stores) -> None:
    """MongoDB expires by itself what the retention job removes (the same field and cutoff);
    PostgreSQL has no TTL: the retention job's delete is served by the created_at index."""
    settings = docs_stores.settings
    docs = docs_stores.documents
    if not isinstance(docs, MongoDocumentStore):
        plan = await docs_stores.postgres.fetch(
            "EXPLAIN DELETE FROM documents WHERE collection = 'event_logs' "
            "AND iotflow_doc_time(doc->>'created_at') < now()"
        )
        assert "documents_doc_created" in " ".join(row[0] for row in plan)
        return
    if await _on_ferretdb(docs):
        pytest.skip(
            "needs a real mongod: FerretDB 1.24 refuses TTL indexes (its expiry is the retention "
            "job's, test_the_retention_job_expires_documents_by_their_own_times)"
        )

    async def ttl(collection: str, name: str) -> int | None:
        have = (await docs.indexes(collection)).get(name)
        return None if have is None else int(have["expireAfterSeconds"])

    assert await ttl("event_logs", EVENT_LOGS_TTL) == settings.jobs.retention_event_logs_days * DAY_S
    resolved = (await docs.indexes("alerts"))[RESOLVED_ALERTS_TTL]
    assert resolved["partialFilterExpression"] == {"status": "resolved"}
    assert resolved["expireAfterSeconds"] == settings.jobs.retention_resolved_alerts_days * DAY_S

    changed = replace(settings, jobs=replace(settings.jobs, retention_event_logs_days=7))
    assert await migrate_documents(changed)
    assert await ttl("event_logs", EVENT_LOGS_TTL) == 7 * DAY_S
    forever = replace(settings, jobs=replace(settings.jobs, retention_resolved_alerts_days=0))
    assert await migrate_documents(forever)
    assert await ttl("alerts", RESOLVED_ALERTS_TTL) is None
    assert await migrate_documents(settings)  # and back, idempotent
    assert await ttl("alerts", RESOLVED_ALERTS_TTL) == settings.jobs.retention_resolved_alerts_days * DAY_S


# --- device metadata and near -------------------------------------------------------------------------

BERLIN = (13.405, 52.52)
POTSDAM = (13.064, 52.391)  # 27.2 km from Berlin on MongoDB's sphere (radius 6378.1 km)
HAMBURG = (9.993, 53.551)  # 255 km


async def _fleet(pg: asyncpg.Pool) -> list[int]:
    return [row["id"] for row in await pg.fetch("SELECT id FROM devices ORDER BY id")]


async def test_device_metadata_set_and_get(docs_stores: Stores) -> None:
    device = (await _fleet(docs_stores.postgres))[0]
    first = MetadataChange(
        tags=["site=north", "roof"], location=BERLIN, fields={"floor": 3}, note="installed"
    )
    await set_metadata(docs_stores, str(device), first)
    second = MetadataChange(tags=["site=south"], untags=["roof"], fields={"owner": "ops"})
    await set_metadata(docs_stores, str(device), second)
    doc = _plain(await get_metadata(docs_stores, str(device)))
    assert doc["device_id"] == device
    assert doc["tags"] == ["site=south"]
    assert doc["location"] == {"type": "Point", "coordinates": list(BERLIN)}
    assert doc["custom_fields"] == {"floor": 3, "owner": "ops"}
    assert [note["text"] for note in doc["notes"]] == ["installed"]
    assert doc["created_at"] <= doc["updated_at"]
    by_key = await docs_stores.postgres.fetchval("SELECT device_key FROM devices WHERE id = $1", device)
    assert _plain(await get_metadata(docs_stores, by_key)) == doc
    with pytest.raises(UnknownDevice, match="unknown device 999999"):
        await get_metadata(docs_stores, "999999")


async def test_near_finds_devices_within_the_distance_nearest_first(docs_stores: Stores) -> None:
    ids = await _fleet(docs_stores.postgres)
    places = {
        ids[0]: BERLIN,
        ids[1]: POTSDAM,
        ids[2]: HAMBURG,
        ids[3]: (179.9, 0.0),  # across the antimeridian from (-179.9, 0)
        ids[4]: (0.0, 89.9),  # across the pole from (180, 89.9)
    }
    for device, place in places.items():
        await set_metadata(docs_stores, str(device), MetadataChange(location=place))
    await set_metadata(docs_stores, str(ids[5]), MetadataChange(tags=["nowhere"]))  # no location

    near_berlin = await devices_near(docs_stores, *BERLIN, km=30)
    assert [entry["device_id"] for entry in near_berlin] == [ids[0], ids[1]]
    assert near_berlin[0]["distance_km"] == 0
    assert 27.1 < near_berlin[1]["distance_km"] < 27.3
    assert [e["device_id"] for e in await devices_near(docs_stores, *BERLIN, km=300)] == ids[:3]
    assert [e["device_id"] for e in await devices_near(docs_stores, *BERLIN, km=300, limit=1)] == ids[:1]
    across = await devices_near(docs_stores, -179.9, 0.0, km=30)
    assert [e["device_id"] for e in across] == [ids[3]] and 22 < across[0]["distance_km"] < 23
    polar = await devices_near(docs_stores, 180.0, 89.9, km=30)
    assert [e["device_id"] for e in polar] == [ids[4]] and 22 < polar[0]["distance_km"] < 23
    assert await devices_near(docs_stores, 0.0, -45.0, km=100) == []


@pytest.mark.parametrize("backend_settings", ["mongodb"], indirect=True)
async def test_near_without_a_2dsphere_index_reads_a_bounding_box(docs_stores: Stores) -> None:
    """Where the server has no 2dsphere index (FerretDB refuses it; here also dropped on a
    MongoDB that has it), `near` gives the same answers as `$nearSphere` would."""
    docs = docs_stores.documents
    assert isinstance(docs, MongoDocumentStore)
    with_index = await docs.has_geo_index("device_metadata")
    ids = await _fleet(docs_stores.postgres)
    for device, place in zip(ids, [BERLIN, POTSDAM, HAMBURG, (179.9, 0.0)], strict=False):
        await set_metadata(docs_stores, str(device), MetadataChange(location=place))
    await docs.insert("device_metadata", "lineless", {"device_id": -1, "location": {"type": "LineString"}})
    queries = [(*BERLIN, 30.0), (*BERLIN, 300.0), (-179.9, 0.0, 30.0), (0.0, -45.0, 100.0)]
    expected = [[ids[0], ids[1]], ids[:3], [ids[3]], []]
    if with_index:  # a real mongod: $nearSphere's answers, then the box's
        assert [
            [d["device_id"] for _, d in await docs.near("device_metadata", *q)] for q in queries
        ] == expected
        await docs._db["device_metadata"].drop_index("device_metadata_location")
        assert not await docs.has_geo_index("device_metadata")
    found = [await docs.near("device_metadata", *q) for q in queries]
    assert [[d["device_id"] for _, d in answer] for answer in found] == expected
    assert 27.1 < found[0][1][0] < 27.3
    assert [d["device_id"] for _, d in await docs.near("device_metadata", *BERLIN, 300.0, limit=2)] == ids[:2]


@pytest.mark.parametrize("backend_settings", ["mongodb"], indirect=True)
async def test_near_uses_the_2dsphere_index_on_a_server_that_has_one(docs_stores: Stores) -> None:
    docs = docs_stores.documents
    assert isinstance(docs, MongoDocumentStore)
    if await _on_ferretdb(docs):
        pytest.skip("needs a real mongod: FerretDB 1.24 has no 2dsphere index (its near is the box's)")
    assert await docs.has_geo_index("device_metadata")


async def test_migrate_on_ferretdb_says_one_line_per_refused_index_and_creates_the_rest(
    settings: Settings,
    ferretdb_server: FerretDBServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`iotflow migrate` against FerretDB 1.24: exit 0, one warning per refused index (what,
    the server's reason, what is done instead), every other index and the stand-in created;
    the same on a rerun, and with a retention of 0 the TTL indexes are not asked for."""
    documents = replace(
        settings.documents,
        backend="mongodb",
        mongodb_url=ferretdb_server.url,
        mongodb_database=f"iotflow_test_{uuid.uuid4().hex[:10]}",
    )
    cli = Cli(settings, monkeypatch, capsys)
    monkeypatch.setenv("IOTFLOW_DOCUMENTS_BACKEND", "mongodb")
    monkeypatch.setenv("IOTFLOW_DOCUMENTS_MONGODB_URL", documents.mongodb_url)
    monkeypatch.setenv("IOTFLOW_DOCUMENTS_MONGODB_DATABASE", documents.mongodb_database)
    store = MongoDocumentStore(documents)
    try:
        for retention, refused in [
            ("90", FERRETDB_REFUSES),
            ("90", FERRETDB_REFUSES),
            ("0", FERRETDB_REFUSES - {EVENT_LOGS_TTL, RESOLVED_ALERTS_TTL}),
        ]:
            monkeypatch.setenv("IOTFLOW_JOBS_RETENTION_EVENT_LOGS_DAYS", retention)
            monkeypatch.setenv("IOTFLOW_JOBS_RETENTION_RESOLVED_ALERTS_DAYS", retention)
            with capture_logs() as logs:
                code, _, _ = await cli("migrate")
            assert code == 0
            lines = [entry for entry in logs if entry["event"] == "migrate.mongodb_index_refused"]
            assert sorted(line["index"] for line in lines) == sorted(refused)  # one each
            for line in lines:
                assert line["log_level"] == "warning" and line["reason"] and line["instead"], line
            (pending,) = [line for line in lines if line["index"] == "event_logs_pending"]
            assert (
                "partialFilterExpression" in pending["reason"] and "event_logs_notified" in pending["instead"]
            )
            assert not [entry for entry in logs if entry["log_level"] == "error"]
        wanted = {i.name: i for i in mongo_indexes(0, 0)}
        for collection in {index.collection for index in wanted.values()}:
            have = await store.indexes(collection)
            for name, index in wanted.items():
                if index.collection == collection and name not in FERRETDB_REFUSES:
                    assert same_definition(have[name], index)
        assert "event_logs_notified" in await store.indexes("event_logs")
        assert server_name(await store.server_info()).startswith("FerretDB v1.24")  # in migrate's last line
    finally:
        await store.drop_database()
        await store.close()


async def test_the_cli_answers_the_same_on_either_backend(
    backend_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    documents = backend_settings.documents
    monkeypatch.setenv("IOTFLOW_DOCUMENTS_BACKEND", documents.backend)
    monkeypatch.setenv("IOTFLOW_DOCUMENTS_MONGODB_URL", documents.mongodb_url)
    monkeypatch.setenv("IOTFLOW_DOCUMENTS_MONGODB_DATABASE", documents.mongodb_database)
    cli = Cli(backend_settings, monkeypatch, capsys)
    code, out, _ = await cli(
        "devices", "meta", "set", "sim-json-03", "--tag", "site=north", "--location", "13.405,52.52",
        "--field", "floor=3", "--field", "note=roof access",
    )  # fmt: skip
    assert code == 0 and '"site=north"' in out
    code, out, _ = await cli("devices", "near", "13.064", "52.391", "--km", "30")
    assert code == 0
    (line,) = out.splitlines()
    assert line.split()[1:4] == ["sim-json-03", "27.227", "km"], line
    assert line.endswith("13.405000,52.520000  site=north")

    for argv, problem in [
        (("devices", "near", "13", "95", "--km", "5"), "latitude 95 is outside -90..90"),
        (("devices", "near", "13", "52", "--km", "0"), "--km 0 must be more than 0"),
        (("devices", "meta", "get", "no-such-device"), "unknown device no-such-device"),
        (("devices", "meta", "set", "sim-json-03", "--location", "13,-91"), "latitude -91 is outside"),
        (("devices", "meta", "set", "sim-json-03", "--field", "a.b=1"), "may not contain '.'"),
        (("devices", "meta", "set", "sim-json-03"), "nothing to set"),
    ]:
        code, out, err = await cli(*argv)
        assert (code, out) == (2, ""), argv
        assert err.count("\n") == 1 and problem in err, err


# --- what needs no server -----------------------------------------------------------------------------


def test_the_bounding_box_holds_every_point_within_the_distance() -> None:
    """The PostgreSQL near query's candidates: a point within `km` is never outside the box
    (then the exact distance decides), at the equator, far north, by the antimeridian."""
    rng = random.Random(8)
    for lon, lat, km in [(13.4, 52.5, 30), (0, 0, 500), (179.5, -10, 200), (-179.9, 70, 300), (10, 88, 400)]:
        lat_min, lat_max, lon_ranges = bounding_box(lon, lat, km)
        inside = 0
        for _ in range(2000):
            # A point at a random bearing and distance ≤ km (the destination formula).
            angle, bearing = rng.uniform(0, km) / EARTH_RADIUS_KM, rng.uniform(0, 2 * math.pi)
            phi, lam = math.radians(lat), math.radians(lon)
            phi2 = math.asin(
                math.sin(phi) * math.cos(angle) + math.cos(phi) * math.sin(angle) * math.cos(bearing)
            )
            lam2 = lam + math.atan2(
                math.sin(bearing) * math.sin(angle) * math.cos(phi),
                math.cos(angle) - math.sin(phi) * math.sin(phi2),
            )
            plon, plat = (math.degrees(lam2) + 540) % 360 - 180, math.degrees(phi2)
            assert distance_km(lon, lat, plon, plat) <= km + 1e-6
            assert lat_min - 1e-9 <= plat <= lat_max + 1e-9, (lon, lat, km, plon, plat)
            assert any(west - 1e-9 <= plon <= east + 1e-9 for west, east in lon_ranges), (lon, lat, km, plon)
            inside += 1
        assert inside == 2000
    assert bounding_box(10, 88, 400)[2] == [(-180.0, 180.0)]  # reaches the pole: every longitude
    assert len(bounding_box(179.5, -10, 200)[2]) == 2  # split at the antimeridian


def test_an_unordered_bulk_insert_counts_duplicates_as_stored_before() -> None:
    """`details` as MongoDB reports a BulkWriteError (writeErrors carry the op's index)."""
    keys = ["a", "b", "c"]
    duplicate = {"index": 1, "code": 11000, "errmsg": "E11000 duplicate key error", "op": {"_id": "b"}}
    assert inserted_despite(keys, {"writeErrors": [duplicate], "writeConcernErrors": [], "nInserted": 2}) == {
        "a",
        "c",
    }
    other = {"index": 2, "code": 121, "errmsg": "Document failed validation"}
    assert inserted_despite(keys, {"writeErrors": [duplicate, other], "writeConcernErrors": []}) is None
    concern = {"code": 64, "errmsg": "waiting for replication timed out"}
    assert inserted_despite(keys, {"writeErrors": [], "writeConcernErrors": [concern]}) is None


def test_an_existing_index_is_compared_with_the_wanted_one() -> None:
    """`listIndexes` output (key as an ordered mapping, numbers as MongoDB returns them)."""
    (ttl,) = [i for i in mongo_indexes(90, 90) if i.name == RESOLVED_ALERTS_TTL]
    listed = {
        "v": 2,
        "key": {"created_at": 1},
        "name": RESOLVED_ALERTS_TTL,
        "partialFilterExpression": {"status": "resolved"},
        "expireAfterSeconds": 30 * DAY_S,  # another length: collMod changes it in place
    }
    assert same_definition(listed, ttl)
    assert not same_definition({**listed, "partialFilterExpression": {"status": "active"}}, ttl)
    assert not same_definition({k: v for k, v in listed.items() if k != "expireAfterSeconds"}, ttl)
    (geo,) = [i for i in mongo_indexes(90, 90) if i.name == "device_metadata_location"]
    assert same_definition({"v": 2, "key": {"location": "2dsphere"}, "2dsphereIndexVersion": 3}, geo)
    (unique,) = [i for i in mongo_indexes(90, 90) if i.name == "device_metadata_device"]
    assert same_definition({"v": 2, "key": {"device_id": 1.0}, "unique": True}, unique)
    assert not same_definition({"v": 2, "key": {"device_id": 1}}, unique)
    assert {i.name for i in mongo_indexes(0, 0)}.isdisjoint({EVENT_LOGS_TTL, RESOLVED_ALERTS_TTL})


async def test_migrate_says_in_one_line_when_mongodb_cannot_be_reached(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:  # a port nothing listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cli = Cli(settings, monkeypatch, capsys)
    monkeypatch.setenv("IOTFLOW_DOCUMENTS_BACKEND", "mongodb")
    monkeypatch.setenv(
        "IOTFLOW_DOCUMENTS_MONGODB_URL", f"mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=200"
    )
    with capture_logs() as logs:
        code, _, _ = await cli("migrate")
    assert code == 1
    (failed,) = [entry for entry in logs if entry["log_level"] == "error"]
    assert failed["event"] == "migrate.mongodb_failed" and f"127.0.0.1:{port}" in failed["error"]
