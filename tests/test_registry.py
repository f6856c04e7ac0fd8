"""The registry: a bounded negative cache, datapoint ranges through both caches, the registration cap."""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlparse

import asyncpg
import pytest

from tests.tcpproxy import TcpProxy
from worker.config import Settings
from worker.decode import registry
from worker.decode.parse import DeviceRef
from worker.decode.ranges import ValueRange
from worker.decode.registry import DatapointBudget, DatapointLimit, Device, DeviceRegistry
from worker.stores import Stores
from worker.stores.redis import redis_client


def test_a_device_takes_ranges_from_datapoint_rows_and_gives_them_back() -> None:
    def row(label: str, low: float | None, high: float | None) -> dict[str, object]:
        return {"label": label, "id": len(label), "min_value": low, "max_value": high}

    first, second = Device(1, None, "active"), Device(2, None, "active")
    first.absorb([row("t", -40.0, 85.0), row("h", None, None)])  # type: ignore[list-item]
    assert (first.datapoints, first.ranges) == ({"t": 1, "h": 1}, {"t": ValueRange(-40.0, 85.0)})
    assert second.ranges == {}  # the empty ranges every device starts with are not shared out
    first.absorb([row("h", 0.0, 100.0)])  # type: ignore[list-item]
    assert first.ranges == {"t": ValueRange(-40.0, 85.0), "h": ValueRange(0.0, 100.0)}
    first.absorb([row("t", None, None), row("h", None, None)])  # type: ignore[list-item]
    assert first.ranges == {} and first.datapoints == {"t": 1, "h": 1}
    assert second.ranges == {}


def test_negative_cache_purges_expired_entries_and_caps_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "NEGATIVE_CACHE_MAX", 100)
    cache: dict[str, float] = {}
    for n in range(100):
        registry._remember_unknown(cache, f"old{n}", now=0.0)  # expire at 30.0
    registry._remember_unknown(cache, "new", now=100.0)
    assert list(cache) == ["new"]  # the expired hundred went

    for n in range(99):
        registry._remember_unknown(cache, f"live{n}", now=100.0)
    registry._remember_unknown(cache, "one-too-many", now=100.0)
    assert len(cache) <= 100


async def test_datapoint_ranges_load_from_postgres_and_ride_the_redis_cache(
    stores: Stores, pg: asyncpg.Connection
) -> None:
    device_id = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'sim-json-01'")
    await pg.execute(
        "UPDATE datapoints SET min_value = 2, max_value = 4.5 WHERE device_id = $1 AND label = 'battery'",
        device_id,
    )
    await pg.execute(
        "UPDATE datapoints SET min_value = -40 WHERE device_id = $1 AND label = 'temperature'", device_id
    )
    ref = DeviceRef("key", "sim-json-01")
    expected = {"battery": (2.0, 4.5), "temperature": (-40.0, None)}

    def fresh() -> DeviceRegistry:  # a new process: empty process cache, shared Redis
        return DeviceRegistry(
            stores.postgres, stores.redis, stores.keys, register_unknown=False, budget=DatapointBudget(20)
        )

    assert (await fresh().resolve([ref]))[ref].ranges == expected
    # PostgreSQL changes behind the cache: a second process still gets the ranges, from Redis.
    await pg.execute("UPDATE datapoints SET min_value = NULL, max_value = NULL")
    assert (await fresh().resolve([ref]))[ref].ranges == expected
    # An entry in an older worker's layout (a hash, without ranges) is a miss, not "no ranges".
    old_layout = stores.keys.device_ref("key", "sim-json-01")
    await stores.redis.delete(old_layout)
    await stores.redis.hset(old_layout, mapping={"device_id": device_id, "user_id": "", "status": "active"})
    assert (await fresh().resolve([ref]))[ref].ranges == {}


async def test_a_device_loads_from_postgres_with_every_datapoint_or_none(
    stores: Stores, pg: asyncpg.Connection
) -> None:
    await pg.execute("INSERT INTO devices (device_key, name) VALUES ('bare-01', 'no datapoints')")
    known = await pg.fetch(
        "SELECT p.label, p.id FROM datapoints p JOIN devices d ON d.id = p.device_id "
        "WHERE d.device_key = 'sim-json-01'"
    )
    assert len(known) > 1
    full, bare, stranger = DeviceRef("key", "sim-json-01"), DeviceRef("key", "bare-01"), DeviceRef("key", "x")
    devices = await DeviceRegistry(
        stores.postgres, None, stores.keys, register_unknown=False, budget=DatapointBudget(20)
    ).resolve([full, bare, stranger])
    assert devices.keys() == {full, bare}
    assert devices[full].datapoints == {row["label"]: row["id"] for row in known}
    assert (devices[bare].datapoints, devices[bare].ranges, devices[bare].refs) == ({}, {}, (bare,))


@pytest.mark.parametrize(
    ("low", "high"), [(float("nan"), None), (None, float("inf")), (5.0, 1.0), (float("-inf"), 0.0)]
)
async def test_datapoints_refuse_unusable_ranges(pg: asyncpg.Connection, low: object, high: object) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute("UPDATE datapoints SET min_value = $1, max_value = $2", low, high)


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_datapoint_budget_is_a_sliding_hour_per_device() -> None:
    clock = FakeClock()
    budget = DatapointBudget(3, clock=clock)
    assert budget.fits(1, 2)
    budget.spend(1, 2)
    assert not budget.fits(1, 2)  # all or nothing: two do not fit in the one left
    assert budget.fits(1, 1) and budget.fits(2, 3)  # another device has its own
    clock.now += 1800
    budget.spend(1, 1)
    assert not budget.fits(1, 1)
    clock.now += 1800  # the first two are an hour old now
    assert budget.fits(1, 2) and not budget.fits(1, 3)
    clock.now += 1800
    assert budget.fits(1, 3)


async def test_registration_beyond_the_budget_raises_and_inserts_nothing(
    stores: Stores, pg: asyncpg.Connection
) -> None:
    clock = FakeClock()
    budget = DatapointBudget(2, clock=clock)
    registry = DeviceRegistry(
        stores.postgres, stores.redis, stores.keys, register_unknown=True, budget=budget, clock=clock
    )
    ref = DeviceRef("key", "sim-json-01")
    device = (await registry.resolve([ref]))[ref]
    before = await pg.fetchval("SELECT count(*) FROM datapoints WHERE device_id = $1", device.id)

    assert set(await registry.datapoints(device, {"temperatur": None, "temperature": "°C"})) == {
        "temperatur",
        "temperature",
    }
    with pytest.raises(DatapointLimit, match="humidty, temprature"):
        await registry.datapoints(device, {"temprature": None, "humidty": None})
    assert await pg.fetchval("SELECT count(*) FROM datapoints WHERE device_id = $1", device.id) == before + 1
    # Refused labels are remembered: the next message with them costs no query, and fails alike.
    with pytest.raises(DatapointLimit, match="temprature"):
        await registry.datapoints(device, {"temprature": None})

    clock.now += 3600  # an hour later the device may register again
    assert "temprature" in await registry.datapoints(device, {"temprature": None})


async def test_only_a_device_with_refused_labels_holds_a_dict_of_them(stores: Stores) -> None:
    """A cached device costs memory: the expiring labels most devices never have are one
    shared empty mapping, which nothing writes to."""
    registry = DeviceRegistry(
        stores.postgres, stores.redis, stores.keys, register_unknown=True, budget=DatapointBudget(1)
    )
    refs = [DeviceRef("key", "sim-json-01"), DeviceRef("key", "sim-json-02")]
    first, second = (await registry.resolve(refs))[refs[0]], (await registry.resolve(refs))[refs[1]]
    assert first.refused_labels is second.refused_labels and not first.refused_labels
    with pytest.raises(DatapointLimit):
        await registry.datapoints(first, {"typo1": None, "typo2": None})
    assert set(first.refused_labels) == {"typo1", "typo2"}
    assert not second.refused_labels and not second.unknown_labels and not first.unknown_labels


async def test_a_batch_of_strangers_and_their_datapoints_is_registered_at_once(
    stores: Stores, pg: asyncpg.Connection
) -> None:
    clock = FakeClock()
    registry = DeviceRegistry(
        stores.postgres,
        stores.redis,
        stores.keys,
        register_unknown=True,
        budget=DatapointBudget(3),
        clock=clock,
    )
    refs = [DeviceRef("mac", f"aa:bb:cc:00:00:{n:02x}") for n in range(50)] + [DeviceRef("key", "new-json")]
    devices = await registry.resolve(refs)
    assert set(devices) == set(refs)
    stored = await pg.fetch(
        "SELECT id, mac, device_key FROM devices WHERE id = ANY($1::int[])", [d.id for d in devices.values()]
    )
    assert {row["mac"] or row["device_key"] for row in stored} == {ref.value for ref in refs}

    first, second = devices[refs[0]], devices[refs[1]]
    limits = await registry.add_datapoints(
        [
            (first, {"room1.temperature": "°C", "room1.humidity": "%"}),
            (second, {"a": None}),
            (first, {"room1.humidity": "%", "room1.pressure": "hPa"}),  # one new: fits the 3
            (first, {"room1.co2": None}),  # a fourth: over the budget, refused alone
        ]
    )
    assert limits[:3] == [None, None, None]
    assert isinstance(limits[3], DatapointLimit) and limits[3].labels == ["room1.co2"]
    assert set(first.datapoints) == {"room1.temperature", "room1.humidity", "room1.pressure"}
    rows = await pg.fetch(
        "SELECT device_id, label, unit, id FROM datapoints WHERE device_id = ANY($1::int[])",
        [first.id, second.id],
    )
    assert {(r["device_id"], r["label"], r["unit"]) for r in rows} == {
        (first.id, "room1.temperature", "°C"),
        (first.id, "room1.humidity", "%"),
        (first.id, "room1.pressure", "hPa"),
        (second.id, "a", None),
    }
    assert {r["label"]: r["id"] for r in rows if r["device_id"] == first.id} == first.datapoints

    # Another process finds all of it in Redis: one hash per device, nothing else per device.
    other = DeviceRegistry(
        stores.postgres, stores.redis, stores.keys, register_unknown=False, budget=DatapointBudget(3)
    )
    again = await other.resolve(refs[:2])
    assert again[refs[0]].datapoints == first.datapoints and again[refs[1]].datapoints == second.datapoints
    assert await stores.redis.ttl(stores.keys.device_ref("mac", refs[0].value)) > 0
    keys = [key.decode() async for key in stores.redis.scan_iter(f"{stores.keys.prefix}*")]
    assert sorted(keys) == sorted(stores.keys.device_ref(ref.kind, ref.value) for ref in refs)


async def test_the_process_cache_keeps_the_most_recently_used_devices(stores: Stores) -> None:
    registry = DeviceRegistry(
        stores.postgres, None, stores.keys, register_unknown=False, budget=DatapointBudget(20), cache_size=2
    )
    a, b, c = (DeviceRef("key", f"sim-json-0{n}") for n in (1, 2, 3))
    first = await registry.resolve([a, b])
    await registry.resolve([a])  # a is now the most recently used
    await registry.resolve([c])  # so b goes
    assert (await registry.resolve([a]))[a] is first[a]  # still the cached object
    assert (await registry.resolve([b]))[b] is not first[b]  # read again from PostgreSQL


@pytest.mark.parametrize("outage", ["frozen", "refused"])
async def test_a_redis_outage_leaves_lookups_to_postgres_until_redis_answers(
    stores: Stores, settings: Settings, outage: str
) -> None:
    """Redis is a cache for the registry: while it hangs or refuses, PostgreSQL answers alone
    (no lookup waits for Redis past CACHE_TIMEOUT_S, none retries it before the backoff ends),
    and once Redis answers again the entries are written there."""
    parsed = urlparse(settings.redis.url)
    proxy = TcpProxy(parsed.hostname or "127.0.0.1", parsed.port or 6379)
    await proxy.start()
    client = redis_client(
        replace(settings.redis, url=f"redis://127.0.0.1:{proxy.port}/{parsed.path[1:] or 0}")
    )
    clock = FakeClock()
    devices = DeviceRegistry(
        stores.postgres, client, stores.keys, register_unknown=False, budget=DatapointBudget(20), clock=clock
    )
    first, second = DeviceRef("key", "sim-json-01"), DeviceRef("key", "sim-json-02")
    try:
        await devices.resolve([DeviceRef("key", "sim-json-03")])  # connected while Redis was up
        proxy.freeze() if outage == "frozen" else proxy.cut()
        assert first in await devices.resolve([first])  # from PostgreSQL, Redis given up on
        connections = proxy.accepted
        assert (await devices.resolve([second]))[second].datapoints
        assert proxy.accepted == connections  # within the backoff Redis is not asked
        assert not await stores.redis.exists(stores.keys.device_ref("key", "sim-json-01"))

        proxy.thaw() if outage == "frozen" else await proxy.restore()
        clock.now += registry.CACHE_BACKOFF.cap_s  # the backoff is over
        await devices.forget()  # a new lookup, not the process cache
        assert first in await devices.resolve([first])
        assert await stores.redis.exists(stores.keys.device_ref("key", "sim-json-01"))  # cached again
    finally:
        await client.aclose()
        await proxy.stop()
