"""Status and history over HTTP on a real daemon: a device registered over the API, its
readings published over MQTT, then read back with its own key or an admin token; a wrong
key is 401, another device's 403, a revoked key refused at once; with Redis away the
status comes from PostgreSQL and the readings store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from worker.api.reads import device_status
from worker.config import Settings
from worker.rules.source import COLLECTION
from worker.stores import Stores, open_stores

from .helpers import Cli, publish, running_daemon, wait_for_count
from .http_api import ADMIN, TOKEN, Api, register
from .test_cli_errors import closed_port

READINGS = 5


async def _register(client: aiohttp.ClientSession, base: str, key: str) -> dict[str, Any]:
    body = {"device_key": key, "datapoints": [{"label": "temperature", "unit": "°C"}, {"label": "humidity"}]}
    return await register(client, base, body)


@pytest.fixture
async def api(settings: Settings, pg: asyncpg.Connection) -> AsyncIterator[Api]:
    settings.http = replace(settings.http, enabled=True, port=0, api=True, admin_tokens=[TOKEN])
    async with running_daemon(settings) as daemon, aiohttp.ClientSession() as client:
        assert daemon.http is not None
        base = f"http://127.0.0.1:{daemon.http.port}/api/v1"
        device = await _register(client, base, "reader-1")
        other = await _register(client, base, "reader-2")
        now = time.time()
        messages = [
            (
                "devices/reader-1/telemetry",
                orjson.dumps(
                    {"ts": int((now - 60 + n) * 1000), "values": {"temperature": 20 + n, "humidity": 50 + n}}
                ),
            )
            for n in range(READINGS)
        ]
        await publish(settings.mqtt.url, messages)
        await wait_for_count(
            pg, f"SELECT count(*) FROM decoded_data WHERE device_id = {device['device_id']}", 2 * READINGS
        )
        yield Api(base, client, device["device_id"], device["api_key"], other["api_key"])


async def test_status_and_history_answer_the_device_and_an_admin(api: Api) -> None:
    own = {"X-API-Key": api.key}
    for headers, ref in ((own, "reader-1"), (ADMIN, str(api.device_id))):
        status, body = await api.get(f"/devices/{ref}/status", headers)
        assert status == 200, body
        assert body["device_id"] == api.device_id and body["online"] is True and body["last_seen"]
        assert body["latest"] == {"temperature": 20.0 + READINGS - 1, "humidity": 50.0 + READINGS - 1}

    status, body = await api.get("/telemetry/reader-1?start=-1h&limit=100", own)
    assert status == 200 and body["store"] == "postgres" and body["next_cursor"] is None
    times = [r["timestamp"] for r in body["readings"]]
    assert len(times) == 2 * READINGS and times == sorted(times, reverse=True)

    paged: list[dict[str, Any]] = []
    cursor = ""
    while True:
        status, page = await api.get(f"/telemetry/reader-1?start=-1h&end=now&limit=3{cursor}", own)
        assert status == 200, page
        paged += page["readings"]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert paged == body["readings"]

    status, body = await api.get("/telemetry/reader-1?start=-1h&measurement=humidity", own)
    assert [r["value"] for r in body["readings"]] == [50.0 + n for n in reversed(range(READINGS))]


async def test_wrong_key_is_401_another_devices_403(api: Api) -> None:
    for path in ("/devices/reader-1/status", "/telemetry/reader-1"):
        for headers in ({}, {"X-API-Key": "not-a-key"}, {"Authorization": "Bearer wrong"}):
            status, body = await api.get(path, headers)
            assert (status, body["error"]) == (401, "unauthorized"), (path, headers)
        status, body = await api.get(path, {"X-API-Key": api.other_key})
        assert (status, body["error"]) == (403, "forbidden")
    status, body = await api.get("/devices/nobody-9/status", {"X-API-Key": api.key})
    assert (status, body["error"]) == (403, "forbidden")  # a device learns nothing of others
    status, body = await api.get("/devices/nobody-9/status", ADMIN)
    assert (status, body["error"]) == (404, "unknown_device")


@pytest.mark.parametrize(
    "query",
    [
        "start=yesterday",
        "start=-1h&end=-2h",
        "limit=0",
        "limit=5000",
        "limit=x",
        "cursor=zz:1",
        "cursor=pg:x|y",
    ],
)
async def test_bad_history_queries_are_400(api: Api, query: str) -> None:
    status, body = await api.get(f"/telemetry/reader-1?{query}", {"X-API-Key": api.key})
    assert status == 400 and body["error"] in {"bad_query", "bad_cursor"}, body


async def test_a_revoked_key_is_refused_at_once(
    api: Api, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    own = {"X-API-Key": api.key}
    assert (await api.get("/devices/reader-1/status", own))[0] == 200  # the key is cached now
    code, _, err = await Cli(settings, monkeypatch, capsys)("devices", "key", "revoke", "reader-1")
    assert code == 0, err
    assert (await api.get("/devices/reader-1/status", own))[0] == 401


async def test_with_redis_away_the_status_comes_from_postgres(api: Api, settings: Settings) -> None:
    with closed_port() as port:
        away = replace(settings, redis=replace(settings.redis, url=f"redis://127.0.0.1:{port}/0"))
        async with open_stores(away) as stores:
            row = await stores.postgres.fetchrow("SELECT * FROM devices WHERE id = $1", api.device_id)
            status = await device_status(stores, row)
    assert status["latest"] == {"temperature": 20.0 + READINGS - 1, "humidity": 50.0 + READINGS - 1}
    assert status["device_id"] == api.device_id and status["last_seen"]


async def test_config_reads_with_an_etag_and_writes_honour_if_match(api: Api, stores: Stores) -> None:
    own = {"X-API-Key": api.key}
    url = f"{api.base}/devices/reader-1/config"
    async with api.client.get(url, headers=own) as response:
        assert response.status == 200 and response.headers["ETag"] == '"1"'
        doc = await response.json()
        assert doc["device_id"] == api.device_id and doc["settings"] == {} and doc["config_version"] == 1
    settings = {"thresholds": {"temperature": {"max": 30, "unit": "°C"}}}
    async with api.client.put(url, json={"settings": settings}, headers=own) as response:
        assert response.status == 401  # a device reads its config, an admin writes it
    async with api.client.put(
        url, json={"settings": settings}, headers={**ADMIN, "If-Match": '"1"'}
    ) as response:
        assert response.status == 200 and response.headers["ETag"] == '"2"'
    stored = await stores.documents.get(COLLECTION, f"device:{api.device_id}")
    assert stored is not None and stored["settings"] == settings and stored["config_version"] == 2
    async with api.client.put(url, json={"settings": {}}, headers={**ADMIN, "If-Match": '"1"'}) as response:
        assert response.status == 412 and (await response.json())["error"] == "stale_config"
    bad = {"alerts": [{"type": "threshold", "field": "temperature", "condition": "~", "value": 1}]}
    async with api.client.put(url, json={"settings": bad}, headers=ADMIN) as response:
        body = await response.json()
        assert response.status == 422 and body["error"] == "invalid_config" and "condition" in body["detail"]
    async with api.client.get(url, headers=ADMIN) as response:
        assert response.headers["ETag"] == '"2"' and (await response.json())["settings"] == settings
    async with api.client.get(f"{api.base}/devices/reader-2/config", headers=own) as response:
        assert response.status == 403


async def test_concurrent_config_writes_of_one_version_let_exactly_one_win(api: Api, stores: Stores) -> None:
    url = f"{api.base}/devices/reader-1/config"

    async def put(n: int, headers: dict[str, str]) -> int:
        body = {"settings": {"thresholds": {"temperature": {"max": 30 + n}}}}
        async with api.client.put(url, json=body, headers=headers) as response:
            return response.status

    statuses = await asyncio.gather(*(put(n, {**ADMIN, "If-Match": '"1"'}) for n in range(10)))
    assert sorted(statuses) == [200] + [412] * 9
    stored = await stores.documents.get(COLLECTION, f"device:{api.device_id}")
    assert stored is not None and stored["config_version"] == 2
    # Without If-Match each write is applied in turn, none lost to another's version.
    assert await asyncio.gather(*(put(n, ADMIN) for n in range(10))) == [200] * 10
    stored = await stores.documents.get(COLLECTION, f"device:{api.device_id}")
    assert stored is not None and stored["config_version"] == 12
