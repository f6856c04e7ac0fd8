"""The document store contract, on PostgreSQL JSONB always and on MongoDB when one is given."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from worker.config import DocumentSettings, Settings
from worker.stores import open_stores
from worker.stores.documents import DocumentStore, MongoDocumentStore

MONGODB_URL = os.environ.get("IOTFLOW_TEST_MONGODB_URL", "")


@pytest.fixture(params=["postgres", "mongodb"])
async def store(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[DocumentStore]:
    if request.param == "postgres":
        async with open_stores(settings) as stores:
            yield stores.documents
        return
    if not MONGODB_URL:
        pytest.skip("no MongoDB here: set IOTFLOW_TEST_MONGODB_URL (docker-compose runs one) to run this")
    database = f"iotflow_test_{uuid.uuid4().hex[:8]}"
    mongo = MongoDocumentStore(
        DocumentSettings(backend="mongodb", mongodb_url=MONGODB_URL, mongodb_database=database)
    )
    yield mongo
    await mongo._client.drop_database(database)
    await mongo.close()


async def test_insert_is_idempotent_on_the_key(store: DocumentStore) -> None:
    doc = {"device_id": 7, "severity": "high", "status": "active"}
    assert await store.insert("alerts", "rule1:7:1000", doc) is True
    assert await store.insert("alerts", "rule1:7:1000", {**doc, "severity": "low"}) is False
    stored = await store.get("alerts", "rule1:7:1000")
    assert stored is not None and stored["severity"] == "high" and stored["_id"] == "rule1:7:1000"


async def test_update_upsert_and_find(store: DocumentStore) -> None:
    for n in range(3):
        await store.upsert("event_logs", f"e{n}", {"device_id": n % 2, "n": n})
    assert await store.update("event_logs", "e1", {"seen": True}) is True
    assert await store.update("event_logs", "absent", {"seen": True}) is False
    found = await store.find("event_logs", {"device_id": 0}, order_by="n", descending=True)
    assert [d["n"] for d in found] == [2, 0]
    assert (await store.get("event_logs", "e1") or {}).get("seen") is True


async def test_delete_before(store: DocumentStore) -> None:
    await store.insert("analytics", "a", {"created_at": datetime.now(UTC) - timedelta(days=2)})
    deleted = await store.delete_before("analytics", datetime.now(UTC) + timedelta(seconds=1))
    assert deleted == 1
    assert await store.get("analytics", "a") is None


async def test_count_per_device_in_a_time_range(store: DocumentStore) -> None:
    base = datetime(2026, 11, 20, tzinfo=UTC)
    for n, (device, hours) in enumerate([(1, 1), (1, 5), (2, 2), (1, 30), (3, 3)]):
        status = "resolved" if n == 1 else "active"
        await store.insert(
            "alerts",
            f"a{n}",
            {"device_id": device, "created_at": base + timedelta(hours=hours), "status": status},
        )
    counts = await store.count_per_device("alerts", base, base + timedelta(days=1))
    assert counts == {1: 2, 2: 1, 3: 1}
    resolved = await store.count_per_device(
        "alerts", base, base + timedelta(days=1), where={"status": "resolved"}
    )
    assert resolved == {1: 1}


async def test_delete_before_can_filter(store: DocumentStore) -> None:
    old = datetime.now(UTC) - timedelta(days=3)
    await store.insert("alerts", "r", {"created_at": old, "status": "resolved"})
    await store.insert("alerts", "a", {"created_at": old, "status": "active"})
    deleted = await store.delete_before(
        "alerts", datetime.now(UTC) + timedelta(seconds=1), {"status": "resolved"}
    )
    assert deleted == 1
    assert await store.get("alerts", "r") is None and await store.get("alerts", "a") is not None
