"""The device registry in PostgreSQL: add devices with their datapoints, find, list, remove.

The one way to put a device and its datapoints (units, plausible ranges) into
`devices` and `datapoints`: `iotflow devices add|import` and the simulator's
`--register` both call `add_devices`. Adding is idempotent on the device key: what
is stored empty (a MAC, a user, a datapoint, a unit, a range) is filled in, what is
already there and differs is a `DeviceConflict` and nothing is written. Every
command that takes a device finds it with `find_device` (an id, a key or a MAC).

After a change the daemon's Redis cache entries of the device are deleted
(`forget_cached`): workers read it afresh from PostgreSQL at their next process-cache
refresh (worker/decode/registry.py, `PROCESS_REFRESH_S`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from worker.stores.keys import RedisKeys
from worker.stores.postgres import Connection

_MAC_SEPARATORS = str.maketrans("", "", ":-.")
_MAC_DIGITS = re.compile("[0-9a-f]{12}")
INT4_MAX = 2**31 - 1  # `devices.id` is a serial
MAX_UNIT_CHARS = 32


def canonical_mac(text: str) -> str | None:
    """`AA-BB-CC-DD-EE-01`, `aabbccddee01` … → `aa:bb:cc:dd:ee:01`, as `devices.mac` keeps
    it; None when `text` is no MAC address. In C: the decoder calls it once per new topic."""
    d = text.lower().translate(_MAC_SEPARATORS)
    if _MAC_DIGITS.fullmatch(d) is None:
        return None
    return f"{d[0:2]}:{d[2:4]}:{d[4:6]}:{d[6:8]}:{d[8:10]}:{d[10:12]}"


class BadSpec(ValueError):
    """A device or datapoint description that cannot be stored as given."""


class DeviceConflict(ValueError):
    """`add_devices` met a device that contradicts one stored (or one earlier in the same
    call); `index` is the position of the offending spec. Nothing was written."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(problem)
        self.index = index


class UnknownDevice(LookupError):
    def __init__(self, ref: str) -> None:
        super().__init__(f"unknown device {ref}")
        self.ref = ref


# --- what a device is, checked -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatapointSpec:
    label: str
    unit: str | None = None
    low: float | None = None
    high: float | None = None

    @property
    def bounded(self) -> bool:
        return self.low is not None or self.high is not None


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    key: str
    mac: str | None = None
    name: str | None = None  # the key when the device is new and none is given
    user: str | None = None  # a username; created when there is none by that name
    datapoints: tuple[DatapointSpec, ...] = ()


def _plain(text: str, what: str) -> str:
    if not text or text != text.strip() or not text.isprintable():
        raise BadSpec(f"{what} {text!r} must be printable text without surrounding spaces")
    return text


def parse_key(text: str) -> str:
    """A device key is one MQTT topic level (`devices/{key}/telemetry`) and not a number,
    which would read as a device id."""
    key = _plain(text, "device key")
    if any(char in key for char in "/+#"):
        raise BadSpec(f"device key {key!r} may not contain '/', '+' or '#' (it is a topic level)")
    if key.isdigit():
        raise BadSpec(f"device key {key!r} may not be a number (it would read as a device id)")
    return key


def parse_mac(text: str) -> str:
    mac = canonical_mac(text)
    if mac is None:
        raise BadSpec(f"{text!r} is not a MAC address (six hex pairs: aa:bb:cc:dd:ee:01)")
    return mac


def _bound(text: str, label: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise BadSpec(f"datapoint {label}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise BadSpec(f"datapoint {label}: a bound must be a finite number, not {text!r}")
    return value


def parse_datapoint(text: str) -> DatapointSpec:
    """`LABEL`, `LABEL:UNIT` or `LABEL:UNIT:MIN:MAX` (UNIT, MIN or MAX may be empty: no unit,
    that side open). MIN must be less than MAX."""
    parts = text.split(":")
    if len(parts) not in (1, 2, 4):
        raise BadSpec(f"datapoint {text!r} is not LABEL[:UNIT[:MIN:MAX]]")
    label = parts[0]
    unit = parts[1] if len(parts) > 1 else ""
    low, high = (_bound(parts[2], label), _bound(parts[3], label)) if len(parts) == 4 else (None, None)
    return datapoint_spec(label, unit or None, low, high)


def datapoint_spec(label: str, unit: str | None, low: float | None, high: float | None) -> DatapointSpec:
    """A datapoint from its parts (the bounds finite numbers or None); BadSpec names the problem."""
    label = _plain(label, "datapoint label")
    if unit:
        _plain(unit, f"datapoint {label}: unit")
        if len(unit) > MAX_UNIT_CHARS:
            raise BadSpec(f"datapoint {label}: unit {unit!r} is longer than {MAX_UNIT_CHARS} characters")
    if low is not None and high is not None and not low < high:
        raise BadSpec(f"datapoint {label}: MIN {low:g} must be less than MAX {high:g}")
    return DatapointSpec(label, unit or None, low, high)


def device_spec(
    key: str,
    mac: str | None = None,
    name: str | None = None,
    user: str | None = None,
    datapoints: Iterable[str | DatapointSpec] = (),
) -> DeviceSpec:
    """A DeviceSpec from text as typed (empty text: not given) and datapoints as typed
    (`LABEL[:UNIT[:MIN:MAX]]`) or checked (datapoint_spec); BadSpec names the problem."""
    points = tuple(p if isinstance(p, DatapointSpec) else parse_datapoint(p) for p in datapoints)
    labels = [point.label for point in points]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise BadSpec(f"datapoint {', '.join(repeated)} is given twice")
    return DeviceSpec(
        parse_key(key),
        parse_mac(mac) if mac else None,
        _plain(name, "name") if name else None,
        _plain(user, "user") if user else None,
        points,
    )


# --- adding ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Added:
    """What `add_devices` did with one spec."""

    key: str
    device_id: int = 0
    created: bool = False
    filled: list[str] = field(default_factory=list)  # what an existing device was given

    def describe(self) -> str:
        if self.created:
            return f"added device {self.key} (id {self.device_id})"
        if self.filled:
            return f"device {self.key} (id {self.device_id}): added {', '.join(self.filled)}"
        return f"device {self.key} (id {self.device_id}) exists as given: nothing to do"


async def add_devices(conn: Connection, specs: Sequence[DeviceSpec]) -> list[Added]:
    """Store `specs` in one transaction (all of them or, on a DeviceConflict, none): a fixed
    number of statements whatever their count, so the simulator registers 20,000 at once."""
    _check_distinct(specs)
    async with conn.transaction():
        users = await _user_ids(conn, specs)
        rows = await conn.fetch(
            "SELECT id, device_key, mac, name, user_id FROM devices "
            "WHERE device_key = ANY($1::text[]) OR mac = ANY($2::text[]) ORDER BY id FOR UPDATE",
            [spec.key for spec in specs],
            [spec.mac for spec in specs if spec.mac],
        )
        by_key = {row["device_key"]: row for row in rows}
        by_mac = {row["mac"]: row for row in rows if row["mac"]}
        results = [Added(spec.key) for spec in specs]
        fills: list[tuple[int, str | None, int | None]] = []  # (id, mac, user_id)
        for index, spec in enumerate(specs):
            user_id = users.get(spec.user) if spec.user else None
            row = by_key.get(spec.key)
            owner = by_mac.get(spec.mac) if spec.mac else None
            if owner is not None and owner["device_key"] != spec.key:
                raise DeviceConflict(index, f"MAC {spec.mac} belongs to device {owner['device_key']}")
            if row is None:
                continue
            results[index].device_id = row["id"]
            mac = _fill(index, spec, "MAC", row["mac"], spec.mac, results[index].filled)
            user = _fill(index, spec, "user", row["user_id"], user_id, results[index].filled, spec.user)
            if spec.name is not None and spec.name != row["name"]:
                raise DeviceConflict(index, f"device {spec.key} is named {row['name']!r}, not {spec.name!r}")
            if mac is not None or user is not None:
                fills.append((row["id"], mac, user))
        new = [(i, spec) for i, spec in enumerate(specs) if spec.key not in by_key]
        if new:
            inserted = await conn.fetch(
                "INSERT INTO devices (device_key, mac, name, user_id) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[]) "
                "RETURNING id, device_key",
                [spec.key for _, spec in new],
                [spec.mac for _, spec in new],
                [spec.name or spec.key for _, spec in new],
                [users.get(spec.user) if spec.user else None for _, spec in new],
            )
            ids = {row["device_key"]: row["id"] for row in inserted}
            for index, spec in new:
                results[index].device_id = ids[spec.key]
                results[index].created = True
        if fills:
            await conn.execute(
                "UPDATE devices d SET mac = coalesce(f.mac, d.mac), "
                "user_id = coalesce(f.user_id, d.user_id), updated_at = now() "
                "FROM unnest($1::int[], $2::text[], $3::int[]) AS f(id, mac, user_id) "
                "WHERE d.id = f.id",
                *map(list, zip(*fills, strict=True)),
            )
        await _add_datapoints(conn, specs, results)
    return results


def _check_distinct(specs: Sequence[DeviceSpec]) -> None:
    keys: dict[str, int] = {}
    macs: dict[str, int] = {}
    for index, spec in enumerate(specs):
        if spec.key in keys:
            raise DeviceConflict(index, f"device {spec.key} is given twice")
        keys[spec.key] = index
        if spec.mac and spec.mac in macs:
            raise DeviceConflict(index, f"MAC {spec.mac} is given twice")
        if spec.mac:
            macs[spec.mac] = index


def _fill(
    index: int,
    spec: DeviceSpec,
    what: str,
    stored: Any,
    given: Any,
    filled: list[str],
    shown: Any = None,
) -> Any:
    """`given` when the device has nothing stored there; a conflict when it has another."""
    if given is None or stored == given:
        return None
    if stored is not None:
        raise DeviceConflict(index, f"device {spec.key} has another {what} than {shown or given}")
    filled.append(what)
    return given


async def _user_ids(conn: Connection, specs: Sequence[DeviceSpec]) -> dict[str, int]:
    names = sorted({spec.user for spec in specs if spec.user})
    if not names:
        return {}
    await conn.execute(
        "INSERT INTO users (username) SELECT unnest($1::text[]) ON CONFLICT (username) DO NOTHING", names
    )
    rows = await conn.fetch("SELECT id, username FROM users WHERE username = ANY($1::text[])", names)
    return {row["username"]: row["id"] for row in rows}


async def _add_datapoints(conn: Connection, specs: Sequence[DeviceSpec], results: list[Added]) -> None:
    """Insert the missing datapoints, fill in units and ranges stored empty, refuse others."""
    rows = await conn.fetch(
        "SELECT device_id, label, unit, min_value, max_value FROM datapoints "
        "WHERE device_id = ANY($1::int[])",
        [result.device_id for result in results if not result.created],
    )
    stored = {(row["device_id"], row["label"]): row for row in rows}
    inserts: list[tuple[int, str, str | None, float | None, float | None]] = []
    fills: list[tuple[int, str, str | None, bool, float | None, float | None]] = []
    for index, (spec, result) in enumerate(zip(specs, results, strict=True)):
        added = []
        for point in spec.datapoints:
            row = stored.get((result.device_id, point.label))
            if row is None:
                inserts.append((result.device_id, point.label, point.unit, point.low, point.high))
                added.append(point.label)
                continue
            where = f"datapoint {point.label} of device {spec.key}"
            if point.unit is not None and row["unit"] not in (None, point.unit):
                raise DeviceConflict(index, f"{where} has the unit {row['unit']!r}, not {point.unit!r}")
            stored_range = (row["min_value"], row["max_value"])
            if point.bounded and stored_range not in ((None, None), (point.low, point.high)):
                wanted = _range(point.low, point.high)
                raise DeviceConflict(index, f"{where} has the range {_range(*stored_range)}, not {wanted}")
            unit = point.unit if row["unit"] is None else None
            set_range = point.bounded and stored_range == (None, None)
            if unit is not None or set_range:
                fills.append((result.device_id, point.label, unit, set_range, point.low, point.high))
                result.filled += [f"the unit of {point.label}"] * (unit is not None)
                result.filled += [f"the range of {point.label}"] * set_range
        if added and not result.created:
            result.filled.append(f"datapoint{'s' * (len(added) > 1)} {', '.join(added)}")
    if inserts:
        await conn.execute(
            "INSERT INTO datapoints (device_id, label, unit, min_value, max_value) "
            "SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::float8[], $5::float8[])",
            *map(list, zip(*inserts, strict=True)),
        )
    if fills:
        await conn.execute(
            "UPDATE datapoints p SET unit = coalesce(p.unit, f.unit), "
            "min_value = CASE WHEN f.set_range THEN f.low ELSE p.min_value END, "
            "max_value = CASE WHEN f.set_range THEN f.high ELSE p.max_value END "
            "FROM unnest($1::int[], $2::text[], $3::text[], $4::bool[], $5::float8[], $6::float8[]) "
            "AS f(device_id, label, unit, set_range, low, high) "
            "WHERE p.device_id = f.device_id AND p.label = f.label",
            *map(list, zip(*fills, strict=True)),
        )


def _range(low: float | None, high: float | None) -> str:
    def show(value: float | None) -> str:
        return "" if value is None else repr(value).removesuffix(".0")

    return f"{show(low)}:{show(high)}"


# --- finding, listing, removing ----------------------------------------------------------------------

_DEVICE_COLUMNS = (
    "d.id, d.device_key, d.mac, d.name, d.user_id, u.username AS user, d.status, d.last_seen, d.created_at"
)


async def find_device(conn: Connection | asyncpg.Pool, ref: str) -> asyncpg.Record:
    """The device `ref` names: a device id, else a device key, else a MAC (in any of its
    spellings), in that order; UnknownDevice when none does."""
    device_id = int(ref) if ref.isdigit() and int(ref) <= INT4_MAX else None
    row = await conn.fetchrow(
        f"SELECT {_DEVICE_COLUMNS} FROM devices d LEFT JOIN users u ON u.id = d.user_id "
        "WHERE d.id = $1 OR d.device_key = $2 OR d.mac = $3 "
        "ORDER BY (d.id = $1) IS TRUE DESC, (d.device_key = $2) DESC LIMIT 1",
        device_id,
        ref,
        canonical_mac(ref),
    )
    if row is None:
        raise UnknownDevice(ref)
    return row


async def find_device_id(conn: Connection | asyncpg.Pool, ref: str) -> int:
    return int((await find_device(conn, ref))["id"])


async def list_devices(conn: Connection | asyncpg.Pool) -> list[dict[str, Any]]:
    """Every device with its datapoint count, by id."""
    rows = await conn.fetch(
        f"SELECT {_DEVICE_COLUMNS}, (SELECT count(*) FROM datapoints p WHERE p.device_id = d.id) "
        "AS datapoints FROM devices d LEFT JOIN users u ON u.id = d.user_id ORDER BY d.id"
    )
    return [dict(row) for row in rows]


async def device_detail(conn: Connection | asyncpg.Pool, ref: str) -> dict[str, Any]:
    """The device `ref` names and its datapoints (label, unit, min, max), by label."""
    device = dict(await find_device(conn, ref))
    rows = await conn.fetch(
        "SELECT id, label, unit, min_value AS min, max_value AS max FROM datapoints "
        "WHERE device_id = $1 ORDER BY label",
        device["id"],
    )
    device["datapoints"] = [dict(row) for row in rows]
    return device


async def remove_device(conn: Connection, ref: str) -> tuple[asyncpg.Record, int]:
    """Delete the device `ref` names; its datapoints and group memberships go with it (the
    schema's ON DELETE CASCADE). Returns the device as it was and its datapoint count."""
    async with conn.transaction():
        device = await find_device(conn, ref)
        datapoints = await conn.fetchval("SELECT count(*) FROM datapoints WHERE device_id = $1", device["id"])
        await conn.execute("DELETE FROM devices WHERE id = $1", device["id"])
    return device, int(datapoints)


# --- the daemon's caches -------------------------------------------------------------------------


async def forget_cached(
    redis: aioredis.Redis, keys: RedisKeys, devices: Iterable[tuple[str, str | None]]
) -> None:
    """Delete the registry's cache entries of `devices` ((key, MAC) pairs), so workers read
    them from PostgreSQL again."""
    names = []
    for key, mac in devices:
        names.append(keys.device_ref("key", key))
        if mac:
            names.append(keys.device_ref("mac", mac))
    if names:
        await redis.delete(*names)


async def forget_hot_state(redis: aioredis.Redis, keys: RedisKeys, device_id: int) -> None:
    """A removed device's latest values, status, recent alerts and place in the online set."""
    await redis.delete(
        keys.device_latest(device_id),
        keys.device_latest_times(device_id),
        keys.device_status(device_id),
        keys.alerts(device_id),
    )
    await redis.zrem(keys.devices_online(), str(device_id))
