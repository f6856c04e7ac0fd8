"""`iotflow devices …`: the devices and their datapoints; metadata; the near query.

    iotflow devices add KEY [--mac MAC] [--name NAME] [--user USER]
                            [--datapoint LABEL[:UNIT[:MIN:MAX]]]…
    iotflow devices import FILE.csv
    iotflow devices list [--json]
    iotflow devices show DEVICE [--json]
    iotflow devices remove DEVICE
    iotflow devices key rotate|revoke DEVICE
    iotflow devices meta set DEVICE [--tag K=V]… [--untag K]… [--location LON,LAT]
                                    [--field K=V]… [--note TEXT]
    iotflow devices meta get DEVICE
    iotflow devices near LON LAT --km K [--limit N] [--json]

DEVICE is a device id, device_key or MAC (worker.stores.devices.find_device). `add`
and `import` go through worker.stores.devices.add_devices (idempotent on the key; the
CSV columns are in worker/cli/device_csv.py) and clear the daemon's cache entries of
what they touched. A tag is `key=value` (or a bare label) in the metadata document's
`tags` list; setting `key=…` again replaces it. Field values are read as JSON when
they parse, as text otherwise. The location is a GeoJSON Point; `near` uses MongoDB's
2dsphere index, or on PostgreSQL JSONB a bounding box on an index of the coordinates
followed by the exact distance (worker/stores/documents.py). Both answer with the
same documents, nearest first. `key rotate` prints a new HTTP API key (the only time it is
shown; only its hash is stored) and `key revoke` leaves the device without one: either way
the old key stops working at once (worker/api/keys.py). Exit codes: 0 done, 2 bad input, a conflict with a
stored device or an unknown device (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from worker.api.keys import DeviceKeys
from worker.cli.device_ref import DEVICE_HELP
from worker.config import Settings
from worker.exit_codes import ExitCode
from worker.stores import Stores, open_stores
from worker.stores.devices import BadSpec, DeviceConflict, UnknownDevice, find_device

COLLECTION = "device_metadata"


class BadInput(ValueError):
    """Refused before anything is written; the command exits 2 with its text."""


@dataclass
class MetadataChange:
    tags: list[str] = field(default_factory=list)
    untags: list[str] = field(default_factory=list)
    location: tuple[float, float] | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    note: str | None = None

    def __bool__(self) -> bool:
        return bool(self.tags or self.untags or self.location or self.fields or self.note)


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register `devices add|import|list|show|remove`, `devices meta set|get` and `devices near`."""
    devices = commands.add_parser("devices", help="devices and their datapoints; metadata; near")
    verbs = devices.add_subparsers(dest="verb", required=True, metavar="VERB")
    adding = verbs.add_parser("add", help="add a device with its datapoints (again: fills in, never changes)")
    adding.add_argument("key", metavar="KEY", help="device_key: devices/{KEY}/telemetry")
    adding.add_argument("--mac", help="an F2 controller's MAC (its topics name it)")
    adding.add_argument("--name", help="a name to show (default: KEY)")
    adding.add_argument("--user", help="the owner's username (created when there is none)")
    adding.add_argument(
        "--datapoint",
        action="append",
        default=[],
        metavar="LABEL[:UNIT[:MIN:MAX]]",
        help="a datapoint, its unit and plausible range (repeat for more)",
    )
    adding.set_defaults(handler=_add)
    importing = verbs.add_parser("import", help="add the devices of a CSV file, all or none")
    importing.add_argument("file", type=Path, metavar="FILE.csv", help="columns key,mac,name,user,datapoints")
    importing.set_defaults(handler=_import)
    listing = verbs.add_parser("list", help="every device: id, key, MAC, name, datapoints, last seen")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_list)
    showing = verbs.add_parser("show", help="a device and its datapoints, units and ranges")
    showing.add_argument("device", metavar="DEVICE", help=DEVICE_HELP)
    showing.add_argument("--json", action="store_true")
    showing.set_defaults(handler=_show)
    removing = verbs.add_parser("remove", help="delete a device and its datapoints (readings stay)")
    removing.add_argument("device", metavar="DEVICE", help=DEVICE_HELP)
    removing.set_defaults(handler=_remove)

    key = verbs.add_parser("key", help="issue a new HTTP API key, or revoke the device's key")
    key.add_argument("action", choices=("rotate", "revoke"), help="rotate: print a new key; revoke: no key")
    key.add_argument("device", metavar="DEVICE", help=DEVICE_HELP)
    key.set_defaults(handler=_key)

    meta = verbs.add_parser("meta", help="set or show a device's metadata document")
    meta_verbs = meta.add_subparsers(dest="meta_verb", required=True, metavar="VERB")
    setting = meta_verbs.add_parser("set", help="change tags, location, custom fields, notes")
    setting.add_argument("device", metavar="DEVICE", help=DEVICE_HELP)
    setting.add_argument("--tag", action="append", default=[], metavar="K=V", help="add or replace a tag")
    setting.add_argument("--untag", action="append", default=[], metavar="K", help="remove a tag")
    setting.add_argument("--location", metavar="LON,LAT", help="longitude,latitude in degrees")
    setting.add_argument("--field", action="append", default=[], metavar="K=V", help="set a custom field")
    setting.add_argument("--note", metavar="TEXT", help="append a note")
    setting.set_defaults(handler=_meta_set)
    getting = meta_verbs.add_parser("get", help="print the metadata document as JSON")
    getting.add_argument("device", metavar="DEVICE", help=DEVICE_HELP)
    getting.set_defaults(handler=_meta_get)
    near = verbs.add_parser("near", help="devices whose location is within --km of a point")
    near.add_argument("lon", type=float, metavar="LON")
    near.add_argument("lat", type=float, metavar="LAT")
    near.add_argument("--km", type=float, required=True, metavar="K")
    near.add_argument("--limit", type=int, default=100)
    near.add_argument("--json", action="store_true")
    near.set_defaults(handler=_near)


# --- what the commands do, on whichever document backend ---------------------------------------------


def check_point(lon: float, lat: float) -> tuple[float, float]:
    if not -180 <= lon <= 180:
        raise BadInput(f"longitude {lon:g} is outside -180..180")
    if not -90 <= lat <= 90:
        raise BadInput(f"latitude {lat:g} is outside -90..90")
    return lon, lat


def check_near(lon: float, lat: float, km: float) -> None:
    check_point(lon, lat)
    if not km > 0:
        raise BadInput(f"--km {km:g} must be more than 0")


def parse_location(text: str) -> tuple[float, float]:
    try:
        lon, lat = (float(part) for part in text.split(","))
    except ValueError:
        raise BadInput(f"location {text!r} is not LON,LAT") from None
    return check_point(lon, lat)


def _pair(word: str, what: str) -> tuple[str, str]:
    key, sep, value = word.partition("=")
    if not sep or not key:
        raise BadInput(f"{what} {word!r} is not key=value")
    if key.startswith("$") or "." in key:  # a path or an operator in MongoDB
        raise BadInput(f"{what} key {key!r} may not contain '.' or start with '$'")
    return key, value


def parse_change(args: argparse.Namespace) -> MetadataChange:
    change = MetadataChange(untags=list(args.untag), note=args.note)
    for word in args.tag:
        if "=" in word:
            key, value = _pair(word, "tag")
            word = f"{key}={value}"
        elif not word:
            raise BadInput("a tag may not be empty")
        change.tags.append(word)
    for word in args.field:
        key, text = _pair(word, "field")
        try:
            change.fields[key] = orjson.loads(text)
        except orjson.JSONDecodeError:
            change.fields[key] = text
    if args.location is not None:
        change.location = parse_location(args.location)
    if not change:
        raise BadInput("nothing to set: give --tag, --untag, --location, --field or --note")
    return change


def _now() -> datetime:
    """To the millisecond, as MongoDB keeps times: both backends then print the same."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _tag_name(tag: str) -> str:
    return tag.partition("=")[0]


def apply_change(doc: dict[str, Any], change: MetadataChange, now: datetime) -> dict[str, Any]:
    """The document after `change`; `doc` is the stored one (docs/storage.md has its shape)."""
    replaced = {_tag_name(tag) for tag in change.tags} | set(change.untags)
    tags = [tag for tag in doc.get("tags", []) if _tag_name(tag) not in replaced]
    doc = {**doc, "tags": [*tags, *change.tags], "updated_at": now}
    doc["custom_fields"] = {**doc.get("custom_fields", {}), **change.fields}
    if change.location is not None:
        doc["location"] = {"type": "Point", "coordinates": list(change.location)}
    if change.note is not None:
        doc["notes"] = [*doc.get("notes", []), {"at": now, "text": change.note}]
    return doc


async def _device(stores: Stores, device: str) -> tuple[int, int | None]:
    """(id, user_id) of the device `device` names; UnknownDevice when there is none."""
    row = await find_device(stores.postgres, device)
    return int(row["id"]), row["user_id"]


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in doc.items() if key != "_id"}


async def get_metadata(stores: Stores, device: str) -> dict[str, Any]:
    device_id, user_id = await _device(stores, device)
    doc = await stores.documents.get(COLLECTION, str(device_id))
    if doc is None:
        return {"device_id": device_id, "user_id": user_id, "tags": [], "custom_fields": {}, "notes": []}
    return _public(doc)


async def set_metadata(stores: Stores, device: str, change: MetadataChange) -> dict[str, Any]:
    """Read, change, write back the device's document (keyed by its id)."""
    device_id, user_id = await _device(stores, device)
    now = _now()
    stored = await stores.documents.get(COLLECTION, str(device_id))
    base = _public(stored) if stored is not None else {"created_at": now, "notes": []}
    doc = apply_change({**base, "device_id": device_id, "user_id": user_id}, change, now)
    await stores.documents.upsert(COLLECTION, str(device_id), doc)
    return doc


async def devices_near(
    stores: Stores, lon: float, lat: float, km: float, limit: int = 100
) -> list[dict[str, Any]]:
    """One entry per device within `km`, nearest first: id, key, distance, location, tags."""
    check_near(lon, lat, km)
    found = await stores.documents.near(COLLECTION, lon, lat, km, limit=limit)
    rows = await stores.postgres.fetch(
        "SELECT id, device_key FROM devices WHERE id = ANY($1::integer[])",
        [int(doc["device_id"]) for _, doc in found],
    )
    keys = {row["id"]: row["device_key"] for row in rows}
    return [
        {
            "device_id": doc["device_id"],
            "device_key": keys.get(doc["device_id"]),
            "distance_km": round(distance, 3),
            "location": doc["location"]["coordinates"],
            "tags": doc.get("tags", []),
        }
        for distance, doc in found
    ]


# --- the handlers ----------------------------------------------------------------------------------


def _refuse(args: argparse.Namespace, problem: object) -> int:
    print(f"iotflow: devices {args.verb}: {problem}", file=sys.stderr)
    return ExitCode.CONFIG


def _run(settings: Settings, args: argparse.Namespace, work: Callable[[Stores], Awaitable[int]]) -> int:
    async def go() -> int:
        async with open_stores(settings, application_name="iotflow-devices", pool_size=2) as stores:
            return await work(stores)

    try:
        return asyncio.run(go())
    except (BadInput, BadSpec, DeviceConflict, UnknownDevice) as exc:
        return _refuse(args, exc)
    except asyncpg.UniqueViolationError as exc:  # another command added the same key or MAC meanwhile
        return _refuse(args, f"{exc.detail or exc}; nothing written, run it again")


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NAIVE_UTC).decode())


async def _forget(
    stores: Stores, devices: list[tuple[str, str | None]], device_id: int | None = None
) -> None:
    """Clear the daemon's Redis entries of `devices` (and a removed device's hot state). The
    change is committed by then: a Redis away is one line, and the entries expire in an hour."""
    from worker.retry import describe, is_transient
    from worker.stores.devices import forget_cached, forget_hot_state

    try:
        await forget_cached(stores.redis, stores.keys, devices)
        if device_id is not None:
            await forget_hot_state(stores.redis, stores.keys, device_id)
    except Exception as exc:
        if not is_transient(exc):
            raise
        print(
            f"iotflow: devices: stored, but Redis did not answer ({describe(exc)}): running workers "
            "see the change when their cache entries expire, within an hour",
            file=sys.stderr,
        )


def _add(settings: Settings, args: argparse.Namespace) -> int:
    from worker.stores.devices import add_devices, device_spec

    try:
        spec = device_spec(args.key, args.mac, args.name, args.user, args.datapoint)
    except BadSpec as exc:
        return _refuse(args, exc)

    async def work(stores: Stores) -> int:
        async with stores.postgres.acquire() as conn:
            (added,) = await add_devices(conn, [spec])
        await _forget(stores, [(spec.key, spec.mac)])
        print(added.describe())
        return ExitCode.OK

    return _run(settings, args, work)


def _import(settings: Settings, args: argparse.Namespace) -> int:
    from worker.cli.device_csv import CsvProblem, read_devices_csv
    from worker.stores.devices import add_devices

    try:
        rows = read_devices_csv(args.file)
    except CsvProblem as exc:
        return _refuse(args, f"{exc}; nothing imported")
    specs = [spec for _, spec in rows]

    async def work(stores: Stores) -> int:
        async with stores.postgres.acquire() as conn:
            try:
                results = await add_devices(conn, specs)
            except DeviceConflict as exc:
                return _refuse(args, f"{args.file}:{rows[exc.index][0]}: {exc}; nothing imported")
        await _forget(stores, [(spec.key, spec.mac) for spec in specs])
        created = sum(result.created for result in results)
        filled = sum(bool(result.filled) for result in results if not result.created)
        print(
            f"imported {args.file}: {created} added, {filled} filled in, "
            f"{len(results) - created - filled} unchanged"
        )
        return ExitCode.OK

    return _run(settings, args, work)


def _list(settings: Settings, args: argparse.Namespace) -> int:
    from worker.stores.devices import list_devices

    async def work(stores: Stores) -> int:
        devices = await list_devices(stores.postgres)
        if args.json:
            _print_json(devices)
            return ExitCode.OK
        print(f"{'ID':>6}  {'KEY':<24} {'MAC':<17}  {'NAME':<24} {'POINTS':>6}  LAST SEEN")
        for d in devices:
            seen = d["last_seen"].strftime("%Y-%m-%d %H:%M:%SZ") if d["last_seen"] else "never"
            print(
                f"{d['id']:>6}  {d['device_key']:<24} {d['mac'] or '-':<17}  {d['name']:<24} "
                f"{d['datapoints']:>6}  {seen}"
            )
        return ExitCode.OK

    return _run(settings, args, work)


def _show(settings: Settings, args: argparse.Namespace) -> int:
    from worker.decode.ranges import ValueRange

    async def work(stores: Stores) -> int:
        from worker.stores.devices import device_detail

        device = await device_detail(stores.postgres, args.device)
        if args.json:
            _print_json(device)
            return ExitCode.OK
        for name in ("id", "device_key", "mac", "name", "user", "status", "last_seen", "created_at"):
            value = device[name]
            print(f"{name:<11} {'-' if value is None else value}")
        print(f"datapoints  {len(device['datapoints'])}")
        for point in device["datapoints"]:
            bounds = ValueRange(point["min"], point["max"])
            shown = "" if bounds == (None, None) else str(bounds)
            print(f"  {point['label']:<28} {point['unit'] or '-':<8} {shown}".rstrip())
        return ExitCode.OK

    return _run(settings, args, work)


def _remove(settings: Settings, args: argparse.Namespace) -> int:
    from worker.stores.devices import remove_device

    async def work(stores: Stores) -> int:
        async with stores.postgres.acquire() as conn:
            device, datapoints = await remove_device(conn, args.device)
        await _forget(stores, [(device["device_key"], device["mac"])], device["id"])
        print(
            f"removed device {device['device_key']} (id {device['id']}) and its {datapoints} datapoints; "
            "its readings, alerts and documents stay until retention removes them"
        )
        return ExitCode.OK

    return _run(settings, args, work)


def _key(settings: Settings, args: argparse.Namespace) -> int:
    from worker.api.keys import new_key, set_key

    async def work(stores: Stores) -> int:
        device = await find_device(stores.postgres, args.device)
        key = new_key() if args.action == "rotate" else None
        old = await set_key(stores.postgres, device["id"], key)
        if old is not None:
            await _forget_key(DeviceKeys(stores.postgres, stores.redis, stores.keys), old)
        if key is not None:
            print(key)  # alone on stdout, for KEY=$(iotflow devices key rotate …); shown this once
            print(
                f"iotflow: devices key: new API key of {device['device_key']} (id {device['id']})",
                file=sys.stderr,
            )
        else:
            state = "revoked" if old is not None else "had none"
            print(f"API key of device {device['device_key']} (id {device['id']}) {state}")
        return ExitCode.OK

    return _run(settings, args, work)


async def _forget_key(keys: DeviceKeys, old: str) -> None:
    """Drop the old key's cache entry; with Redis away it expires within its TTL."""
    from worker.retry import describe, is_transient
    from worker.stores.keys import API_KEY_TTL_S

    try:
        await keys.forget(old)
    except Exception as exc:
        if not is_transient(exc):
            raise
        print(
            f"iotflow: devices key: stored, but Redis did not answer ({describe(exc)}): the old key "
            f"works on until its cache entry expires, within {API_KEY_TTL_S // 60} minutes",
            file=sys.stderr,
        )


def _meta_set(settings: Settings, args: argparse.Namespace) -> int:
    try:
        change = parse_change(args)
    except BadInput as exc:
        return _refuse(args, exc)

    async def work(stores: Stores) -> int:
        _print_json(_public(await set_metadata(stores, args.device, change)))
        return ExitCode.OK

    return _run(settings, args, work)


def _meta_get(settings: Settings, args: argparse.Namespace) -> int:
    async def work(stores: Stores) -> int:
        _print_json(await get_metadata(stores, args.device))
        return ExitCode.OK

    return _run(settings, args, work)


def _near(settings: Settings, args: argparse.Namespace) -> int:
    try:
        check_near(args.lon, args.lat, args.km)  # before connecting to anything
    except BadInput as exc:
        return _refuse(args, exc)

    async def work(stores: Stores) -> int:
        found = await devices_near(stores, args.lon, args.lat, args.km, args.limit)
        if args.json:
            _print_json(found)
        for entry in [] if args.json else found:
            lon, lat = entry["location"]
            key = entry["device_key"] or "-"
            print(
                f"{entry['device_id']:>6}  {key:<24} {entry['distance_km']:>10.3f} km  "
                f"{lon:.6f},{lat:.6f}  {' '.join(entry['tags'])}".rstrip()
            )
        return ExitCode.OK

    return _run(settings, args, work)
