"""Every class of bad input becomes a dead letter with a reason; the worker stays up."""

from __future__ import annotations

import hashlib
import struct
import time
from pathlib import Path

import asyncpg
import orjson

from worker.config import Settings
from worker.decode.codecs import builtin_codec_path, load_codecs

from .helpers import publish, running_daemon, wait_for_committed, wait_for_count

F2 = "tele/f2-aabbccddee01/sensor-mode"
JSON = "devices/sim-json-01/telemetry"

# A float sensor whose codec knows its range, added to the built-in codecs for these tests.
GAUGE_CODEC = """
[gauge]
length = 8
fields = [{ name = "pressure", offset = 0, type = "float64be", unit = "hPa", min = 300, max = 1200 }]
"""
FLOAT_LIMITS = (1e308, 5e-324, -1e308)  # finite, storable, and absurd for any sensor


def climate_frame(temperature: float = 21.5) -> str:
    codec = load_codecs()["climate"]
    return codec.encode({"temperature": temperature, "humidity": 40.0, "pressure": 1000.0}).hex()


def f2_payload(data: str, timestamp: object = None) -> bytes:
    """An F2 payload; the default `"timestamp": null` asks for the receive time."""
    return orjson.dumps({"timestamp": timestamp, "data": data})


def use_gauge_codec(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "codecs.toml"
    path.write_text(builtin_codec_path().read_text(encoding="utf-8") + GAUGE_CODEC, encoding="utf-8")
    settings.pipeline.codecs = str(path)


async def range_battery(pg: asyncpg.Connection) -> None:
    """A plausible range on every JSON device's `battery` (volts)."""
    await pg.execute("UPDATE datapoints SET min_value = 2, max_value = 4.5 WHERE label = 'battery'")


# (reason, topic, payload): every message must become a dead letter with exactly its reason.
BAD_MESSAGES: list[tuple[str, str, bytes]] = [
    ("bad_json", f"{F2}/climate/sensor-room1", b"{not json"),
    ("bad_json", JSON, b""),  # an empty payload is not JSON
    ("bad_payload", f"{F2}/climate/sensor-room1", orjson.dumps({"timestamp": 1, "value": 3})),
    # Misspelt or missing timestamp keys: never stored at the receive time.
    ("bad_payload", f"{F2}/climate/sensor-room1", orjson.dumps({"timestaCp": 1, "data": climate_frame()})),
    ("bad_payload", f"{F2}/climate/sensor-room1", orjson.dumps({"tT": 2, "data": climate_frame()})),
    ("bad_payload", f"{F2}/climate/sensor-room1", orjson.dumps({"data": climate_frame(22.5)})),
    ("bad_hex", f"{F2}/climate/sensor-room1", orjson.dumps({"data": "zz11", "timestamp": None})),
    ("bad_frame", f"{F2}/climate/sensor-room1", f2_payload("0011")),
    ("unknown_codec", f"{F2}/plasma/sensor-room1", orjson.dumps({"data": "00"})),
    ("bad_topic", "tele/f2-nothex/sensor-mode/climate/sensor-room1", orjson.dumps({"data": "00"})),
    ("bad_topic", "stat/a/b/c/d", b"{}"),  # five levels but not the F2 layout
    ("bad_timestamp", f"{F2}/climate/sensor-room1", orjson.dumps({"data": "", "timestamp": "yesterday"})),
    (
        "timestamp_out_of_range",
        f"{F2}/climate/sensor-room1",
        orjson.dumps({"data": "", "timestamp": "2999-01-01T00:00:00Z"}),
    ),
    # The same in JSON's timed form: a misspelt `ts`.
    ("bad_payload", JSON, orjson.dumps({"tT": 1796378130246, "values": {"temperature": 21.0}})),
    ("unknown_device", "devices/nobody-knows-me/telemetry", orjson.dumps({"temperature": 1.0})),
    ("unknown_datapoint", JSON, orjson.dumps({"radiation": 1.0})),
    ("no_numeric_values", JSON, orjson.dumps({"temperature": "hot"})),
    ("too_large", JSON, b'{"temperature": 1.0, "pad": "' + b"x" * 70000 + b'"}'),
    # A frame with a fresh timestamp but a temperature outside the codec's min/max.
    ("out_of_range", f"{F2}/climate/sensor-room1", f2_payload(climate_frame(300.0))),
    # Values at the float limits: on a ranged JSON datapoint, and from a ranged F2 codec.
    *(("out_of_range", JSON, orjson.dumps({"temperature": 20.0, "battery": v})) for v in FLOAT_LIMITS),
    *(
        ("out_of_range", f"{F2}/gauge/sensor-tank", f2_payload(struct.pack(">d", v).hex()))
        for v in FLOAT_LIMITS
    ),
]


def fingerprint(topic: str, payload: bytes) -> bytes:
    """The dead letter's key (worker/sinks/postgres.py): one row per topic and payload."""
    return hashlib.sha256(topic.encode() + b"\0" + payload).digest()


async def test_each_bad_input_class_is_dead_lettered_with_its_reason(
    settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    use_gauge_codec(settings, tmp_path)
    await range_battery(pg)
    good = ("devices/sim-json-02/telemetry", orjson.dumps({"temperature": 20.0, "humidity": 50.0}))
    messages = [(topic, payload) for _, topic, payload in BAD_MESSAGES]
    assert len({fingerprint(*m) for m in messages}) == len(messages), "each bad message must be distinct"
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, [*messages, good])
        await wait_for_count(pg, "SELECT count(*) FROM dead_letters", len(messages))
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 2)
        await wait_for_committed(daemon, len(messages) + 1)
        assert daemon.metrics.counters["messages_committed"] == len(messages) + 1
    rows = await pg.fetch("SELECT fingerprint, reason FROM dead_letters")
    reasons = {bytes(row["fingerprint"]): row["reason"].split(":")[0] for row in rows}
    expected = {fingerprint(topic, payload): reason for reason, topic, payload in BAD_MESSAGES}
    assert reasons == expected
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 2  # only the good message
    misspelt = await pg.fetchval(
        "SELECT reason FROM dead_letters WHERE position($1::bytea in payload) > 0", b'"tT"'
    )
    assert misspelt.startswith("bad_payload: unexpected key 'tT'")
    big = await pg.fetchrow("SELECT payload, payload_size FROM dead_letters WHERE reason LIKE 'too_large%'")
    assert big["payload_size"] > 70000
    assert len(big["payload"]) == settings.pipeline.dead_letter_payload_bytes


async def test_a_value_outside_its_datapoint_range_dead_letters_the_whole_message(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    await range_battery(pg)
    stamp = int(time.time() * 1000)
    bad = [
        orjson.dumps({"temperature": 20.0, "battery": 1e308}),
        orjson.dumps({"ts": stamp, "values": {"humidity": 40.0, "battery": 5e-324}}),
        # One bad entry of a gateway's list spoils the list: all or nothing per message.
        orjson.dumps(
            [{"ts": stamp, "values": {"battery": 3.0}}, {"ts": stamp + 1, "values": {"battery": -1e308}}]
        ),
    ]
    at_bounds = [orjson.dumps({"temperature": 21.0, "battery": 4.5}), orjson.dumps({"battery": 2})]
    async with running_daemon(settings):
        await publish(settings.mqtt.url, [(JSON, payload) for payload in [*bad, *at_bounds]])
        await wait_for_count(pg, "SELECT count(*) FROM dead_letters", len(bad))
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 3)
    rows = await pg.fetch("SELECT reason FROM dead_letters ORDER BY reason")
    assert all(row["reason"].startswith("out_of_range: battery=") for row in rows), rows
    assert "outside [2, 4.5]" in rows[0]["reason"]
    stored = await pg.fetch(
        "SELECT p.label, x.value FROM decoded_data x JOIN datapoints p ON p.id = x.datapoint_id ORDER BY 1, 2"
    )
    assert [(r["label"], r["value"]) for r in stored] == [
        ("battery", 2.0),
        ("battery", 4.5),
        ("temperature", 21.0),
    ]


async def test_mixed_message_keeps_numbers_and_dead_letters_the_rest(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    payload = orjson.dumps({"temperature": 19.5, "humidity": 30, "battery": True, "note": "ok"})
    async with running_daemon(settings):
        await publish(settings.mqtt.url, [("devices/sim-json-03/telemetry", payload)])
        await wait_for_count(pg, "SELECT count(*) FROM dead_letters", 1)
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 2
    reason = await pg.fetchval("SELECT reason FROM dead_letters")
    assert reason.startswith("skipped_fields:") and "battery" in reason and "note" in reason


async def test_repeated_bad_message_is_one_row_counting_occurrences(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    bad = BAD_MESSAGES[0][1:]
    async with running_daemon(settings):
        await publish(settings.mqtt.url, [bad, bad, bad])
        await wait_for_count(pg, "SELECT coalesce(sum(occurrences), 0) FROM dead_letters", 3)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 1


async def test_unknown_devices_are_registered_when_the_policy_says_so(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    settings.pipeline.unknown_devices = "register"
    frame = f2_payload(climate_frame())
    messages = [
        ("devices/newcomer-1/telemetry", orjson.dumps({"temperature": 1.5, "humidity": 2})),
        ("tele/f2-AA-BB-CC-00-00-09/sensor-mode/climate/sensor-lab", frame),
    ]
    async with running_daemon(settings):
        await publish(settings.mqtt.url, messages)
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 5)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0
    mac_device = await pg.fetchrow("SELECT id, device_key FROM devices WHERE mac = 'aa:bb:cc:00:00:09'")
    assert mac_device["device_key"] == "f2-aabbcc000009"
    labels = await pg.fetch("SELECT label, unit FROM datapoints WHERE device_id = $1", mac_device["id"])
    assert {(r["label"], r["unit"]) for r in labels} == {
        ("lab.temperature", "°C"),
        ("lab.humidity", "%"),
        ("lab.pressure", "hPa"),
    }


async def test_disabled_device_is_rejected(settings: Settings, pg: asyncpg.Connection) -> None:
    await pg.execute("UPDATE devices SET status = 'disabled' WHERE device_key = 'sim-json-04'")
    async with running_daemon(settings):
        await publish(settings.mqtt.url, [("devices/sim-json-04/telemetry", b'{"temperature": 3}')])
        await wait_for_count(pg, "SELECT count(*) FROM dead_letters", 1)
    assert (await pg.fetchval("SELECT reason FROM dead_letters")).startswith("device_disabled")


async def test_poison_payloads_are_dead_lettered_without_restarting_anything(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    messages = [
        # A NUL in a name: PostgreSQL text cannot hold it, so it must never reach SQL.
        ("devices/sim-json-01/telemetry", b'{"te\\u0000mp": "x", "humidity": 50}'),
        # A year-9999 time pushed past the calendar by its zone.
        (
            "devices/sim-json-01/telemetry",
            orjson.dumps({"ts": "9999-12-31T23:59:59-01:00", "values": {"humidity": 1}}),
        ),
    ]
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, messages)
        await wait_for_count(pg, "SELECT count(*) FROM dead_letters", 2)
        assert daemon.supervisor.restarts_total == 0
    reasons = sorted(r["reason"].split(":")[0] for r in await pg.fetch("SELECT reason FROM dead_letters"))
    assert reasons == ["bad_timestamp", "skipped_fields"]
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == 1  # the humidity beside the NUL name


async def test_registering_typos_stops_at_the_hourly_datapoint_cap(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    settings.pipeline.unknown_devices = "register"
    settings.pipeline.max_new_datapoints_per_hour = 2
    typos = [orjson.dumps({name: 1.0}) for name in ("temperatur", "temprature", "tempreature", "tmperature")]
    async with running_daemon(settings):
        await publish(settings.mqtt.url, [(JSON, payload) for payload in typos])
        await wait_for_count(pg, "SELECT count(*) FROM dead_letters", 2)
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 2)
    reasons = sorted(r["reason"] for r in await pg.fetch("SELECT reason FROM dead_letters"))
    assert [r.split(":")[0] for r in reasons] == ["datapoint_limit"] * 2
    assert "tempreature" in reasons[0] and "tmperature" in reasons[1]
    assert "pipeline.max_new_datapoints_per_hour (2)" in reasons[0]
    labels = await pg.fetch(
        "SELECT label FROM datapoints p JOIN devices d ON d.id = p.device_id WHERE d.device_key = 'sim-json-01'"
    )
    assert {r["label"] for r in labels} == {"temperature", "humidity", "battery", "temperatur", "temprature"}
