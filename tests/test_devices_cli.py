"""`iotflow devices add|import|list|show|remove` against real PostgreSQL and Redis; a device
given by id, key or MAC in every command; a running daemon taking the devices added."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from worker.config import Settings
from worker.decode.parse import DeviceRef
from worker.decode.ranges import ValueRange
from worker.decode.registry import PROCESS_REFRESH_S, DatapointBudget, DeviceRegistry
from worker.stores import Stores
from worker.stores.devices import BadSpec, DatapointSpec, canonical_mac, device_spec, parse_datapoint

from .helpers import Cli, publish, running_daemon, wait_for_count
from .test_registry import FakeClock

F2_MAC = "aa:bb:cc:dd:ee:01"  # the seeded fleet's first F2 controller (worker/tools/fleet.py)
F2_KEY = "f2-aabbccddee01"


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(settings, monkeypatch, capsys)


async def _datapoints(
    pg: asyncpg.Connection, key: str
) -> set[tuple[str, str | None, float | None, float | None]]:
    rows = await pg.fetch(
        "SELECT label, unit, min_value, max_value FROM datapoints p JOIN devices d ON d.id = p.device_id "
        "WHERE d.device_key = $1",
        key,
    )
    return {(r["label"], r["unit"], r["min_value"], r["max_value"]) for r in rows}


async def _snapshot(pg: asyncpg.Connection) -> list[object]:
    """Everything `devices add|import` may write, to prove a refusal wrote nothing."""
    return [
        await pg.fetch("SELECT * FROM devices ORDER BY id"),
        await pg.fetch("SELECT * FROM datapoints ORDER BY id"),
        await pg.fetch("SELECT * FROM users ORDER BY id"),
    ]


# --- what needs no server ----------------------------------------------------------------------------


def test_a_datapoint_spec_is_a_label_with_an_optional_unit_and_range() -> None:
    assert parse_datapoint("temperature") == DatapointSpec("temperature")
    assert parse_datapoint("room1.temperature:°C") == DatapointSpec("room1.temperature", "°C")
    assert parse_datapoint("battery:V:2:4.5") == DatapointSpec("battery", "V", 2.0, 4.5)
    assert parse_datapoint("level::0:") == DatapointSpec("level", None, 0.0, None)
    for text, problem in [
        ("t:°C:5", "is not LABEL[:UNIT[:MIN:MAX]]"),
        ("t:°C:5:5", "MIN 5 must be less than MAX 5"),
        ("t:°C:9:1", "MIN 9 must be less than MAX 1"),
        ("t:°C:nan:1", "finite number"),
        ("t:°C:-inf:", "finite number"),
        ("t:°C:cold:1", "'cold' is not a number"),
        (":°C", "datapoint label ''"),
        ("t:" + "x" * 33, "longer than 32"),
        ("t:deg\tC", "printable"),
    ]:
        with pytest.raises(BadSpec, match=re.escape(problem)):
            parse_datapoint(text)


def test_a_device_spec_checks_its_key_mac_and_labels() -> None:
    spec = device_spec("boiler-1", "AA-BB-CC-00-00-2F", None, "", ["t:°C"])
    assert (spec.key, spec.mac, spec.user, spec.datapoints) == (
        "boiler-1",
        "aa:bb:cc:00:00:2f",
        None,
        (DatapointSpec("t", "°C"),),
    )
    assert canonical_mac("aabbcc00002f") == "aa:bb:cc:00:00:2f" and canonical_mac("boiler") is None
    for args, problem in [
        (("a/b",), "may not contain '/'"),
        (("42",), "may not be a number"),
        ((" padded",), "printable text without surrounding spaces"),
        (("k", "aa:bb:cc:dd:ee"), "is not a MAC address"),
        (("k", None, None, None, ["t", "t:°C"]), "datapoint t is given twice"),
    ]:
        with pytest.raises(BadSpec, match=re.escape(problem)):
            device_spec(*args)  # type: ignore[arg-type]


# --- add ---------------------------------------------------------------------------------------------


async def test_add_stores_a_device_with_its_datapoints_and_again_is_a_no_op(
    cli: Cli, pg: asyncpg.Connection
) -> None:
    argv = (
        "devices", "add", "boiler-1", "--mac", "AA:BB:CC:00:00:2F", "--name", "Boiler room", "--user", "alice",
        "--datapoint", "temperature:°C:-40:85", "--datapoint", "pressure:bar", "--datapoint", "state",
    )  # fmt: skip
    code, out, err = await cli(*argv)
    device = await pg.fetchrow(
        "SELECT d.id, d.mac, d.name, u.username FROM devices d JOIN users u ON u.id = d.user_id "
        "WHERE d.device_key = 'boiler-1'"
    )
    assert (code, err) == (0, "") and out == f"added device boiler-1 (id {device['id']})\n"
    assert (device["mac"], device["name"], device["username"]) == (
        "aa:bb:cc:00:00:2f",
        "Boiler room",
        "alice",
    )
    assert await _datapoints(pg, "boiler-1") == {
        ("temperature", "°C", -40.0, 85.0),
        ("pressure", "bar", None, None),
        ("state", None, None, None),
    }
    before = await _snapshot(pg)
    code, out, err = await cli(*argv)
    assert (code, err) == (0, "")
    assert out == f"device boiler-1 (id {device['id']}) exists as given: nothing to do\n"
    assert await _snapshot(pg) == before


async def test_add_fills_in_what_is_empty_and_refuses_what_differs(cli: Cli, pg: asyncpg.Connection) -> None:
    assert (await cli("devices", "add", "tank-1", "--datapoint", "level"))[0] == 0
    code, out, _ = await cli(
        "devices", "add", "tank-1", "--mac", "aa:bb:cc:00:00:31",
        "--datapoint", "level:%:0:100", "--datapoint", "temp:°C",
    )  # fmt: skip
    assert code == 0
    assert out.endswith("added MAC, the unit of level, the range of level, datapoint temp\n"), out
    assert await _datapoints(pg, "tank-1") == {("level", "%", 0.0, 100.0), ("temp", "°C", None, None)}

    before = await _snapshot(pg)
    for argv, problem in [
        (("--mac", F2_MAC), f"MAC {F2_MAC} belongs to device {F2_KEY}"),
        (("--mac", "aa:bb:cc:00:00:32"), "device tank-1 has another MAC than aa:bb:cc:00:00:32"),
        (("--datapoint", "level:%:0:50"), "datapoint level of device tank-1 has the range 0:100, not 0:50"),
        (("--datapoint", "level:m"), "datapoint level of device tank-1 has the unit '%', not 'm'"),
        (("--name", "Tank"), "device tank-1 is named 'tank-1', not 'Tank'"),
        (
            ("--datapoint", "fill:%", "--datapoint", "level:%:0:1"),
            "datapoint level of device tank-1 has the range 0:100, not 0:1",
        ),
    ]:
        code, out, err = await cli("devices", "add", "tank-1", *argv)
        assert (code, out) == (2, ""), argv
        assert err == f"iotflow: devices add: {problem}\n", err
    assert await _snapshot(pg) == before


async def test_bad_input_to_add_is_one_line_and_exit_2(cli: Cli, pg: asyncpg.Connection) -> None:
    before = await _snapshot(pg)
    for argv, problem in [
        (("k", "--mac", "not-a-mac"), "'not-a-mac' is not a MAC address"),
        (("k", "--datapoint", "t:°C:30:10"), "MIN 30 must be less than MAX 10"),
        (("k", "--datapoint", "t:°C:1"), "is not LABEL[:UNIT[:MIN:MAX]]"),
        (("7",), "may not be a number"),
    ]:
        code, out, err = await cli("devices", "add", *argv)
        assert (code, out) == (2, ""), argv
        assert err.count("\n") == 1 and err.startswith("iotflow: devices add: ") and problem in err, err
    assert await _snapshot(pg) == before


# --- list, show, remove ------------------------------------------------------------------------------


async def test_list_and_show_a_device_with_its_units_and_ranges(cli: Cli, pg: asyncpg.Connection) -> None:
    await cli(
        "devices", "add", "boiler-1", "--mac", "aa:bb:cc:00:00:2f", "--datapoint", "temperature:°C:-40:85"
    )
    device_id = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'boiler-1'")
    code, out, _ = await cli("devices", "list")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["ID", "KEY", "MAC", "NAME", "POINTS", "LAST", "SEEN"]
    assert len(lines) == 9  # the seeded eight and this one
    assert lines[-1].split() == [str(device_id), "boiler-1", "aa:bb:cc:00:00:2f", "boiler-1", "1", "never"]
    code, out, _ = await cli("devices", "list", "--json")
    listed = orjson.loads(out)
    assert [d["device_key"] for d in listed][-1] == "boiler-1" and listed[-1]["datapoints"] == 1

    for ref in (str(device_id), "boiler-1", "AA-BB-CC-00-00-2F"):
        code, out, _ = await cli("devices", "show", ref, "--json")
        shown = orjson.loads(out)
        assert code == 0 and shown["id"] == device_id and shown["mac"] == "aa:bb:cc:00:00:2f"
        assert [(p["label"], p["unit"], p["min"], p["max"]) for p in shown["datapoints"]] == [
            ("temperature", "°C", -40.0, 85.0)
        ]
    code, out, _ = await cli("devices", "show", "boiler-1")
    assert code == 0 and "  temperature" in out and "°C" in out and "[-40, 85]" in out


async def test_remove_deletes_the_device_its_datapoints_and_caches_and_keeps_its_readings(
    cli: Cli, stores: Stores, pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> None:
    device_id = await pg.fetchval("SELECT id FROM devices WHERE device_key = $1", F2_KEY)
    await pg.execute("INSERT INTO decoded_data VALUES (now(), $1, 1, 2.5)", device_id)
    keys = stores.keys
    cached = [keys.device_ref("key", F2_KEY), keys.device_ref("mac", F2_MAC)]
    hot = [keys.device_latest(device_id), keys.device_status(device_id)]
    for name in cached + hot:
        await redis_client.set(name, "{}")
    await redis_client.zadd(keys.devices_online(), {str(device_id): 1.0})

    code, out, err = await cli("devices", "remove", F2_MAC.upper())
    assert (code, err) == (0, "")
    assert out.startswith(f"removed device {F2_KEY} (id {device_id}) and its 11 datapoints;"), out
    assert await pg.fetchval("SELECT count(*) FROM devices WHERE id = $1", device_id) == 0
    assert await pg.fetchval("SELECT count(*) FROM datapoints WHERE device_id = $1", device_id) == 0
    assert await pg.fetchval("SELECT count(*) FROM decoded_data WHERE device_id = $1", device_id) == 1
    assert await redis_client.exists(*cached, *hot) == 0
    assert await redis_client.zscore(keys.devices_online(), str(device_id)) is None

    code, out, err = await cli("devices", "remove", F2_KEY)
    assert (code, out, err) == (2, "", f"iotflow: devices remove: unknown device {F2_KEY}\n")


# --- import ------------------------------------------------------------------------------------------

GOOD_CSV = """\
key,mac,name,user,datapoints
boiler-1,AA:BB:CC:00:00:2F,Boiler room,alice,temperature:°C:-40:85;pressure:bar
"tank-1",,"Tank, north",,level:%:0:100

pump-7,aabbcc000030,,bob,
"""


async def test_import_adds_every_row_in_one_go_and_again_changes_nothing(
    cli: Cli, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "devices.csv"
    path.write_text(GOOD_CSV, encoding="utf-8")
    code, out, err = await cli("devices", "import", str(path))
    assert (code, err) == (0, "") and out == f"imported {path}: 3 added, 0 filled in, 0 unchanged\n"
    assert await _datapoints(pg, "boiler-1") == {
        ("temperature", "°C", -40.0, 85.0),
        ("pressure", "bar", None, None),
    }
    assert await pg.fetchval("SELECT name FROM devices WHERE device_key = 'tank-1'") == "Tank, north"
    assert await pg.fetchval("SELECT mac FROM devices WHERE device_key = 'pump-7'") == "aa:bb:cc:00:00:30"
    before = await _snapshot(pg)
    code, out, _ = await cli("devices", "import", str(path))
    assert (code, out) == (0, f"imported {path}: 0 added, 0 filled in, 3 unchanged\n")
    assert await _snapshot(pg) == before


@pytest.mark.parametrize(
    ("rows", "line", "problem"),
    [
        ("ok-1,,,,t\nok-2,,,,t:°C:9:1\n", 3, "datapoint t: MIN 9 must be less than MAX 1"),
        ("ok-1,,,,t\n\nok-2,zz,,,\n", 4, "'zz' is not a MAC address (six hex pairs: aa:bb:cc:dd:ee:01)"),
        ("ok-1,,,,t\nok-2,,,,\nok-1,,,,\n", 4, "device ok-1 is given twice"),
        (f"ok-1,,,,t\nok-2,{F2_MAC},,,\n", 3, f"MAC {F2_MAC} belongs to device {F2_KEY}"),
        (
            "ok-1,,,,t\nsim-json-01,,,,temperature:K\n",
            3,
            "datapoint temperature of device sim-json-01 has the unit '°C', not 'K'",
        ),
        ("ok-1,,,,t,extra\n", 2, "6 cells, the header names 5 columns"),
        (",,,,t\n", 2, "no key"),
    ],
)
async def test_a_bad_row_names_its_line_and_nothing_is_imported(
    cli: Cli, pg: asyncpg.Connection, tmp_path: Path, rows: str, line: int, problem: str
) -> None:
    path = tmp_path / "devices.csv"
    path.write_text("key,mac,name,user,datapoints\n" + rows, encoding="utf-8")
    before = await _snapshot(pg)
    code, out, err = await cli("devices", "import", str(path))
    assert (code, out) == (2, "")
    assert err == f"iotflow: devices import: {path}:{line}: {problem}; nothing imported\n", err
    assert await _snapshot(pg) == before


async def test_a_bad_header_is_refused(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_text("device,mac\nx,\n", encoding="utf-8")
    code, _, err = await cli("devices", "import", str(path))
    assert code == 2 and f"{path}:1: the header must name the columns key (required)" in err


# --- a device by id, key or MAC everywhere -----------------------------------------------------------


HOT_RULE = ("type=threshold", "field=room1.temperature", "condition=>", "value=30")


async def test_every_command_takes_a_device_by_id_key_or_mac(cli: Cli, pg: asyncpg.Connection) -> None:
    device_id = await pg.fetchval("SELECT id FROM devices WHERE device_key = $1", F2_KEY)
    for ref in (str(device_id), F2_KEY, F2_MAC, "AABBCCDDEE01"):
        for argv, expected in [
            (("devices", "show", ref, "--json"), f'"id": {device_id},'),
            (("devices", "meta", "get", ref), f'"device_id": {device_id},'),
            (("devices", "meta", "set", ref, "--tag", "site=north"), f'"device_id": {device_id},'),
            (("query", "device", ref, "--from", "2026-01-01T00:00Z", "--to", "2026-01-02T00:00Z"), ""),
            (("report", "device", ref, "--period", "1d"), f'"device_id": {device_id},'),
            (("rules", "set", "--device", ref, "id=hot", *HOT_RULE), f"set device:{device_id}/hot:"),
            (("rules", "list", "--device", ref), f"device:{device_id}/hot"),
            (("alerts", "list", "--device", ref), "no alerts"),
            (("jobs", "enqueue", "report", "--device", ref, "--force"), f":device:{device_id}:force:"),
        ]:
            code, out, err = await cli(*argv)
            assert code == 0, (argv, err)
            assert expected in out, (argv, out)
    code, _, err = await cli("rules", "delete", "--device", F2_MAC, "hot")
    assert code == 0, err


UNKNOWN_DEVICE_COMMANDS = [
    ("devices", "show", "{}"),
    ("devices", "remove", "{}"),
    ("devices", "key", "rotate", "{}"),
    ("devices", "key", "revoke", "{}"),
    ("devices", "meta", "get", "{}"),
    ("devices", "meta", "set", "{}", "--tag", "a=b"),
    ("query", "device", "{}", "--from", "2026-01-01T00:00Z", "--to", "2026-01-02T00:00Z"),
    ("report", "device", "{}"),
    ("jobs", "enqueue", "report", "--device", "{}"),
    ("rules", "set", "--device", "{}", "type=offline", "duration=60"),
    ("rules", "list", "--device", "{}"),
    ("rules", "delete", "--device", "{}", "hot"),
    ("alerts", "list", "--device", "{}"),
]


@pytest.mark.parametrize("ref", ["999999", "nobody-01", "aa:bb:cc:99:99:99"])
async def test_an_unknown_device_is_exit_2_and_one_line_in_every_command(cli: Cli, ref: str) -> None:
    for template in UNKNOWN_DEVICE_COMMANDS:
        argv = [word.replace("{}", ref) for word in template]
        code, out, err = await cli(*argv)
        assert (code, out) == (2, ""), (argv, code, out)
        assert err.count("\n") == 1 and err.endswith(f": unknown device {ref}\n"), (argv, err)


# --- what the daemon sees ----------------------------------------------------------------------------


async def test_the_registry_sees_a_change_or_a_removal_within_its_refresh(cli: Cli, stores: Stores) -> None:
    clock = FakeClock()
    registry = DeviceRegistry(
        stores.postgres,
        stores.redis,
        stores.keys,
        register_unknown=False,
        budget=DatapointBudget(20),
        clock=clock,
    )
    ref = DeviceRef("key", "sim-json-01")
    assert (await registry.resolve([ref]))[ref].ranges == {}  # in the process and in Redis now
    assert (await cli("devices", "add", "sim-json-01", "--datapoint", "battery:V:2:4.5"))[0] == 0
    clock.now += PROCESS_REFRESH_S
    assert (await registry.resolve([ref]))[ref].ranges == {"battery": ValueRange(2.0, 4.5)}

    assert (await cli("devices", "remove", "sim-json-01"))[0] == 0
    assert ref in await registry.resolve([ref])  # the process cache keeps it until the refresh
    clock.now += PROCESS_REFRESH_S
    assert await registry.resolve([ref]) == {}


async def test_a_daemon_that_rejects_unknown_devices_takes_one_added_with_the_cli(
    cli: Cli, settings: Settings, pg: asyncpg.Connection
) -> None:
    assert settings.pipeline.unknown_devices == "reject"
    async with running_daemon(settings):
        code, _, err = await cli("devices", "add", "greenhouse-1", "--datapoint", "temperature:°C:-40:85")
        assert code == 0, err
        await publish(
            settings.mqtt.url,
            [
                ("devices/greenhouse-1/telemetry", b'{"temperature": 21.5}'),
                ("devices/greenhouse-1/telemetry", b'{"temperature": 150}'),
                ("devices/greenhouse-2/telemetry", b'{"temperature": 21.5}'),
            ],
        )
        await wait_for_count(pg, "SELECT count(*) FROM dead_letters", 2)
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 1)
    device_id = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'greenhouse-1'")
    assert await pg.fetchval("SELECT value FROM decoded_data WHERE device_id = $1", device_id) == 21.5
    reasons = sorted(await pg.fetchval("SELECT array_agg(reason) FROM dead_letters"))
    assert reasons[0].startswith("out_of_range: temperature=150 outside [-40, 85]"), reasons
    assert reasons[1].startswith("unknown_device: key greenhouse-2 is not in devices"), reasons
