"""`iotflow devices …`: device metadata (`device_metadata` documents) and the near query.

    iotflow devices meta set DEVICE [--tag K=V]… [--untag K]… [--location LON,LAT]
                                    [--field K=V]… [--note TEXT]
    iotflow devices meta get DEVICE
    iotflow devices near LON LAT --km K [--limit N] [--json]

DEVICE is a device id or its device_key. A tag is `key=value` (or a bare label) in the
document's `tags` list; setting `key=…` again replaces it. Field values are read as
JSON when they parse, as text otherwise. The location is a GeoJSON Point; `near` uses
MongoDB's 2dsphere index, or on PostgreSQL JSONB a bounding box on an index of the
coordinates followed by the exact distance (worker/stores/documents.py). Both answer
with the same documents, nearest first. Exit codes: 0 done, 2 bad input or an unknown
device (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from worker.config import Settings
from worker.exit_codes import ExitCode
from worker.stores import Stores, open_stores

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
    """Register `devices meta set|get` and `devices near`."""
    devices = commands.add_parser("devices", help="device metadata: tags, location, fields; near")
    verbs = devices.add_subparsers(dest="verb", required=True, metavar="VERB")
    meta = verbs.add_parser("meta", help="set or show a device's metadata document")
    meta_verbs = meta.add_subparsers(dest="meta_verb", required=True, metavar="VERB")
    setting = meta_verbs.add_parser("set", help="change tags, location, custom fields, notes")
    setting.add_argument("device", metavar="DEVICE", help="device id or device_key")
    setting.add_argument("--tag", action="append", default=[], metavar="K=V", help="add or replace a tag")
    setting.add_argument("--untag", action="append", default=[], metavar="K", help="remove a tag")
    setting.add_argument("--location", metavar="LON,LAT", help="longitude,latitude in degrees")
    setting.add_argument("--field", action="append", default=[], metavar="K=V", help="set a custom field")
    setting.add_argument("--note", metavar="TEXT", help="append a note")
    setting.set_defaults(handler=_meta_set)
    getting = meta_verbs.add_parser("get", help="print the metadata document as JSON")
    getting.add_argument("device", metavar="DEVICE", help="device id or device_key")
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


async def find_device(stores: Stores, device: str) -> tuple[int, int | None]:
    """(id, user_id) of a device given by id or device_key; BadInput when there is none."""
    if device.isdigit():
        row = await stores.postgres.fetchrow("SELECT id, user_id FROM devices WHERE id = $1", int(device))
    else:
        row = await stores.postgres.fetchrow("SELECT id, user_id FROM devices WHERE device_key = $1", device)
    if row is None:
        raise BadInput(f"no device {device!r}")
    return int(row["id"]), row["user_id"]


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in doc.items() if key != "_id"}


async def get_metadata(stores: Stores, device: str) -> dict[str, Any]:
    device_id, user_id = await find_device(stores, device)
    doc = await stores.documents.get(COLLECTION, str(device_id))
    if doc is None:
        return {"device_id": device_id, "user_id": user_id, "tags": [], "custom_fields": {}, "notes": []}
    return _public(doc)


async def set_metadata(stores: Stores, device: str, change: MetadataChange) -> dict[str, Any]:
    """Read, change, write back the device's document (keyed by its id)."""
    device_id, user_id = await find_device(stores, device)
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


def _run(settings: Settings, work: Callable[[Stores], Awaitable[int]]) -> int:
    async def go() -> int:
        async with open_stores(settings, application_name="iotflow-devices", pool_size=2) as stores:
            return await work(stores)

    try:
        return asyncio.run(go())
    except BadInput as exc:
        print(f"iotflow: devices: {exc}", file=sys.stderr)
        return ExitCode.CONFIG


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NAIVE_UTC).decode())


def _meta_set(settings: Settings, args: argparse.Namespace) -> int:
    try:
        change = parse_change(args)
    except BadInput as exc:
        print(f"iotflow: devices: {exc}", file=sys.stderr)
        return ExitCode.CONFIG

    async def work(stores: Stores) -> int:
        _print_json(_public(await set_metadata(stores, args.device, change)))
        return ExitCode.OK

    return _run(settings, work)


def _meta_get(settings: Settings, args: argparse.Namespace) -> int:
    async def work(stores: Stores) -> int:
        _print_json(await get_metadata(stores, args.device))
        return ExitCode.OK

    return _run(settings, work)


def _near(settings: Settings, args: argparse.Namespace) -> int:
    try:
        check_near(args.lon, args.lat, args.km)  # before connecting to anything
    except BadInput as exc:
        print(f"iotflow: devices: {exc}", file=sys.stderr)
        return ExitCode.CONFIG

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

    return _run(settings, work)
