"""Every class of bad input becomes a dead letter with a reason; the worker stays up."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson

from worker.config import Settings
from worker.decode.codecs import load_codecs

from .helpers import publish, running_daemon, wait_for, wait_for_count

F2 = "tele/f2-aabbccddee01/sensor-mode"


def climate_frame(temperature: float = 21.5) -> str:
    codec = load_codecs()["climate"]
    return codec.encode({"temperature": temperature, "humidity": 40.0, "pressure": 1000.0}).hex()


def f2_payload(data: str, timestamp: object = "2026-01-01T00:00:00Z") -> bytes:
    return orjson.dumps({"timestamp": timestamp, "data": data})


BAD_MESSAGES: dict[str, tuple[str, bytes]] = {
    "bad_json": (f"{F2}/climate/sensor-room1", b"{not json"),
    "bad_payload": (f"{F2}/climate/sensor-room1", orjson.dumps({"timestamp": 1, "value": 3})),
    "bad_hex": (f"{F2}/climate/sensor-room1", orjson.dumps({"data": "zz11", "timestamp": None})),
    "bad_frame": (f"{F2}/climate/sensor-room1", orjson.dumps({"data": "0011"})),
    "unknown_codec": (f"{F2}/plasma/sensor-room1", orjson.dumps({"data": "00"})),
    "bad_topic": ("tele/f2-nothex/sensor-mode/climate/sensor-room1", orjson.dumps({"data": "00"})),
    "bad_topic ": ("stat/a/b/c/d", b"{}"),  # five levels but not the F2 layout
    "bad_timestamp": (f"{F2}/climate/sensor-room1", orjson.dumps({"data": "", "timestamp": "yesterday"})),
    "timestamp_out_of_range": (
        f"{F2}/climate/sensor-room1",
        orjson.dumps({"data": "", "timestamp": "2999-01-01T00:00:00Z"}),
    ),
    "unknown_device": ("devices/nobody-knows-me/telemetry", orjson.dumps({"temperature": 1.0})),
    "unknown_datapoint": ("devices/sim-json-01/telemetry", orjson.dumps({"radiation": 1.0})),
    "no_numeric_values": ("devices/sim-json-01/telemetry", orjson.dumps({"temperature": "hot"})),
    "too_large": ("devices/sim-json-01/telemetry", b'{"temperature": 1.0, "pad": "' + b"x" * 70000 + b'"}'),
    "empty_payload": ("devices/sim-json-01/telemetry", b""),
}


async def test_each_bad_input_class_is_dead_lettered_with_its_reason(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    good = ("devices/sim-json-02/telemetry", orjson.dumps({"temperature": 20.0, "humidity": 50.0}))
    messages = list(BAD_MESSAGES.values())
    # A climate frame with a fresh timestamp but an out-of-range temperature (codec min/max).
    messages.append((f"{F2}/climate/sensor-room1", f2_payload(climate_frame(300.0), None)))
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, [*messages, good])
        await wait_for_count(pg, "SELECT count(*) FROM dead_letters", len(messages))
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 2)
        counters = daemon.metrics.counters  # they move once the batch's other sinks finish too
        await wait_for(lambda: asyncio.sleep(0, counters["messages_committed"] >= len(messages) + 1))
        assert counters["messages_committed"] == len(messages) + 1
    reasons = {row["reason"].split(":")[0] for row in await pg.fetch("SELECT reason FROM dead_letters")}
    # The empty payload is bad JSON; the out-of-range temperature is a bad frame.
    assert reasons == {key.strip() for key in BAD_MESSAGES} - {"empty_payload"}
    big = await pg.fetchrow("SELECT payload, payload_size FROM dead_letters WHERE reason LIKE 'too_large%'")
    assert big["payload_size"] > 70000
    assert len(big["payload"]) == settings.pipeline.dead_letter_payload_bytes


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
    bad = BAD_MESSAGES["bad_json"]
    async with running_daemon(settings):
        await publish(settings.mqtt.url, [bad, bad, bad])
        await wait_for_count(pg, "SELECT coalesce(sum(occurrences), 0) FROM dead_letters", 3)
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 1


async def test_unknown_devices_are_registered_when_the_policy_says_so(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    settings.pipeline.unknown_devices = "register"
    frame = f2_payload(climate_frame(), None)
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
