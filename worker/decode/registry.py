"""Device metadata: MAC or device key → device, label → datapoint, cached twice.

Lookups go process cache → Redis (`device:mac:{mac}` / `device:key:{key}` hashes
{device_id, user_id, status}, `device:datapoints:{device_id}` label → id and
`device:ranges:{device_id}` label → [min, max], 1 h TTL, shared by every worker) →
PostgreSQL, which is the source of truth. Misses
are fetched for a whole batch at once. A device PostgreSQL does not know is
remembered as unknown for `NEGATIVE_TTL_S`, so a chatty stranger costs one query
per period, not one per message.

Unknown devices are rejected (`reject`, the default) or inserted with their
datapoints (`register`); a known device's unknown label follows the same policy,
up to `pipeline.max_new_datapoints_per_hour` new datapoints per device and hour
(`DatapointBudget`), past which `datapoints` raises `DatapointLimit`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from worker.decode.parse import DeviceRef
from worker.decode.ranges import ValueRange
from worker.stores.keys import RedisKeys

CACHE_TTL_S = 3600
NEGATIVE_TTL_S = 30.0
NEGATIVE_CACHE_MAX = 100_000  # strangers remembered at once; past it, expired ones are purged
# A field of every `device:ranges:{id}` hash, so "no ranges" differs from "written by a
# worker that predates ranges" (a miss). No label can collide: PostgreSQL text holds no NUL.
RANGES_WRITTEN = b"\x00"
BUDGET_WINDOW_S = 3600.0
BUDGET_DEVICES_MAX = 100_000  # devices tracked at once; past it, those idle for an hour are dropped


def _remember_unknown(cache: dict[Any, float], key: Any, now: float) -> None:
    """Remember `key` as unknown until now + NEGATIVE_TTL_S, keeping the cache bounded."""
    if len(cache) >= NEGATIVE_CACHE_MAX:
        for stale in [k for k, expiry in cache.items() if expiry <= now]:
            del cache[stale]
        if len(cache) >= NEGATIVE_CACHE_MAX:
            cache.clear()  # a flood of distinct strangers: forget them, at the cost of queries
    cache[key] = now + NEGATIVE_TTL_S


@dataclass(slots=True)
class Device:
    id: int
    user_id: int | None
    status: str
    datapoints: dict[str, int] = field(default_factory=dict)
    ranges: dict[str, ValueRange] = field(default_factory=dict)  # only labels with a bound
    unknown_labels: dict[str, float] = field(default_factory=dict)  # label → monotonic expiry
    refused_labels: dict[str, float] = field(default_factory=dict)  # over the budget, until expiry

    def absorb(self, rows: Iterable[asyncpg.Record]) -> None:
        """Take datapoint rows (label, id, min_value, max_value) from PostgreSQL."""
        for row in rows:
            label = row["label"]
            self.datapoints[label] = row["id"]
            bounds = ValueRange(row["min_value"], row["max_value"])
            if bounds == (None, None):
                self.ranges.pop(label, None)
            else:
                self.ranges[label] = bounds


class DatapointLimit(Exception):
    """Registering `labels` would take their device past its hourly datapoint budget."""

    def __init__(self, labels: list[str], limit: int) -> None:
        super().__init__(f"{', '.join(labels)}: pipeline.max_new_datapoints_per_hour ({limit}) reached")
        self.labels = labels


class DatapointBudget:
    """How many datapoints each device may still register in a sliding hour.

    With `register`, a typo in a JSON key (`temperatur`) would become a datapoint
    for good; the budget bounds what a buggy or hostile device adds. It lives in
    the process, not in Redis: N workers let one device register up to N × limit
    an hour. The daemon keeps one across pipeline restarts.
    """

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._spent: dict[int, deque[float]] = {}  # device id → when each datapoint was registered

    def fits(self, device_id: int, count: int) -> bool:
        return len(self._recent(device_id, self._clock())) + count <= self.limit

    def spend(self, device_id: int, count: int) -> None:
        now = self._clock()
        if device_id not in self._spent and len(self._spent) >= BUDGET_DEVICES_MAX:
            for idle in [d for d, times in self._spent.items() if not self._recent(d, now)]:
                del self._spent[idle]
        self._spent.setdefault(device_id, deque()).extend([now] * count)

    def _recent(self, device_id: int, now: float) -> deque[float]:
        times = self._spent.get(device_id, deque())
        while times and times[0] <= now - BUDGET_WINDOW_S:
            times.popleft()
        return times


class DeviceRegistry:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis | None,
        keys: RedisKeys,
        register_unknown: bool,
        budget: DatapointBudget,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._register = register_unknown
        self._budget = budget
        self._clock = clock
        self._devices: dict[DeviceRef, Device] = {}
        self._unknown: dict[DeviceRef, float] = {}  # ref → monotonic expiry

    async def resolve(self, refs: Iterable[DeviceRef]) -> dict[DeviceRef, Device]:
        """Known devices among `refs` (registering strangers when the policy says so)."""
        now = self._clock()
        found = {}
        wanted = set()
        for ref in refs:
            device = self._devices.get(ref)
            if device is not None:
                found[ref] = device
            elif self._unknown.get(ref, 0.0) <= now:
                wanted.add(ref)
        if not wanted:
            return found
        loaded = await self._load_from_redis(wanted)
        missing = wanted - loaded.keys()
        if missing:
            from_db = await self._load_from_postgres(missing)
            if self._register and missing - from_db.keys():
                await self._insert_devices(missing - from_db.keys())
                from_db = await self._load_from_postgres(missing)
            await self._store_in_redis(from_db)
            loaded.update(from_db)
            for ref in missing - from_db.keys():
                _remember_unknown(self._unknown, ref, now)
        self._devices.update(loaded)
        found.update(loaded)
        return found

    async def datapoints(self, device: Device, labels: dict[str, str | None]) -> dict[str, int]:
        """Ids of `labels` (label → unit) on `device`; absent labels stay absent unless registered.

        Registers all of a call's new labels or none: DatapointLimit when they do not fit the
        device's budget (and for the next NEGATIVE_TTL_S, without a query)."""
        now = self._clock()
        refused = sorted(label for label in labels if device.refused_labels.get(label, 0.0) > now)
        if refused:
            raise DatapointLimit(refused, self._budget.limit)
        absent = {
            label: unit
            for label, unit in labels.items()
            if label not in device.datapoints and device.unknown_labels.get(label, 0.0) <= now
        }
        if absent:
            # Someone may have added them since we cached the device: look again first.
            device.absorb(await self._fetch_datapoints(device.id))
            absent = {label: unit for label, unit in absent.items() if label not in device.datapoints}
            if absent and self._register:
                if not self._budget.fits(device.id, len(absent)):
                    for label in absent:
                        _remember_unknown(device.refused_labels, label, now)
                    raise DatapointLimit(sorted(absent), self._budget.limit)
                async with self._pool.acquire() as conn:
                    await conn.executemany(
                        "INSERT INTO datapoints (device_id, label, unit) VALUES ($1, $2, $3) "
                        "ON CONFLICT (device_id, label) DO NOTHING",
                        [(device.id, label, unit) for label, unit in absent.items()],
                    )
                # Spent only once inserted: a retried batch (store outage) is not charged twice.
                self._budget.spend(device.id, len(absent))
                device.absorb(await self._fetch_datapoints(device.id))
            for label in absent.keys() - device.datapoints.keys():
                _remember_unknown(device.unknown_labels, label, now)
            if self._redis is not None:
                async with self._redis.pipeline(transaction=False) as pipe:
                    self._cache_datapoints(pipe, device)
                    await pipe.execute()
        return {label: device.datapoints[label] for label in labels if label in device.datapoints}

    async def forget(self) -> None:
        """Drop the process cache (after an outage the database may have changed)."""
        self._devices.clear()
        self._unknown.clear()

    def _ref_key(self, ref: DeviceRef) -> str:
        return self._keys.device_ref(ref.kind, ref.value)

    async def _load_from_redis(self, refs: set[DeviceRef]) -> dict[DeviceRef, Device]:
        if self._redis is None:
            return {}
        ordered = list(refs)
        async with self._redis.pipeline(transaction=False) as pipe:
            for ref in ordered:
                pipe.hgetall(self._ref_key(ref))
            heads = await pipe.execute()
        hits = {ref: head for ref, head in zip(ordered, heads, strict=True) if head}
        if not hits:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for head in hits.values():
                device_id = int(head[b"device_id"])
                pipe.hgetall(self._keys.device_datapoints(device_id))
                pipe.hgetall(self._keys.device_ranges(device_id))
            replies = await pipe.execute()
        devices = {}
        for (ref, head), points, ranges in zip(hits.items(), replies[::2], replies[1::2], strict=True):
            if RANGES_WRITTEN not in ranges:
                continue  # cached without ranges: PostgreSQL has them, if any
            user = head.get(b"user_id", b"")
            devices[ref] = Device(
                id=int(head[b"device_id"]),
                user_id=int(user) if user else None,
                status=head.get(b"status", b"active").decode(),
                datapoints={k.decode(): int(v) for k, v in points.items()},
                ranges={
                    k.decode(): ValueRange(*orjson.loads(v)) for k, v in ranges.items() if k != RANGES_WRITTEN
                },
            )
        return devices

    async def _load_from_postgres(self, refs: set[DeviceRef]) -> dict[DeviceRef, Device]:
        macs = [ref.value for ref in refs if ref.kind == "mac"]
        keys = [ref.value for ref in refs if ref.kind == "key"]
        async with self._pool.acquire() as conn:
            # One row per datapoint (one with NULLs for a device without any).
            rows = await conn.fetch(
                "SELECT d.id AS device_id, d.mac, d.device_key, d.user_id, d.status, "
                "p.label, p.id, p.min_value, p.max_value "
                "FROM devices d LEFT JOIN datapoints p ON p.device_id = d.id "
                "WHERE d.mac = ANY($1::text[]) OR d.device_key = ANY($2::text[])",
                macs,
                keys,
            )
        by_id: dict[int, Device] = {}
        devices = {}
        for row in rows:
            device = by_id.get(row["device_id"])
            if device is None:
                device = by_id[row["device_id"]] = Device(row["device_id"], row["user_id"], row["status"])
                if row["mac"] in macs:
                    devices[DeviceRef("mac", row["mac"])] = device
                if row["device_key"] in keys:
                    devices[DeviceRef("key", row["device_key"])] = device
            if row["id"] is not None:
                device.absorb([row])
        return devices

    async def _fetch_datapoints(self, device_id: int) -> list[asyncpg.Record]:
        async with self._pool.acquire() as conn:
            return await conn.fetch(
                "SELECT label, id, min_value, max_value FROM datapoints WHERE device_id = $1", device_id
            )

    async def _insert_devices(self, refs: set[DeviceRef]) -> None:
        rows: list[tuple[str | None, str, str]] = []
        for ref in refs:
            if ref.kind == "mac":
                rows.append((ref.value, "f2-" + ref.value.replace(":", ""), f"F2 {ref.value}"))
            else:
                rows.append((None, ref.value, ref.value))
        async with self._pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO devices (mac, device_key, name) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                rows,
            )

    async def _store_in_redis(self, devices: dict[DeviceRef, Device]) -> None:
        if self._redis is None or not devices:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for ref, device in devices.items():
                key = self._ref_key(ref)
                head = {
                    "device_id": device.id,
                    "user_id": device.user_id or "",
                    "status": device.status,
                }
                pipe.hset(key, mapping=head)
                pipe.expire(key, CACHE_TTL_S)
                self._cache_datapoints(pipe, device)
            await pipe.execute()

    def _cache_datapoints(self, pipe: Any, device: Device) -> None:
        """Queue the writes of `device:datapoints:{id}` and `device:ranges:{id}` on `pipe`."""
        if device.datapoints:
            points_key = self._keys.device_datapoints(device.id)
            pipe.hset(points_key, mapping={k: str(v) for k, v in device.datapoints.items()})
            pipe.expire(points_key, CACHE_TTL_S)
        ranges_key = self._keys.device_ranges(device.id)
        ranges = {label.encode(): orjson.dumps(list(bounds)) for label, bounds in device.ranges.items()}
        # Replaced whole, so a range removed in PostgreSQL goes from the cache too.
        pipe.delete(ranges_key)
        pipe.hset(ranges_key, mapping={RANGES_WRITTEN: b"1", **ranges})
        pipe.expire(ranges_key, CACHE_TTL_S)
