"""Device API keys: issued once, kept as their SHA-256 only, checked through a Redis cache.

A key is 32 random bytes (URL-safe text): it cannot be guessed, so a fast hash is enough and
the hash is also the cache's key, `device:apikey:{sha256}` (a hash {device_id, user_id,
status, device_key}, one hour). The key itself is printed once, to whoever issued it, and is never
logged, counted or named in an error. With Redis away, PostgreSQL answers: a check never
depends on the derivable store. Rotating or revoking deletes the cached entry of the old
key, so the change is seen at once; if Redis is away then, the entry expires within its TTL.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis

from worker.retry import is_transient
from worker.stores.keys import API_KEY_TTL_S, RedisKeys
from worker.stores.postgres import Connection


@dataclass(frozen=True, slots=True)
class KeyOwner:
    device_id: int
    user_id: int | None
    status: str
    device_key: str  # its telemetry topic's level: devices/{device_key}/telemetry


def new_key() -> str:
    return secrets.token_urlsafe(32)


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def set_key(conn: Connection | asyncpg.Pool, device_id: int, key: str | None) -> str | None:
    """Give the device `key` (None: no key); returns the hex SHA-256 of the key it had, if any,
    for the caller to drop from the cache."""
    digest = bytes.fromhex(key_sha256(key)) if key is not None else None
    old: bytes | None = await conn.fetchval(
        "UPDATE devices d SET api_key_sha256 = $2, updated_at = now() "
        "FROM (SELECT id, api_key_sha256 FROM devices WHERE id = $1 FOR UPDATE) old "
        "WHERE d.id = old.id RETURNING old.api_key_sha256",
        device_id,
        digest,
    )
    return old.hex() if old is not None else None


class DeviceKeys:
    """Who a key belongs to, from Redis when it has the answer, else from PostgreSQL."""

    def __init__(self, postgres: asyncpg.Pool, redis: aioredis.Redis, keys: RedisKeys) -> None:
        self._postgres = postgres
        self._redis = redis
        self._keys = keys

    async def owner(self, key: str) -> KeyOwner | None:
        """The device `key` belongs to, None for no device (unknown, rotated or revoked)."""
        digest = key_sha256(key)
        name = self._keys.device_api_key(digest)
        try:
            cached: dict[bytes, bytes] = await self._redis.hgetall(name)  # type: ignore[misc]
        except Exception as exc:
            if not is_transient(exc):
                raise
            return await self._from_postgres(digest)
        if cached.get(b"device_key"):
            user = int(cached[b"user_id"]) if cached[b"user_id"] else None
            status, device_key = cached[b"status"].decode(), cached[b"device_key"].decode()
            return KeyOwner(int(cached[b"device_id"]), user, status, device_key)
        owner = await self._from_postgres(digest)
        if owner is not None:
            try:
                await self._cache(name, owner)
            except Exception as exc:
                if not is_transient(exc):
                    raise
        return owner

    async def forget(self, key_sha256_hex: str) -> None:
        await self._redis.delete(self._keys.device_api_key(key_sha256_hex))

    async def _from_postgres(self, digest: str) -> KeyOwner | None:
        row = await self._postgres.fetchrow(
            "SELECT id, user_id, status, device_key FROM devices WHERE api_key_sha256 = $1",
            bytes.fromhex(digest),
        )
        if row is None:
            return None
        return KeyOwner(row["id"], row["user_id"], row["status"], row["device_key"])

    async def _cache(self, name: str, owner: KeyOwner) -> None:
        fields = {
            "device_id": owner.device_id,
            "user_id": "" if owner.user_id is None else owner.user_id,
            "status": owner.status,
            "device_key": owner.device_key,
        }
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(name, mapping=fields)
            pipe.expire(name, API_KEY_TTL_S)
            await pipe.execute()
