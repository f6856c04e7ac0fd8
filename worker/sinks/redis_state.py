"""Redis hot state (SPEC §6): latest values, status, the online set, telemetry pub/sub.

One pipeline per batch, one set of commands per device in it: a device that sent
500 messages in the batch costs the same round trip as one that sent one.
"""

from __future__ import annotations

from datetime import datetime

import orjson
import redis.asyncio as aioredis

from schemas.records import DecodedBatch, Reading
from worker.keys import RedisKeys

LATEST_TTL_S = 600
STATUS_TTL_S = 300


class RedisHotStateWriter:
    name = "redis"

    def __init__(self, client: aioredis.Redis, keys: RedisKeys) -> None:
        self._redis = client
        self._keys = keys

    async def write(self, batch: DecodedBatch) -> None:
        if not batch.readings:
            return
        by_device: dict[int, dict[str, Reading]] = {}
        for reading in batch.readings:
            latest = by_device.setdefault(reading.device_id, {})
            seen = latest.get(reading.label)
            if seen is None or reading.timestamp >= seen.timestamp:
                latest[reading.label] = reading
        keys = self._keys
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_id, latest in by_device.items():
                last_seen = max(r.timestamp for r in latest.values())
                pipe.hset(keys.device_latest(device_id), mapping={k: r.value for k, r in latest.items()})
                pipe.expire(keys.device_latest(device_id), LATEST_TTL_S)
                pipe.hset(
                    keys.device_status(device_id),
                    mapping={
                        "status": "online",
                        "last_seen": last_seen.isoformat(),
                        "is_online": 1,
                    },
                )
                pipe.expire(keys.device_status(device_id), STATUS_TTL_S)
                pipe.zadd(keys.devices_online(), {str(device_id): last_seen.timestamp()}, gt=True)
                pipe.publish(
                    keys.telemetry_channel(device_id),
                    _telemetry_message(device_id, latest, last_seen),
                )
            await pipe.execute()

    async def reset(self) -> None:
        await self._redis.connection_pool.disconnect()

    async def close(self) -> None:
        await self._redis.aclose()


def _telemetry_message(device_id: int, latest: dict[str, Reading], last_seen: datetime) -> bytes:
    return orjson.dumps(
        {
            "device_id": device_id,
            "timestamp": last_seen,
            "values": {label: reading.value for label, reading in latest.items()},
        }
    )
