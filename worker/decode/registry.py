"""Device metadata: MAC or device key → device, label → datapoint, cached twice.

Lookups go process cache (an LRU of `pipeline.device_cache_size` devices, emptied every
`PROCESS_REFRESH_S`) → Redis
(one JSON string per `device:mac:{mac}` / `device:key:{key}`: device_id, user_id,
status, datapoints and ranges, 1 h TTL, shared by every worker) → PostgreSQL, which
is the source of truth. Everything is done for a whole batch at once: one MGET, one
query for the misses, one INSERT for the strangers and one for the datapoints the
batch brings (`add_datapoints`), one script call writing the cache. A device PostgreSQL does
not know is remembered as unknown for `NEGATIVE_TTL_S`, so a chatty stranger costs
one query per period, not one per message.

Redis is only a cache here: when it fails (refused, or slower than `CACHE_TIMEOUT_S`),
PostgreSQL answers alone, with one `registry.cache_unavailable` line, and Redis is
tried again after a backoff (`registry.cache_restored` when it answers), so a Redis
outage does not hold up ingest (docs/storage.md, "Redis is derived").

Unknown devices are rejected (`reject`, the default) or inserted with their
datapoints (`register`); a known device's unknown label follows the same policy,
up to `pipeline.max_new_datapoints_per_hour` new datapoints per device and hour
(`DatapointBudget`), past which a message's labels are refused (`DatapointLimit`).
"""

from __future__ import annotations

import asyncio
import sys
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, TypeVar

import asyncpg
import orjson
import redis.asyncio as aioredis
import structlog

from worker.decode.parse import DeviceRef
from worker.decode.ranges import ValueRange
from worker.retry import Backoff, describe, is_transient
from worker.stores.keys import RedisKeys

log = structlog.get_logger("worker.decode.registry")
T = TypeVar("T")
V = TypeVar("V")

CACHE_TTL_S = 3600
NEGATIVE_TTL_S = 30.0
# The process cache starts afresh this often (s): a change made with `iotflow devices`
# (which deletes the device's Redis entry) or a removal reaches every worker within it.
PROCESS_REFRESH_S = 30.0
NEGATIVE_CACHE_MAX = 100_000  # strangers remembered at once; past it, expired ones are purged
DEVICE_CACHE_SIZE = 100_000  # default of `pipeline.device_cache_size`: devices kept in the process
BUDGET_WINDOW_S = 3600.0
BUDGET_DEVICES_MAX = 100_000  # devices tracked at once; past it, those idle for an hour are dropped
# A cache call slower than this counts as a failed one: a frozen Redis would otherwise hold
# every batch for the client's socket timeout (10 s).
CACHE_TIMEOUT_S = 1.0
CACHE_BACKOFF = Backoff(first_s=1.0, cap_s=30.0)  # how long PostgreSQL answers alone after one
# Devices per query, MGET or cache write: a batch meeting a whole fleet would otherwise hold
# every device's rows (or entries) in memory at once, tens of MB for 20,000 devices.
LOAD_CHUNK = 2000


def _own(mapping: Mapping[str, V]) -> dict[str, V]:
    """A device's own dict (of expiring labels, of ranges), to write to (never the shared empty one)."""
    return mapping if isinstance(mapping, dict) else {}


def _remember_unknown(cache: dict[Any, float], key: Any, now: float) -> None:
    """Remember `key` as unknown until now + NEGATIVE_TTL_S, keeping the cache bounded."""
    if len(cache) >= NEGATIVE_CACHE_MAX:
        for stale in [k for k, expiry in cache.items() if expiry <= now]:
            del cache[stale]
        if len(cache) >= NEGATIVE_CACHE_MAX:
            cache.clear()  # a flood of distinct strangers: forget them, at the cost of queries
    cache[key] = now + NEGATIVE_TTL_S


# What almost every device has of expiring labels and of value ranges; a device gets a dict
# of its own when it has some. A process keeps up to `pipeline.device_cache_size` devices:
# per device, objects count.
_NO_LABELS: Mapping[str, float] = MappingProxyType({})
_NO_RANGES: Mapping[str, ValueRange] = MappingProxyType({})


@dataclass(slots=True)
class Device:
    id: int
    user_id: int | None
    status: str
    datapoints: dict[str, int] = field(default_factory=dict)
    ranges: Mapping[str, ValueRange] = field(default_factory=lambda: _NO_RANGES)  # only labels with a bound
    unknown_labels: Mapping[str, float] = field(default_factory=lambda: _NO_LABELS)  # label → expiry
    refused_labels: Mapping[str, float] = field(default_factory=lambda: _NO_LABELS)  # over the budget
    refs: tuple[DeviceRef, ...] = ()  # how topics named it: its Redis cache entries

    def absorb(self, rows: Iterable[asyncpg.Record]) -> None:
        """Take datapoint rows (label, id, min_value, max_value) from PostgreSQL."""
        for row in rows:
            label = sys.intern(row["label"])  # asyncpg makes each row's string anew
            self.datapoints[label] = row["id"]
            bounds = ValueRange(row["min_value"], row["max_value"])
            if bounds != (None, None):
                self.ranges = ranges = _own(self.ranges)
                ranges[label] = bounds
            elif label in self.ranges:  # so the device has a dict of its own
                self.ranges = ranges = _own(self.ranges)
                del ranges[label]


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
        # device id → when each datapoint was registered, oldest first (a list: a deque is
        # 600 bytes, and first contact with a fleet puts every device here)
        self._spent: dict[int, list[float]] = {}

    def fits(self, device_id: int, count: int) -> bool:
        return len(self._recent(device_id, self._clock())) + count <= self.limit

    def spend(self, device_id: int, count: int) -> None:
        now = self._clock()
        if device_id not in self._spent and len(self._spent) >= BUDGET_DEVICES_MAX:
            for idle in [d for d, times in self._spent.items() if not self._recent(d, now)]:
                del self._spent[idle]
        self._spent.setdefault(device_id, []).extend([now] * count)

    def _recent(self, device_id: int, now: float) -> list[float]:
        times = self._spent.get(device_id)
        if not times:
            return []
        del times[: bisect_right(times, now - BUDGET_WINDOW_S)]
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
        cache_size: int = DEVICE_CACHE_SIZE,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._set_entries = redis.register_script(_SET_ENTRIES) if redis is not None else None
        self._keys = keys
        self._register = register_unknown
        self._budget = budget
        self._clock = clock
        self._cache_size = cache_size
        self._devices: OrderedDict[DeviceRef, Device] = OrderedDict()  # least recently used first
        self._unknown: dict[DeviceRef, float] = {}  # ref → monotonic expiry
        self._fresh: set[int] = set()  # devices the last `resolve` read from PostgreSQL
        self._cache_failures = 0  # Redis failures in a row
        self._cache_retry_at = 0.0  # monotonic time before which Redis is not asked
        self._refresh_at = clock() + PROCESS_REFRESH_S

    async def resolve(self, refs: Iterable[DeviceRef]) -> dict[DeviceRef, Device]:
        """Known devices among `refs` (registering strangers when the policy says so)."""
        now = self._clock()
        if now >= self._refresh_at:
            self._devices.clear()  # re-read from Redis: one MGET per batch for its devices
            self._refresh_at = now + PROCESS_REFRESH_S
        cached = self._devices
        found = {}
        wanted = set()
        self._fresh = set()
        for ref in refs:
            device = cached.get(ref)
            if device is not None:
                found[ref] = device
                cached.move_to_end(ref)
            elif self._unknown.get(ref, 0.0) <= now:
                wanted.add(ref)
        if not wanted:
            return found
        loaded = await self._load_from_redis(wanted)
        missing = wanted - loaded.keys()
        if missing:
            from_db = await self._load_from_postgres(missing)
            strangers = missing - from_db.keys()
            if self._register and strangers:
                from_db.update(await self._insert_devices(strangers))
            self._fresh = {device.id for device in from_db.values()}
            await self._store_in_redis(from_db.values())
            loaded.update(from_db)
            for ref in missing - from_db.keys():
                _remember_unknown(self._unknown, ref, now)
        cached.update(loaded)
        while len(cached) > self._cache_size:
            cached.popitem(last=False)
        found.update(loaded)
        return found

    async def datapoints(self, device: Device, labels: dict[str, str | None]) -> dict[str, int]:
        """Ids of `labels` (label → unit) on `device`; absent labels stay absent unless registered.

        Registers all of a call's new labels or none: DatapointLimit when they do not fit the
        device's budget (and for the next NEGATIVE_TTL_S, without a query)."""
        (limit,) = await self.add_datapoints([(device, labels)])
        if limit is not None:
            raise limit
        return {label: device.datapoints[label] for label in labels if label in device.datapoints}

    async def add_datapoints(
        self, requests: Sequence[tuple[Device, Mapping[str, str | None]]]
    ) -> list[DatapointLimit | None]:
        """Look up (and under `register`, insert) the labels of many messages at once.

        `requests` holds each message's device and labels (label → unit), in arrival order;
        each is judged as `datapoints` would judge it after the ones before it, but the whole
        batch costs one SELECT, one INSERT and one Redis call. Found ids land in
        `device.datapoints`; the answer says, per request, whether it went over the budget."""
        now = self._clock()
        stale = {}  # devices whose datapoints PostgreSQL may know better than this process
        for device, labels in requests:
            if device.id not in stale and _absent(device, labels, now):
                stale[device.id] = device
        if not stale:
            return [self._refused(device, labels, now) for device, labels in requests]
        recheck = [device_id for device_id in stale if device_id not in self._fresh]
        if recheck:
            # Someone may have added them since we cached the device: look again first.
            await self._refresh(recheck, stale)
        results: list[DatapointLimit | None] = []
        planned: dict[int, dict[str, str | None]] = {}
        for device, labels in requests:
            refused = self._refused(device, labels, now)
            if refused is not None or not self._register:
                results.append(refused)
                continue
            plan = planned.setdefault(device.id, {})
            new = {label: unit for label, unit in _absent(device, labels, now).items() if label not in plan}
            if new and not self._budget.fits(device.id, len(plan) + len(new)):
                device.refused_labels = over = _own(device.refused_labels)
                for label in new:
                    _remember_unknown(over, label, now)
                results.append(DatapointLimit(sorted(new), self._budget.limit))
                continue
            plan.update(new)
            results.append(None)
        if any(planned.values()):
            await self._insert_datapoints(planned, stale)
        for device, labels in requests:
            if labels.keys() - device.datapoints.keys():  # rare: a label still unknown
                device.unknown_labels = unknown = _own(device.unknown_labels)
                for label in _absent(device, labels, now):
                    _remember_unknown(unknown, label, now)
        await self._store_in_redis(stale.values())
        return results

    def _refused(self, device: Device, labels: Mapping[str, str | None], now: float) -> DatapointLimit | None:
        refused = sorted(label for label in labels if device.refused_labels.get(label, 0.0) > now)
        return DatapointLimit(refused, self._budget.limit) if refused else None

    async def _refresh(self, device_ids: list[int], devices: dict[int, Device]) -> None:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT device_id, label, id, min_value, max_value FROM datapoints "
                "WHERE device_id = ANY($1::int[])",
                device_ids,
            )
        for row in rows:
            devices[row["device_id"]].absorb([row])

    async def _insert_datapoints(
        self, planned: dict[int, dict[str, str | None]], devices: dict[int, Device]
    ) -> None:
        device_ids = [device_id for device_id, plan in planned.items() for _ in plan]
        labels = [label for plan in planned.values() for label in plan]
        units = [unit for plan in planned.values() for unit in plan.values()]
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_INSERT_DATAPOINTS, device_ids, labels, units)
            if len(rows) < len(labels):  # another worker inserted some first: read those back
                rows = await conn.fetch(
                    "SELECT device_id, label, id, min_value, max_value FROM datapoints "
                    "WHERE device_id = ANY($1::int[])",
                    list(planned),
                )
        for row in rows:
            devices[row["device_id"]].absorb([row])
        for device_id, plan in planned.items():
            if plan:
                # Spent only once inserted: a retried batch (store outage) is not charged twice.
                self._budget.spend(device_id, len(plan))

    async def forget(self) -> None:
        """Drop the process cache (after an outage the database may have changed)."""
        self._devices.clear()
        self._unknown.clear()
        self._fresh = set()

    async def reread(self) -> int:
        """Forget every device here and in the shared Redis cache, so that each is read from
        PostgreSQL again (a datapoint's range changed); the Redis entries dropped. A Redis
        that is away keeps its entries until their TTL: one line says so."""
        await self.forget()
        redis = self._redis
        if redis is None:
            return 0
        dropped = 0
        try:
            for kind in ("mac", "key"):
                keys = [
                    key async for key in redis.scan_iter(match=self._keys.device_ref(kind, "*"), count=1000)
                ]
                for start in range(0, len(keys), LOAD_CHUNK):
                    dropped += await redis.unlink(*keys[start : start + LOAD_CHUNK])
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("registry.cache_kept", error=describe(exc), hint="its entries expire within an hour")
        return dropped

    def _ref_key(self, ref: DeviceRef) -> str:
        return self._keys.device_ref(ref.kind, ref.value)

    async def _cached(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """`call` on Redis; None when Redis is away (then PostgreSQL answers alone until the
        backoff ends). A non-transient error is a bug and propagates."""
        if self._clock() < self._cache_retry_at:
            return None
        try:
            async with asyncio.timeout(CACHE_TIMEOUT_S):
                result = await call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._cache_failures += 1
            delay = CACHE_BACKOFF.delay(self._cache_failures)
            self._cache_retry_at = self._clock() + delay
            if self._cache_failures == 1:
                log.warning("registry.cache_unavailable", error=describe(exc), retry_in_s=round(delay, 1))
            return None
        if self._cache_failures:
            log.info("registry.cache_restored", failures=self._cache_failures)
            self._cache_failures = 0
        return result

    async def _load_from_redis(self, refs: set[DeviceRef]) -> dict[DeviceRef, Device]:
        redis = self._redis
        if redis is None:
            return {}
        devices: dict[DeviceRef, Device] = {}
        ordered = list(refs)
        for start in range(0, len(ordered), LOAD_CHUNK):
            chunk = ordered[start : start + LOAD_CHUNK]
            entries = await self._cached(partial(redis.mget, [self._ref_key(ref) for ref in chunk]))
            if entries is None:
                break  # Redis is away: PostgreSQL answers for the rest
            devices.update(_devices_from_entries(chunk, entries))
        return devices

    async def _load_from_postgres(self, refs: set[DeviceRef]) -> dict[DeviceRef, Device]:
        wanted = _by_value(refs)
        macs, keys = list(wanted["mac"]), list(wanted["key"])
        devices = {}
        async with self._pool.acquire() as conn:
            for start in range(0, max(len(macs), len(keys)), LOAD_CHUNK):
                end = start + LOAD_CHUNK
                rows = await conn.fetch(_SELECT_DEVICES, macs[start:end], keys[start:end])
                devices.update(_devices_from_rows(rows, wanted))
        return devices

    async def _insert_devices(self, refs: set[DeviceRef]) -> dict[DeviceRef, Device]:
        """Insert the strangers in one statement; those another worker inserted first are read."""
        macs: list[str | None] = []
        keys: list[str] = []
        names: list[str] = []
        for ref in refs:
            if ref.kind == "mac":
                macs.append(ref.value)
                keys.append("f2-" + ref.value.replace(":", ""))
                names.append(f"F2 {ref.value}")
            else:
                macs.append(None)
                keys.append(ref.value)
                names.append(ref.value)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_INSERT_DEVICES, macs, keys, names)
        devices = _devices_from_rows(rows, _by_value(refs))
        lost = refs - devices.keys()
        if lost:
            devices.update(await self._load_from_postgres(lost))
        return devices

    async def _store_in_redis(self, devices: Iterable[Device]) -> None:
        """Write the cache entries of `devices` (each one JSON string per ref, replaced whole,
        so a range removed in PostgreSQL goes from the cache too), a script call per chunk."""
        script = self._set_entries
        if script is None:
            return
        ordered = list(devices)
        for start in range(0, len(ordered), LOAD_CHUNK):
            keys: list[str] = []
            entries: list[bytes] = []
            for device in ordered[start : start + LOAD_CHUNK]:
                entry = _cache_entry(device)
                for ref in device.refs:
                    keys.append(self._ref_key(ref))
                    entries.append(entry)
            if keys and await self._cached(partial(script, keys=keys, args=[CACHE_TTL_S, *entries])) is None:
                return  # Redis is away


# SET with a TTL for many keys at once: MSET has no TTL, and a pipeline costs redis-py a
# command (and a reply to parse) per key.
_SET_ENTRIES = """
for i, key in ipairs(KEYS) do
    redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
end
return #KEYS
"""
# One row per device, its datapoints as arrays: PostgreSQL aggregates them in C, and the
# process builds a device's labels with one dict(zip()) instead of a Python step per row.
# Aggregates of one query level read the rows in one order, so the arrays line up.
_SELECT_DEVICES = """
SELECT d.id AS device_id, d.mac, d.device_key, d.user_id, d.status,
       coalesce(array_agg(p.label) FILTER (WHERE p.id IS NOT NULL), '{}') AS labels,
       coalesce(array_agg(p.id) FILTER (WHERE p.id IS NOT NULL), '{}') AS ids,
       coalesce(array_agg(p.label) FILTER (WHERE p.bounded), '{}') AS bounded,
       coalesce(array_agg(p.min_value) FILTER (WHERE p.bounded), '{}') AS mins,
       coalesce(array_agg(p.max_value) FILTER (WHERE p.bounded), '{}') AS maxs
FROM devices d
LEFT JOIN (SELECT *, min_value IS NOT NULL OR max_value IS NOT NULL AS bounded FROM datapoints) p
       ON p.device_id = d.id
WHERE d.mac = ANY($1::text[]) OR d.device_key = ANY($2::text[])
GROUP BY d.id
"""
_INSERT_DEVICES = """
INSERT INTO devices (mac, device_key, name)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT DO NOTHING
RETURNING id AS device_id, mac, device_key, user_id, status,
          '{}'::text[] AS labels, '{}'::int[] AS ids,
          '{}'::text[] AS bounded, '{}'::float8[] AS mins, '{}'::float8[] AS maxs
"""
_INSERT_DATAPOINTS = """
INSERT INTO datapoints (device_id, label, unit)
SELECT * FROM unnest($1::int[], $2::text[], $3::text[])
ON CONFLICT (device_id, label) DO NOTHING
RETURNING device_id, label, id, min_value, max_value
"""


def _absent(
    device: Device, labels: Iterable[str] | Mapping[str, str | None], now: float
) -> dict[str, str | None]:
    """The labels `device` lacks that are not remembered as unknown or refused (label → unit)."""
    units = labels if isinstance(labels, Mapping) else dict.fromkeys(labels)
    return {
        label: unit
        for label, unit in units.items()
        if label not in device.datapoints
        and device.unknown_labels.get(label, 0.0) <= now
        and device.refused_labels.get(label, 0.0) <= now
    }


def _cache_entry(device: Device) -> bytes:
    """What `_devices_from_entries` reads back."""
    return orjson.dumps(
        {
            "device_id": device.id,
            "user_id": device.user_id,
            "status": device.status,
            "datapoints": device.datapoints,
            "ranges": {label: list(bounds) for label, bounds in device.ranges.items()},
        }
    )


def _devices_from_entries(refs: list[DeviceRef], entries: list[bytes | None]) -> dict[DeviceRef, Device]:
    """Devices from their Redis cache entries (`refs[i]`'s entry is `entries[i]`)."""
    devices = {}
    for ref, entry in zip(refs, entries, strict=True):
        if not entry or entry[:1] != b"{":
            continue  # absent, or a hash a worker before 2026-12-02 wrote: PostgreSQL has it
        cached = orjson.loads(entry)
        bounds = cached["ranges"]  # mostly empty
        ranges = {label: ValueRange(*pair) for label, pair in bounds.items()} if bounds else _NO_RANGES
        devices[ref] = Device(
            cached["device_id"],
            cached["user_id"],
            sys.intern(cached["status"]),  # one "active" for the fleet, not one each
            cached["datapoints"],
            ranges,
            refs=(ref,),
        )
    return devices


def _by_value(refs: Iterable[DeviceRef]) -> dict[str, dict[str, DeviceRef]]:
    """The refs by kind and value: a row names its device by MAC and key."""
    wanted: dict[str, dict[str, DeviceRef]] = {"mac": {}, "key": {}}
    for ref in refs:
        wanted[ref.kind][ref.value] = ref
    return wanted


def _devices_from_rows(
    rows: Iterable[asyncpg.Record], wanted: dict[str, dict[str, DeviceRef]]
) -> dict[DeviceRef, Device]:
    """Devices from rows of `_SELECT_DEVICES`, under each of the refs asked for (`wanted`,
    by kind and value) that names them: the very objects the topics hold, so the cache
    stores no second copy and its lookups compare by identity."""
    macs, keys = wanted["mac"], wanted["key"]
    devices = {}
    for device_id, mac, key, user_id, status, labels, ids, bounded, mins, maxs in rows:
        ranges: Mapping[str, ValueRange] = (
            {label: ValueRange(low, high) for label, low, high in zip(bounded, mins, maxs, strict=True)}
            if bounded
            else _NO_RANGES
        )
        # Interned: asyncpg makes each device's label strings anew, 20,000 devices' "temperature"
        # 20,000 strings (orjson, reading the Redis entries, shares them by itself).
        datapoints = dict(zip(map(sys.intern, labels), ids, strict=True))
        device = Device(device_id, user_id, sys.intern(status), datapoints, ranges)
        for ref in (macs.get(mac), keys.get(key)):
            if ref is not None:
                devices[ref] = device
                device.refs += (ref,)
    return devices
