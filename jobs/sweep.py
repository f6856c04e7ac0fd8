"""The offline sweep: devices silent longer than they are allowed are marked offline.

A device is silent when its `last_seen` is older than `devices.max_silence_s` (else
`jobs.default_max_silence_s`). For each one, in this order, every step idempotent so a
retry after a failure half way redoes only what is missing:

1. Redis: status hash → offline, device out of `devices:online` — in one script that
   first checks the online set's score, so a device whose fresh data the writer recorded
   a moment ago is left online (and skipped below);
2. an `event_logs` document `device.status_changed`, keyed by device and `last_seen`, so
   one silence gives one event however often it is swept;
3. PostgreSQL `devices.is_online = false`, last: until it commits, the next sweep still
   sees the device as online and redoes 1 and 2 (no-ops by then).

Offline *alerts* are the rules actor's job; the sweep only records status.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jobs.context import JobResources
from worker.stores.keys import STATUS_TTL_S

EVENT_TYPE = "device.status_changed"

_SILENT = """
SELECT id, user_id, last_seen, coalesce(max_silence_s, $1) AS allowed_s
FROM devices
WHERE is_online AND last_seen < $2::timestamptz - make_interval(secs => coalesce(max_silence_s, $1))
ORDER BY id
"""

_MARK_OFFLINE = """
UPDATE devices SET is_online = false, updated_at = now()
WHERE id = ANY($1::integer[]) AND is_online
  AND last_seen < $2::timestamptz - make_interval(secs => coalesce(max_silence_s, $3))
"""

# KEYS: status hash, online set. ARGV: device id, cutoff (epoch s), last_seen (ISO), TTL.
_REDIS_OFFLINE = """
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if score and tonumber(score) > tonumber(ARGV[2]) then
    return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'offline', 'is_online', 0, 'last_seen', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


@dataclass
class SweepResult:
    silent: int  # candidates found in PostgreSQL
    marked: list[int]  # devices marked offline
    events: int  # event documents written by this sweep


async def sweep_offline(res: JobResources, now: datetime) -> SweepResult:
    default_s = res.settings.jobs.default_max_silence_s
    silent = await res.pool.fetch(_SILENT, default_s, now)
    if not silent:
        return SweepResult(0, [], 0)
    script = res.redis.register_script(_REDIS_OFFLINE)
    keys = res.keys
    async with res.redis.pipeline(transaction=False) as pipe:
        for row in silent:
            cutoff = now.timestamp() - row["allowed_s"]
            await script(
                keys=[keys.device_status(row["id"]), keys.devices_online()],
                args=[row["id"], cutoff, row["last_seen"].isoformat(), STATUS_TTL_S],
                client=pipe,
            )
        confirmed = await pipe.execute()
    marked = [row for row, ok in zip(silent, confirmed, strict=True) if ok]
    new = await res.docs.insert_many("event_logs", {_event_key(row): _event(row, now) for row in marked})
    events = len(new)
    await res.pool.execute(_MARK_OFFLINE, [row["id"] for row in marked], now, default_s)
    return SweepResult(len(silent), [row["id"] for row in marked], events)


def _event_key(row: Any) -> str:
    return f"{EVENT_TYPE}:{row['id']}:{row['last_seen'].timestamp():.6f}"


def _event(row: Any, now: datetime) -> dict[str, Any]:
    return {
        "event_type": EVENT_TYPE,
        "device_id": row["id"],
        "user_id": row["user_id"],
        "timestamp": now,
        "created_at": now,
        "details": {
            "from": "online",
            "to": "offline",
            "last_seen": row["last_seen"],
            "max_silence_s": row["allowed_s"],
        },
        "metadata": {"source": "jobs.offline_sweep"},
    }
