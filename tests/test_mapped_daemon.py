"""The shipped profiles and a mapping file of one's own, end to end: messages as each firmware
documents them, published through Mosquitto to the running daemon and read back from
PostgreSQL; one daemon for every profile. Then a SIGHUP reloading a mapping file.
"""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path

import asyncpg
import orjson

from worker.config import Settings

from .helpers import publish, running_daemon, wait_for_committed, wait_for_count, worker_process

NOW = time.time()

# Tasmota, https://tasmota.github.io/docs/MQTT/ (tele/%topic%/SENSOR and STATE every TelePeriod)
# with the ENERGY object of https://tasmota.github.io/docs/Power-Monitoring-Calibration/.
TASMOTA = [
    (
        "tele/plug-kitchen/SENSOR",
        b'{"Time":"2021-01-15T10:00:00","ENERGY":{"TotalStartTime":"2020-12-01T18:40:46","Total":12.345,'
        b'"Yesterday":0.512,"Today":0.253,"Period":3,"Power":45,"ApparentPower":50,"ReactivePower":21,'
        b'"Factor":0.9,"Voltage":230,"Current":0.196}}',
    ),
    (
        "tele/plug-kitchen/STATE",
        b'{"Time":"2021-01-15T10:00:00","Uptime":"0T01:00:00","UptimeSec":3600,"Heap":25,'
        b'"SleepMode":"Dynamic","Sleep":50,"LoadAvg":19,"MqttCount":1,"POWER":"ON","Wifi":{"AP":1,'
        b'"SSId":"home","BSSId":"AA:BB:CC:DD:EE:FF","Channel":1,"RSSI":70,"Signal":-65,"LinkCount":1,'
        b'"Downtime":"0T00:00:03"}}',
    ),
]
# Zigbee2MQTT, https://www.zigbee2mqtt.io/guide/usage/mqtt_topics_and_messages.html (the
# examples of zigbee2mqtt/FRIENDLY_NAME; the bridge's own topics are ignored).
ZIGBEE2MQTT = [
    ("zigbee2mqtt/hall-climate", b'{"temperature": 27.34, "humidity": 44.72}'),
    ("zigbee2mqtt/hall-bulb", b'{"state": "ON", "brightness": 215, "color_temp": 325}'),
    ("zigbee2mqtt/hall-motion", b'{"occupancy": true}'),
    ("zigbee2mqtt/hall-switch", b'{"action": "single"}'),  # text only: no column in PostgreSQL
    ("zigbee2mqtt/bridge/state", b'{"state": "online"}'),
    ("zigbee2mqtt/bridge/logging", b'{"level": "info", "message": "MQTT publish"}'),
]
# Shelly Gen2, https://shelly-api-docs.shelly.cloud/gen2/General/Notifications (NotifyStatus on
# <id>/events/rpc; `ts` made recent) and the Switch status of
# https://shelly-api-docs.shelly.cloud/gen2/ComponentsAndServices/Switch (on <id>/status/switch:0).
SHELLY = [
    (
        "shellyplus1pm-a8032ab636ec/events/rpc",
        b'{"src":"shellyplus1pm-a8032ab636ec","dst":"shellyplus1pm-a8032ab636ec/events",'
        b'"method":"NotifyStatus","params":{"ts":%.2f,"switch:0":{"id":0,"apower":8.9,"current":0.04}}}'
        % (NOW - 10),
    ),
    (
        "shellyplus1pm-a8032ab636ec/status/switch:0",
        b'{"id":0,"source":"timer","output":true,"apower":8.9,"voltage":237.5,"current":0.068,'
        b'"aenergy":{"total":6.532,"by_minute":[45.199,47.141,88.397],"minute_ts":1654511972},'
        b'"temperature":{"tC":23.5,"tF":74.4}}',
    ),
    (
        "shellyplus1pm-a8032ab636ec/events/rpc",
        b'{"src":"shellyplus1pm-a8032ab636ec","dst":"shellyplus1pm-a8032ab636ec/events",'
        b'"method":"NotifyEvent","params":{"ts":1631266595.43,"events":[{"component":"input:0",'
        b'"id":0,"event":"single_push","ts":1631266595.43}]}}',
    ),
]
# ESPHome, https://esphome.io/components/mqtt.html: <prefix>/<component>/<object_id>/state, a
# bare value; a binary sensor publishes ON or OFF.
ESPHOME = [
    ("livingroom/sensor/temperature/state", b"21.6"),
    ("livingroom/binary_sensor/window/state", b"OFF"),
    ("livingroom/text_sensor/firmware/state", b"2024.6.1"),  # text: no column in PostgreSQL
]
SITE = """
[meter]
topic = "site/{site}/meter/{device}"
time = "at"
time_format = "ms"
fields = [
  { path = "channels.*.power", unit = "W" },
  { path = "relay", type = "boolean" },
  { path = "note", type = "text" },
]
"""
READINGS = """
SELECT d.device_key, p.label, p.unit, x.value, x.timestamp
FROM decoded_data x JOIN datapoints p ON p.id = x.datapoint_id JOIN devices d ON d.id = x.device_id
"""


async def test_every_profile_and_a_file_of_ones_own_through_the_real_daemon(
    settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    site = tmp_path / "site.toml"
    site.write_text(SITE, encoding="utf-8")
    settings.decode = replace(
        settings.decode, profiles=["tasmota", "zigbee2mqtt", "shelly", "esphome"], mappings=[str(site)]
    )
    settings.pipeline = replace(settings.pipeline, unknown_devices="register")
    # The profile subscribes to zigbee2mqtt/+; a broader subscription of one's own (friendly
    # names with a `/` want zigbee2mqtt/#) takes in the bridge's topics, which are ignored.
    settings.mqtt = replace(settings.mqtt, topics=[*settings.mqtt.topics, "zigbee2mqtt/bridge/#"])
    at = int(NOW * 1000) - 60_000
    own = [
        (
            "site/north/meter/m-1",
            b'{"at": %d, "relay": false, "note": "ok", "channels": [{"power": 12.5}, {"power": 7}]}' % at,
        ),
        ("site/north/meter/m-1", b'{"at": %d, "channels": "none"}' % at),  # the template, not its rule
        ("elsewhere/m-1", b"{}"),  # no mapping: not subscribed, never seen
    ]
    messages = TASMOTA + ZIGBEE2MQTT + SHELLY + ESPHOME + own
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, messages)
        await wait_for_committed(daemon, len(messages) - 1)
        await wait_for_count(pg, "SELECT count(*) FROM dead_letters", 2)
    rows = {(r["device_key"], r["label"]): (r["unit"], r["value"]) for r in await pg.fetch(READINGS)}
    assert rows == {
        ("plug-kitchen", "ENERGY.Power"): ("W", 45),
        ("plug-kitchen", "ENERGY.ApparentPower"): ("VA", 50),
        ("plug-kitchen", "ENERGY.ReactivePower"): ("var", 21),
        ("plug-kitchen", "ENERGY.Voltage"): ("V", 230),
        ("plug-kitchen", "ENERGY.Current"): ("A", 0.196),
        ("plug-kitchen", "ENERGY.Total"): ("kWh", 12.345),
        ("plug-kitchen", "ENERGY.Today"): ("kWh", 0.253),
        ("plug-kitchen", "ENERGY.Yesterday"): ("kWh", 0.512),
        ("plug-kitchen", "ENERGY.Period"): ("Wh", 3),
        ("plug-kitchen", "ENERGY.Factor"): (None, 0.9),
        ("plug-kitchen", "POWER"): (None, 1),
        ("plug-kitchen", "UptimeSec"): ("s", 3600),
        ("plug-kitchen", "Heap"): ("kB", 25),
        ("plug-kitchen", "LoadAvg"): (None, 19),
        ("plug-kitchen", "Wifi.RSSI"): ("%", 70),
        ("plug-kitchen", "Wifi.Signal"): ("dBm", -65),
        ("hall-climate", "temperature"): ("°C", 27.34),
        ("hall-climate", "humidity"): ("%", 44.72),
        ("hall-bulb", "state"): (None, 1),
        ("hall-bulb", "brightness"): (None, 215),
        ("hall-bulb", "color_temp"): (None, 325),
        ("hall-motion", "occupancy"): (None, 1),
        ("shellyplus1pm-a8032ab636ec", "switch:0.apower"): ("W", 8.9),
        ("shellyplus1pm-a8032ab636ec", "switch:0.current"): ("A", 0.068),
        ("shellyplus1pm-a8032ab636ec", "switch:0.voltage"): ("V", 237.5),
        ("shellyplus1pm-a8032ab636ec", "switch:0.aenergy.total"): ("Wh", 6.532),
        ("shellyplus1pm-a8032ab636ec", "switch:0.temperature.tC"): ("°C", 23.5),
        ("shellyplus1pm-a8032ab636ec", "switch:0.output"): (None, 1),
        ("livingroom", "temperature"): (None, 21.6),
        ("livingroom", "window"): (None, 0),
        ("m-1", "channels.0.power"): ("W", 12.5),
        ("m-1", "channels.1.power"): ("W", 7),
    } | {("m-1", "relay"): (None, 0)}
    # The NotifyStatus keeps its own time (`ts`, epoch seconds), the status topic has the
    # receive time; the file's meter its time in ms.
    times = await pg.fetch(f"{READINGS} WHERE p.label = 'switch:0.apower' ORDER BY x.timestamp")
    assert abs(times[0]["timestamp"].timestamp() - (NOW - 10)) < 0.01 and len(times) == 2
    times = {(r["device_key"], r["label"]): r["timestamp"].timestamp() for r in await pg.fetch(READINGS)}
    assert times["m-1", "channels.0.power"] == at / 1000
    dead = {r["reason"]: r["topic"] for r in await pg.fetch("SELECT topic, reason FROM dead_letters")}
    assert dead == {
        "skipped_fields: note: text value, kept only where the store has a text column": "site/north/meter/m-1",
        "no_numeric_values: mapping site.meter: no value at channels.*.power, relay, note": "site/north/meter/m-1",
    }


async def test_sighup_reloads_a_mapping_file_and_names_a_new_subscription(
    settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    lab = tmp_path / "lab.toml"
    lab.write_text('[tank]\ntopic = "lab/{device}/tank"\nfields = [{ path = "level", unit = "cm" }]\n')
    config = tmp_path / "iotflow.toml"
    config.write_text(f'[decode]\nmappings = ["{lab}"]\n')
    topic, payload = "lab/tank-1/tank", orjson.dumps({"level": 42})
    query = "SELECT count(*) FROM decoded_data x JOIN datapoints p ON p.id = x.datapoint_id"
    async with worker_process(
        settings, "--config", str(config), IOTFLOW_PIPELINE_UNKNOWN_DEVICES="register"
    ) as worker:
        await worker.wait_for_event("supervisor.ready")
        await publish(settings.mqtt.url, [(topic, payload)])
        await wait_for_count(pg, f"{query} WHERE p.label = 'level' AND x.value = 42", 1)
        # The same topic, another label and a scale: applied at once. A new template's filter
        # waits for a restart, and the reload says so.
        lab.write_text(
            '[tank]\ntopic = "lab/{device}/tank"\nfields = [{ path = "level", name = "level_mm", scale = 10 }]\n'
            '[pump]\ntopic = "lab/{device}/pump"\n'
        )
        worker.process.send_signal(signal.SIGHUP)
        done = await worker.wait_for_event("reload.done")
        assert done["mappings"] == ["lab.tank", "lab.pump"]
        restart = await worker.wait_for_event("reload.restart_needed")
        assert restart["settings"] == ["subscriptions"]
        await publish(settings.mqtt.url, [(topic, payload)])
        await wait_for_count(pg, f"{query} WHERE p.label = 'level_mm' AND x.value = 420", 1)
        assert await worker.terminate() == 0
