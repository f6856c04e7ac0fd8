"""`POST /api/v1/devices/register` on a real daemon (PostgreSQL, Redis, the document store):
an admin token is needed, the device, its key's hash and its config document are stored
before the 201, a key taken is 409 with nothing changed, and bad bodies get a 4xx in the
API's error form, never a 500."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from worker.api.keys import DeviceKeys
from worker.config import ConfigError, Settings, load_settings
from worker.pipeline import Daemon
from worker.rules.source import COLLECTION
from worker.stores import Stores

from .helpers import running_daemon

TOKEN = "tok-" + "a" * 32


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[tuple[Daemon, str]]:
    settings.http = replace(settings.http, enabled=True, port=0, api=True, admin_tokens=[TOKEN])
    async with running_daemon(settings) as daemon:
        assert daemon.http is not None
        yield daemon, f"http://127.0.0.1:{daemon.http.port}/api/v1"


async def _post(url: str, body: bytes | Any, token: str | None = TOKEN) -> tuple[int, dict[str, Any], Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, bytes) else None
    async with (
        aiohttp.ClientSession() as client,
        client.post(url, data=data, json=None if data is not None else body, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.json()


async def test_register_stores_the_device_its_key_hash_and_config_then_answers_201(
    api: tuple[Daemon, str], pg: asyncpg.Connection, stores: Stores
) -> None:
    _, base = api
    body = {
        "device_key": "greenhouse-7",
        "name": "Greenhouse 7",
        "user": "grower",
        "datapoints": [{"label": "temperature", "unit": "°C", "min": -40, "max": 85}, {"label": "humidity"}],
    }
    status, _, answer = await _post(f"{base}/devices/register", body)
    assert status == 201, answer
    assert set(answer) == {"device_id", "device_key", "api_key"} and answer["device_key"] == "greenhouse-7"
    row = await pg.fetchrow("SELECT * FROM devices WHERE id = $1", answer["device_id"])
    assert row["name"] == "Greenhouse 7" and row["device_key"] == "greenhouse-7"
    assert row["api_key_sha256"] == hashlib.sha256(answer["api_key"].encode()).digest()
    assert await pg.fetchval("SELECT username FROM users WHERE id = $1", row["user_id"]) == "grower"
    points = await pg.fetch(
        "SELECT label, unit, min_value, max_value FROM datapoints WHERE device_id = $1 ORDER BY label",
        row["id"],
    )
    assert [tuple(p) for p in points] == [("humidity", None, None, None), ("temperature", "°C", -40, 85)]
    config = await stores.documents.get(COLLECTION, f"device:{row['id']}")
    assert config is not None and config["device_id"] == row["id"] and config["settings"] == {}
    owner = await DeviceKeys(stores.postgres, stores.redis, stores.keys).owner(answer["api_key"])
    assert owner is not None and owner.device_id == row["id"]

    again, _, refused = await _post(f"{base}/devices/register", {**body, "name": "Other"})
    assert again == 409 and refused["error"] == "device_exists", refused
    after = await pg.fetchrow("SELECT * FROM devices WHERE id = $1", answer["device_id"])
    assert after["api_key_sha256"] == row["api_key_sha256"] and after["name"] == "Greenhouse 7"


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
async def test_register_without_an_admin_token_is_401(
    api: tuple[Daemon, str], pg: asyncpg.Connection, token: str | None
) -> None:
    _, base = api
    status, headers, answer = await _post(f"{base}/devices/register", {"device_key": "nope-1"}, token)
    assert (
        status == 401
        and answer["error"] == "unauthorized"
        and headers["WWW-Authenticate"].startswith("Bearer")
    )
    assert await pg.fetchval("SELECT count(*) FROM devices WHERE device_key = 'nope-1'") == 0


BAD_BODIES = [
    (b"{not json", 400, "bad_json"),
    (b"[]", 422, "invalid_body"),
    ({"name": "no key"}, 422, "invalid_body"),
    ({"device_key": 7}, 422, "invalid_body"),
    ({"device_key": "1234"}, 422, "invalid_device"),
    ({"device_key": "a/b"}, 422, "invalid_device"),
    ({"device_key": "ok-1", "mac": "zz"}, 422, "invalid_device"),
    ({"device_key": "ok-1", "colour": "red"}, 422, "invalid_body"),
    ({"device_key": "ok-1", "datapoints": "t"}, 422, "invalid_body"),
    ({"device_key": "ok-1", "datapoints": [{"label": "t", "min": 9, "max": 1}]}, 422, "invalid_device"),
    ({"device_key": "ok-1", "datapoints": [{"label": "t", "min": "low"}]}, 422, "invalid_body"),
    ({"device_key": "ok-1", "datapoints": [{"label": "t"}, {"label": "t"}]}, 422, "invalid_device"),
    (b"x" * (300 * 1024), 413, "too_large"),
]


async def test_bad_registrations_get_a_4xx_in_the_error_form_and_store_nothing(
    api: tuple[Daemon, str], pg: asyncpg.Connection
) -> None:
    _, base = api
    before = await pg.fetchval("SELECT count(*) FROM devices")
    for body, expected, reason in BAD_BODIES:
        status, _, answer = await _post(f"{base}/devices/register", body)
        assert (status, answer["error"]) == (expected, reason), (
            body if len(str(body)) < 200 else "big",
            answer,
        )
        assert isinstance(answer["detail"], str) and "\n" not in answer["detail"]
    assert await pg.fetchval("SELECT count(*) FROM devices") == before


async def test_api_paths_answer_in_the_error_form(api: tuple[Daemon, str]) -> None:
    _, base = api
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/devices/register") as response:
            assert response.status == 405 and (await response.json())["error"] == "method_not_allowed"
        async with client.get(f"{base}/nowhere") as response:
            assert response.status == 404 and (await response.json())["error"] == "not_found"


async def test_without_http_api_there_is_no_api(settings: Settings) -> None:
    settings.http = replace(settings.http, enabled=True, port=0, admin_tokens=[TOKEN])
    async with running_daemon(settings) as daemon:
        assert daemon.http is not None
        url = f"http://127.0.0.1:{daemon.http.port}/api/v1/devices/register"
        async with aiohttp.ClientSession() as client, client.post(url, json={}) as response:
            assert response.status == 404


def test_admin_tokens_come_from_the_setting_and_the_file(tmp_path: Path) -> None:
    tokens = tmp_path / "admin-tokens"
    tokens.write_text("tok-file-1\n\n  tok-file-2  \n")
    env = {"IOTFLOW_HTTP_ADMIN_TOKENS": "tok-a,tok-b", "IOTFLOW_HTTP_ADMIN_TOKENS_FILE": str(tokens)}
    assert load_settings(environ=env).http.admin_tokens == ["tok-a", "tok-b", "tok-file-1", "tok-file-2"]
    with pytest.raises(ConfigError, match="http.admin_tokens_file.*does not exist"):
        load_settings(environ={"IOTFLOW_HTTP_ADMIN_TOKENS_FILE": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match=r"http.api.*needs http.enabled = true"):
        load_settings(environ={"IOTFLOW_HTTP_API": "true", "IOTFLOW_HTTP_ENABLED": "false"})
