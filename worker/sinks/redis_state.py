"""Redis hot state (SPEC §6): latest values, status, the online set, telemetry pub/sub.

The newest reading wins, also across batches. One Lua script call per chunk of
`DEVICES_PER_CALL` devices, whose one argument is a JSON document of every device's
keys and values: a batch of 2,000 messages from 2,000 devices costs one round trip
and one `EVALSHA`, not 2,000 of each, so the cost stays per reading as the fleet grows.
"""

from __future__ import annotations

from datetime import datetime

import orjson
import redis.asyncio as aioredis

from schemas.records import DecodedBatch
from worker.stores.keys import LATEST_TTL_S, STATUS_TTL_S, RedisKeys

DEVICES_PER_CALL = 1000  # bounds one script run (and so how long Redis is busy with it)

# Newest wins, across batches too: a gateway uploading its backlog must not replace a
# device's latest values (or its last_seen) with older ones. Per-label times live in
# `device:latest_ts:{id}`; the online set's score is the device's last_seen.
# ARGV: online set, latest TTL, status TTL, then a JSON list with one entry per device:
#   [latest key, latest_ts key, status key, telemetry channel, device id, last_seen (epoch s),
#    last_seen (ISO), telemetry message, then label, value, time (epoch s) for each label].
# Numbers travel as text, so Redis stores exactly what Python wrote (Lua would round to 14 digits).
# The keys are passed in ARGV, not KEYS: a standalone Redis allows it, a cluster would not
# have allowed the multi-device script before either.
_UPDATE_DEVICES = """
local online, latest_ttl, status_ttl = ARGV[1], ARGV[2], ARGV[3]
for _, d in ipairs(cjson.decode(ARGV[4])) do
    local latest, times, status, id = d[1], d[2], d[3], d[5]
    local score = redis.call('ZSCORE', online, id)
    if (not score) or tonumber(d[6]) >= tonumber(score) then
        redis.call('ZADD', online, d[6], id)
        redis.call('HSET', status, 'status', 'online', 'last_seen', d[7], 'is_online', 1)
        redis.call('EXPIRE', status, status_ttl)
    end
    for i = 9, #d, 3 do
        local seen = redis.call('HGET', times, d[i])
        if (not seen) or tonumber(d[i + 2]) >= tonumber(seen) then
            redis.call('HSET', latest, d[i], d[i + 1])
            redis.call('HSET', times, d[i], d[i + 2])
        end
    end
    redis.call('EXPIRE', latest, latest_ttl)
    redis.call('EXPIRE', times, latest_ttl)
    redis.call('PUBLISH', d[4], d[8])
end
return 1
"""


class RedisHotStateWriter:
    name = "redis"

    def __init__(self, client: aioredis.Redis, keys: RedisKeys) -> None:
        self._redis = client
        self._keys = keys
        self._update_devices = client.register_script(_UPDATE_DEVICES)

    async def write(self, batch: DecodedBatch) -> None:
        if not batch.readings:
            return
        # device id → label → (timestamp, value), the newest of each label in the batch
        by_device: dict[int, dict[str, tuple[datetime, float]]] = {}
        for reading in batch.readings:
            latest = by_device.get(reading.device_id)
            if latest is None:
                latest = by_device[reading.device_id] = {}
            seen = latest.get(reading.label)
            if seen is None or reading.timestamp >= seen[0]:
                latest[reading.label] = (reading.timestamp, reading.value)
        entries = [self._entry(device_id, latest) for device_id, latest in by_device.items()]
        head: list[str | int] = [self._keys.devices_online(), LATEST_TTL_S, STATUS_TTL_S]
        async with self._redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(entries), DEVICES_PER_CALL):
                chunk = orjson.dumps(entries[start : start + DEVICES_PER_CALL])
                await self._update_devices(args=[*head, chunk], client=pipe)
            await pipe.execute()

    def _entry(self, device_id: int, latest: dict[str, tuple[datetime, float]]) -> list[str]:
        keys = self._keys
        last_seen = max(timestamp for timestamp, _ in latest.values())
        entry = [
            keys.device_latest(device_id),
            keys.device_latest_times(device_id),
            keys.device_status(device_id),
            keys.telemetry_channel(device_id),
            str(device_id),
            repr(last_seen.timestamp()),
            last_seen.isoformat(timespec="microseconds"),
            _telemetry_message(device_id, latest, last_seen),
        ]
        for label, (timestamp, value) in latest.items():
            entry += (label, repr(value), repr(timestamp.timestamp()))
        return entry

    async def reset(self) -> None:
        """Nothing to drop: the client discards a broken connection and reconnects by itself."""

    async def close(self) -> None:
        """The client belongs to `Stores`."""


def _telemetry_message(device_id: int, latest: dict[str, tuple[datetime, float]], last_seen: datetime) -> str:
    return orjson.dumps(
        {
            "device_id": device_id,
            "timestamp": last_seen,
            "values": {label: value for label, (_, value) in latest.items()},
        }
    ).decode()
