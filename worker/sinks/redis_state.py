"""Redis hot state (SPEC §6): latest values, status, the online set, telemetry pub/sub.

The newest reading wins, also across batches (one Lua script per device).

One pipeline per batch, one set of commands per device in it: a device that sent
500 messages in the batch costs the same round trip as one that sent one.
"""

from __future__ import annotations

from datetime import datetime

import orjson
import redis.asyncio as aioredis

from schemas.records import DecodedBatch, Reading
from worker.stores.keys import LATEST_TTL_S, STATUS_TTL_S, RedisKeys

# Newest wins, across batches too: a gateway uploading its backlog must not replace a
# device's latest values (or its last_seen) with older ones. Per-label times live in
# `device:latest_ts:{id}`; the online set's score is the device's last_seen.
# KEYS: latest, latest_ts, status, online set.
# ARGV: device id, last_seen (epoch s), last_seen (ISO), latest TTL, status TTL,
#       then label, value, time (epoch s) for each label.
_UPDATE_DEVICE = """
local newest = tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[4], ARGV[1])
if (not score) or newest >= tonumber(score) then
    redis.call('ZADD', KEYS[4], newest, ARGV[1])
    redis.call('HSET', KEYS[3], 'status', 'online', 'last_seen', ARGV[3], 'is_online', 1)
    redis.call('EXPIRE', KEYS[3], ARGV[5])
end
for i = 6, #ARGV, 3 do
    local seen = redis.call('HGET', KEYS[2], ARGV[i])
    if (not seen) or tonumber(ARGV[i + 2]) >= tonumber(seen) then
        redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
        redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
    end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""


class RedisHotStateWriter:
    name = "redis"

    def __init__(self, client: aioredis.Redis, keys: RedisKeys) -> None:
        self._redis = client
        self._keys = keys
        self._update_device = client.register_script(_UPDATE_DEVICE)

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
                args: list[str | float | int] = [
                    device_id,
                    last_seen.timestamp(),
                    last_seen.isoformat(timespec="microseconds"),
                    LATEST_TTL_S,
                    STATUS_TTL_S,
                ]
                for label, reading in latest.items():
                    args += [label, reading.value, reading.timestamp.timestamp()]
                await self._update_device(
                    keys=[
                        keys.device_latest(device_id),
                        keys.device_latest_times(device_id),
                        keys.device_status(device_id),
                        keys.devices_online(),
                    ],
                    args=args,
                    client=pipe,
                )
                pipe.publish(
                    keys.telemetry_channel(device_id),
                    _telemetry_message(device_id, latest, last_seen),
                )
            await pipe.execute()

    async def reset(self) -> None:
        """Nothing to drop: the client discards a broken connection and reconnects by itself."""

    async def close(self) -> None:
        """The client belongs to `Stores`."""


def _telemetry_message(device_id: int, latest: dict[str, Reading], last_seen: datetime) -> bytes:
    return orjson.dumps(
        {
            "device_id": device_id,
            "timestamp": last_seen,
            "values": {label: reading.value for label, reading in latest.items()},
        }
    )
