"""Redis hot state (docs/storage.md): latest values, status, the online set, telemetry pub/sub.

The newest reading wins, also across batches. One Lua script call per chunk of
`DEVICES_PER_CALL` devices, so a batch of 1,000 messages from 1,000 devices costs one
round trip and one `EVALSHA`, not 1,000 of each. A large fleet puts nearly every device
of a batch in it, so what is done per device counts: the arguments are columns of the
whole chunk, each made by one C call (`map`, `orjson.dumps`), not a list of strings built
per device; the script builds the keys, the telemetry message and the status from them,
and reads and writes each device's labels with one `HMGET` and one `HSET` per hash.
"""

from __future__ import annotations

from datetime import datetime
from operator import attrgetter

import orjson
import redis.asyncio as aioredis

from schemas.records import DecodedBatch, Reading
from worker.stores.keys import LATEST_TTL_S, STATUS_TTL_S, RedisKeys

DEVICES_PER_CALL = 1000  # bounds one script run (and so how long Redis is busy with it)

# Newest wins, across batches too: a gateway uploading its backlog must not replace a
# device's latest values (or its last_seen) with older ones. Per-label times live in
# `device:latest_ts:{id}`; the online set's score is the device's last_seen.
# ARGV: online set, latest TTL, status TTL, then the (head, tail) around the device id of the
#   latest, latest_ts and status keys and of the telemetry channel (ARGV[4..11]), then
#   ARGV[12]: JSON [device ids, labels per device, labels, time index of each label, ISO times
#   (as orjson writes them: UTC, no fraction when it is 0)]
#   ARGV[13]: JSON list of the values, ARGV[14]: JSON list of the times (epoch s), both read
#   as text: Redis stores the digits orjson wrote (a Lua number would round to 14 digits).
# The keys are passed in ARGV, not KEYS: a standalone Redis allows it, a cluster would not
# have allowed the multi-device script before either.
_UPDATE_DEVICES = """
local online, latest_ttl, status_ttl = ARGV[1], ARGV[2], ARGV[3]
local doc = cjson.decode(ARGV[12])
local ids, counts, labels, at, isos = doc[1], doc[2], doc[3], doc[4], doc[5]
local values, times = {}, {}
for token in string.gmatch(ARGV[13], '[^,%[%]]+') do values[#values + 1] = token end
for token in string.gmatch(ARGV[14], '[^,%[%]]+') do times[#times + 1] = token end
for i, iso in ipairs(isos) do  -- as Python's isoformat(timespec="microseconds")
    if string.len(iso) == 25 then isos[i] = string.sub(iso, 1, 19) .. '.000000' .. string.sub(iso, 20) end
end
local function hset(key, fields)  -- in slices: unpack has a limit
    for i = 1, #fields, 1000 do
        redis.call('HSET', key, unpack(fields, i, math.min(i + 999, #fields)))
    end
end
local k = 0
for n, number in ipairs(ids) do
    local id, count = string.format('%d', number), counts[n]
    local latest, stamps = ARGV[4] .. id .. ARGV[5], ARGV[6] .. id .. ARGV[7]
    local status = ARGV[8] .. id .. ARGV[9]
    local newest, names, parts = at[k + 1], {}, {}
    for i = 1, count do
        local j = k + i
        names[i] = labels[j]
        parts[i] = cjson.encode(labels[j]) .. ':' .. values[j]
        if tonumber(times[at[j]]) > tonumber(times[newest]) then newest = at[j] end
    end
    local score = redis.call('ZSCORE', online, id)
    if (not score) or tonumber(times[newest]) >= tonumber(score) then
        redis.call('ZADD', online, times[newest], id)
        redis.call('HSET', status, 'status', 'online', 'last_seen', isos[newest], 'is_online', 1)
        redis.call('EXPIRE', status, status_ttl)
    end
    local seen, newer_values, newer_times = {}, {}, {}
    for i = 1, count, 1000 do
        local got = redis.call('HMGET', stamps, unpack(names, i, math.min(i + 999, count)))
        for g = 1, #got do seen[i + g - 1] = got[g] end
    end
    for i = 1, count do
        local j = k + i
        local time = times[at[j]]
        if (not seen[i]) or tonumber(time) >= tonumber(seen[i]) then
            newer_values[#newer_values + 1] = names[i]
            newer_values[#newer_values + 1] = values[j]
            newer_times[#newer_times + 1] = names[i]
            newer_times[#newer_times + 1] = time
        end
    end
    hset(latest, newer_values)
    hset(stamps, newer_times)
    redis.call('EXPIRE', latest, latest_ttl)
    redis.call('EXPIRE', stamps, latest_ttl)
    local message = '{"device_id":' .. id .. ',"timestamp":"' .. isos[newest] .. '","values":{'
    redis.call('PUBLISH', ARGV[10] .. id .. ARGV[11], message .. table.concat(parts, ',') .. '}}')
    k = k + count
end
return 1
"""
_timestamp = attrgetter("timestamp")
_label = attrgetter("label")
_value = attrgetter("value")


class RedisHotStateWriter:
    name = "redis"

    def __init__(self, client: aioredis.Redis, keys: RedisKeys) -> None:
        self._redis = client
        self._update_devices = client.register_script(_UPDATE_DEVICES)
        self._head: list[str | int] = [keys.devices_online(), LATEST_TTL_S, STATUS_TTL_S]
        per_device = (
            keys.device_latest,
            keys.device_latest_times,
            keys.device_status,
            keys.telemetry_channel,
        )
        for key_of in per_device:
            self._head += keys.around_device_id(key_of)

    async def write(self, batch: DecodedBatch) -> None:
        if not batch.readings:
            return
        # device id → label → the newest reading of that label in the batch
        newest: dict[int, dict[str, Reading]] = {}
        for reading in batch.readings:
            latest = newest.get(reading.device_id)
            if latest is None:
                newest[reading.device_id] = {reading.label: reading}
            else:
                seen = latest.get(reading.label)
                if seen is None or reading.timestamp >= seen.timestamp:
                    latest[reading.label] = reading
        devices = list(newest.items())
        # One EVALSHA per chunk, each awaited: not a pipeline, whose every execute asks
        # SCRIPT EXISTS first (a round trip per batch); the script loads itself if Redis lost it.
        for start in range(0, len(devices), DEVICES_PER_CALL):
            columns = _columns(devices[start : start + DEVICES_PER_CALL])
            await self._update_devices(args=[*self._head, *columns])

    async def reset(self) -> None:
        """Nothing to drop: the client discards a broken connection and reconnects by itself."""

    async def close(self) -> None:
        """The client belongs to `Stores`."""


def _columns(devices: list[tuple[int, dict[str, Reading]]]) -> list[bytes]:
    """The script's last three arguments for these devices: no Python step per reading, and
    each distinct time (the readings of a message share one) converted once."""
    chosen = [reading for _, latest in devices for reading in latest.values()]
    stamps = list(map(_timestamp, chosen))
    distinct: dict[datetime, int] = dict.fromkeys(stamps, 0)
    for index, stamp in enumerate(distinct, 1):  # Lua counts from 1
        distinct[stamp] = index
    document = [
        [device_id for device_id, _ in devices],
        [len(latest) for _, latest in devices],
        list(map(_label, chosen)),
        list(map(distinct.__getitem__, stamps)),
        list(distinct),  # orjson writes the ISO text (without ".000000": the script adds it)
    ]
    epochs = list(map(datetime.timestamp, distinct))
    return [orjson.dumps(document), orjson.dumps(list(map(_value, chosen))), orjson.dumps(epochs)]
