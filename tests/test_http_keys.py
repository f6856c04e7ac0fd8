"""Device API keys against real PostgreSQL and Redis: `iotflow devices key rotate|revoke`
prints a key once and stores only its SHA-256; a check goes through the Redis cache, a
rotated or revoked key is refused at once, and with Redis away PostgreSQL answers."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import asyncpg
import pytest
import redis.asyncio as aioredis

from worker.api.keys import DeviceKeys, KeyOwner
from worker.config import Settings
from worker.stores import Stores
from worker.stores.keys import API_KEY_TTL_S
from worker.stores.redis import redis_client

from .helpers import Cli
from .test_cli_errors import closed_port

DEVICE = "sim-json-01"  # the seeded fleet's (worker/tools/fleet.py)


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(settings, monkeypatch, capsys)


async def _rotate(cli: Cli) -> str:
    code, out, err = await cli("devices", "key", "rotate", DEVICE)
    assert code == 0, err
    assert err.count("\n") == 1 and "new API key of sim-json-01" in err, err
    (key,) = out.split()
    return key


async def test_rotate_prints_a_key_once_and_stores_only_its_hash(
    cli: Cli, stores: Stores, pg: asyncpg.Connection
) -> None:
    key = await _rotate(cli)
    assert len(key) >= 40
    row = await pg.fetchrow("SELECT * FROM devices WHERE device_key = $1", DEVICE)
    assert row["api_key_sha256"] == hashlib.sha256(key.encode()).digest()
    assert key not in repr(dict(row))
    keys = DeviceKeys(stores.postgres, stores.redis, stores.keys)
    assert await keys.owner(key) == KeyOwner(row["id"], row["user_id"], "active", DEVICE)
    cached = stores.keys.device_api_key(hashlib.sha256(key.encode()).hexdigest())
    assert await stores.redis.hgetall(cached) == {
        b"device_id": str(row["id"]).encode(),
        b"user_id": str(row["user_id"]).encode() if row["user_id"] else b"",
        b"status": b"active",
        b"device_key": DEVICE.encode(),
    }
    assert 0 < await stores.redis.ttl(cached) <= API_KEY_TTL_S
    for name in await stores.redis.keys(f"{stores.keys.prefix}*"):
        assert key.encode() not in name
    assert await keys.owner(key + "x") is None
    assert await keys.owner("") is None


async def test_a_rotated_or_revoked_key_is_refused_at_once(cli: Cli, stores: Stores) -> None:
    keys = DeviceKeys(stores.postgres, stores.redis, stores.keys)
    first = await _rotate(cli)
    assert await keys.owner(first) is not None  # now cached in Redis
    second = await _rotate(cli)
    assert await keys.owner(first) is None
    assert await keys.owner(second) is not None
    code, out, err = await cli("devices", "key", "revoke", DEVICE)
    assert (
        (code, err) == (0, "") and out.startswith("API key of device sim-json-01 (id ") and "revoked" in out
    )
    assert await keys.owner(second) is None
    code, out, _ = await cli("devices", "key", "revoke", DEVICE)
    assert code == 0 and "had none" in out


async def test_with_redis_away_postgres_checks_the_keys(cli: Cli, stores: Stores, settings: Settings) -> None:
    key = await _rotate(cli)
    with closed_port() as port:
        away: aioredis.Redis = redis_client(replace(settings.redis, url=f"redis://127.0.0.1:{port}/0"))
        try:
            keys = DeviceKeys(stores.postgres, away, stores.keys)
            owner = await keys.owner(key)
            assert owner is not None and owner.status == "active"
            assert await keys.owner(key + "x") is None
        finally:
            await away.aclose()


async def test_revoking_with_redis_away_says_the_old_key_works_until_its_entry_expires(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _rotate(cli)
    with closed_port() as port:
        monkeypatch.setenv("IOTFLOW_REDIS_URL", f"redis://127.0.0.1:{port}/0")
        code, out, err = await cli("devices", "key", "revoke", DEVICE)
    assert code == 0 and "revoked" in out
    assert err.count("\n") == 1 and "works on until its cache entry expires, within 60 minutes" in err, err
