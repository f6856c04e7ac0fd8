"""Topic and JSON mappings: the loader, the routing, the payload rules, the commands.

The profiles against the real daemon, broker and PostgreSQL are in test_mapped_daemon.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from schemas.records import Reason
from worker.decode.codecs import load_codecs
from worker.decode.mappings import MappingConfigError, MappingSet, load_mappings, profile_names
from worker.decode.parse import Ignored, Limits, ParsedMessage, Rejected, parse_message

NOW = time.time()
CODECS = load_codecs()
ALL_PROFILES = ["tasmota", "zigbee2mqtt", "shelly", "esphome"]

# A mapping file of one's own: a wildcard over an array, each time format, the types.
SITE = """
[meter]
topic = "site/{site}/meter/{device}"
time = "at"
time_format = "ms"
fields = [
  { path = "channels.*.power", unit = "W" },
  { path = "relay", type = "boolean" },
  { path = "note", type = "text" },
  { path = "temp_dC", name = "temperature", scale = 0.1, unit = "°C" },
]
ignore = ["channels.*.id"]

[iso]
topic = "site/{site}/iso/{device}"
time = "meta.time"
fields = [{ path = "value" }]

[seconds]
topic = "site/{site}/seconds/{device}"
time = "t"
time_format = "s"
label = "{site}.{path}"

[gauge]
topic = "site/{site}/gauge/{device}/{name}"
payload = "value"
label = "{name}"
type = "number"
unit = "cm"
"""


def _mappings(tmp_path: Path, text: str = SITE, profiles: list[str] | None = None) -> MappingSet:
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    return load_mappings(profiles or [], [path])


def _parse(mappings: MappingSet, topic: str, payload: bytes, keep_text: bool = False) -> ParsedMessage:
    return parse_message(topic, payload, NOW, CODECS, Limits(keep_text=keep_text), mappings)


def _readings(parsed: ParsedMessage) -> dict[str, float | str]:
    texts = parsed.texts or [None] * len(parsed.labels)
    return {
        label: value if text is None else text
        for label, value, text in zip(parsed.labels, parsed.values, texts, strict=True)
    }


def test_the_shipped_profiles_load_together_beside_the_built_in_layouts() -> None:
    assert profile_names() == sorted(ALL_PROFILES)
    mappings = load_mappings(ALL_PROFILES)
    assert "tele/+/SENSOR" in mappings.filters and "+/events/rpc" in mappings.filters
    # `tele/status/SENSOR` would match Tasmota's and Shelly's templates: the literal level
    # further left wins, and the built-in layouts keep theirs.
    assert _parse(mappings, "tele/status/SENSOR", b'{"ENERGY": {"Power": 5}}').labels == ["ENERGY.Power"]
    f2 = _parse(
        mappings, "tele/f2-aabbccddee01/sensor-mode/io/sensor-door", b'{"timestamp": null, "data": "0146"}'
    )
    assert f2.device.kind == "mac"
    assert _parse(mappings, "devices/d1/telemetry", b'{"t": 1}').labels == ["t"]


def test_a_wildcard_over_an_array_with_a_time_in_ms_a_boolean_a_scale_and_a_name(tmp_path: Path) -> None:
    mappings = _mappings(tmp_path)
    at = int(NOW * 1000) - 5000
    payload = (
        b'{"at": %d, "relay": "ON", "temp_dC": 215, "note": "door left open",'
        b' "channels": [{"id": 1, "power": 12.5}, {"id": 2, "power": 7}]}' % at
    )
    parsed = _parse(mappings, "site/north/meter/m-1", payload)
    assert (parsed.device.kind, parsed.device.value) == ("key", "m-1")
    assert _readings(parsed) == {
        "channels.0.power": 12.5,
        "channels.1.power": 7.0,
        "relay": 1.0,
        "temperature": 21.5,
    }
    assert dict(zip(parsed.labels, parsed.units or [], strict=True)) == {
        "channels.0.power": "W",
        "channels.1.power": "W",
        "relay": None,
        "temperature": "°C",
    }
    assert parsed.timestamps[0] == datetime.fromtimestamp(at / 1000, UTC)
    # Text asked for by its exact path: kept where the store has a text column, said otherwise.
    assert parsed.skipped == ["note: text value, kept only where the store has a text column"]
    kept = _parse(mappings, "site/north/meter/m-1", payload, keep_text=True)
    assert _readings(kept)["note"] == "door left open" and kept.skipped == []


def test_iso_and_epoch_second_times_and_a_label_from_the_topic(tmp_path: Path) -> None:
    mappings = _mappings(tmp_path)
    measured = datetime.fromtimestamp(int(NOW) - 3600, UTC)
    local = measured.astimezone(timezone(timedelta(hours=1))).isoformat()  # "…T10:00:00+01:00"
    parsed = _parse(mappings, "site/north/iso/d-2", b'{"meta": {"time": "%s"}, "value": 3}' % local.encode())
    assert parsed.timestamps == [measured]
    seconds = _parse(mappings, "site/north/seconds/d-3", b'{"t": %d, "a": 1, "b": true}' % int(NOW))
    assert _readings(seconds) == {"north.a": 1.0, "north.b": 1.0}
    assert seconds.timestamps[0] == datetime.fromtimestamp(int(NOW), UTC)


def test_iso_time_is_checked_like_every_other_time(tmp_path: Path) -> None:
    mappings = _mappings(tmp_path)
    with pytest.raises(Rejected) as caught:
        _parse(mappings, "site/north/iso/d-2", b'{"meta": {"time": "2001-01-01T00:00:00Z"}, "value": 3}')
    assert caught.value.reason == Reason.TIMESTAMP_OUT_OF_RANGE
    assert caught.value.detail.startswith("mapping site.iso: time meta.time")
    with pytest.raises(Rejected) as caught:
        _parse(mappings, "site/north/iso/d-2", b'{"value": 3}')
    assert (caught.value.reason, caught.value.detail) == (
        Reason.BAD_TIMESTAMP,
        "mapping site.iso: time meta.time is missing",
    )


def test_a_bare_value(tmp_path: Path) -> None:
    parsed = _parse(_mappings(tmp_path), "site/north/gauge/tank-1/level", b" 143.5\n")
    assert (_readings(parsed), parsed.units, parsed.device.value) == ({"level": 143.5}, ["cm"], "tank-1")
    with pytest.raises(Rejected) as caught:  # a datapoint label longer than one can be
        _parse(_mappings(tmp_path), f"site/north/gauge/tank-1/{'x' * 200}", b"1")
    assert caught.value.reason == Reason.BAD_TOPIC and caught.value.detail.startswith("mapping site.gauge:")


def test_a_payload_missing_its_rule_is_a_dead_letter_naming_the_mapping(tmp_path: Path) -> None:
    mappings = _mappings(tmp_path)
    cases = [
        ("site/north/meter/m-1", b'{"at": %d, "other": 1}' % int(NOW * 1000), Reason.NO_NUMERIC_VALUES),
        ("site/north/meter/m-1", b"not json", Reason.BAD_JSON),
        ("site/north/gauge/tank-1/level", b"full", Reason.NO_NUMERIC_VALUES),
    ]
    for topic, payload, reason in cases:
        with pytest.raises(Rejected) as caught:
            _parse(mappings, topic, payload)
        assert caught.value.reason == reason
        assert caught.value.detail.startswith(f"mapping site.{topic.split('/')[2]}:")


def test_profiles_text_and_boolean_values_and_what_they_ignore() -> None:
    mappings = load_mappings(ALL_PROFILES)
    esphome_text = "kitchen/text_sensor/firmware/state"
    assert _readings(_parse(mappings, esphome_text, b"2024.6.1", keep_text=True)) == {"firmware": "2024.6.1"}
    with pytest.raises(Ignored):  # no text column: a text entity is left out, not a dead letter
        _parse(mappings, esphome_text, b"2024.6.1")
    assert _readings(_parse(mappings, "kitchen/binary_sensor/motion/state", b"OFF")) == {"motion": 0.0}
    # A button press: text only, a wildcard's; neither stored nor a dead letter without a column.
    with pytest.raises(Ignored):
        _parse(mappings, "zigbee2mqtt/button", b'{"action": "single"}')
    assert _readings(_parse(mappings, "zigbee2mqtt/button", b'{"action": "single"}', keep_text=True)) == {
        "action": "single"
    }
    with pytest.raises(Ignored):
        _parse(mappings, "zigbee2mqtt/bridge/state", b'{"state": "online"}')
    with pytest.raises(Ignored):  # a NotifyEvent is not a status
        _parse(
            mappings, "shelly1-x/events/rpc", b'{"method": "NotifyEvent", "params": {"ts": 1, "events": []}}'
        )


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            '[m]\ntopic = "a/{device}"\ntime_format = "iso8601"\ntime = "t"\n',
            ":3: mapping 'm', field 'time_format'",
        ),
        ('[m]\ntopic = "a/{dev}"\n', ":1: mapping 'm', field 'device'"),
        ('[m]\ntopic = "a/{device}/#"\n', ":2: mapping 'm', field 'topic'"),
        (
            '[m]\ntopic = "a/{device}"\nfields = [\n  { path = "x" },\n  { path = "y", scale = 0 },\n]\n',
            ":5: mapping 'm', field 'fields[y].scale'",
        ),
        ('[m]\ntopic = "a/{device}"\nlabel = "{room}.{path}"\n', ":3: mapping 'm', field 'label'"),
        ('[m]\ntopic = "a/{device}"\ncolour = 1\n', ":3: mapping 'm', field 'colour'"),
        ('[m]\ntopic = "a/{device}"\npayload = "value"\n', ":1: mapping 'm', field 'label'"),
        ('ignore_topics = ["a/#/b"]\n', ":1: field 'ignore_topics'"),
        ("[m\n", "not valid TOML"),
    ],
)
def test_a_malformed_mapping_file_names_file_line_and_field(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(MappingConfigError) as caught:
        _mappings(tmp_path, text)
    assert str(caught.value).startswith(str(tmp_path / "site.toml")) and where in str(caught.value)


def test_overlapping_templates_are_refused_naming_both(tmp_path: Path) -> None:
    with pytest.raises(MappingConfigError) as caught:
        _mappings(tmp_path, '[mine]\ntopic = "zigbee2mqtt/{sensor}"\ndevice = "sensor"\n', ["zigbee2mqtt"])
    message = str(caught.value)
    assert "overlapping topic templates" in message
    assert (
        "zigbee2mqtt.device (zigbee2mqtt/{device}" in message and "site.mine (zigbee2mqtt/{sensor}" in message
    )
    with pytest.raises(MappingConfigError, match="the built-in layout devices/{}/telemetry and site.t"):
        _mappings(tmp_path, '[t]\ntopic = "devices/{device}/telemetry"\n')
    with pytest.raises(MappingConfigError, match="no profile 'tasmotta'"):
        load_mappings(["tasmotta"])


# --- the commands ---------------------------------------------------------------------------------


def _iotflow(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def test_mappings_test_prints_readings_or_the_dead_letter_and_list_the_subscriptions(tmp_path: Path) -> None:
    (tmp_path / "site.toml").write_text(SITE, encoding="utf-8")
    env = {
        "IOTFLOW_DECODE_PROFILES": "tasmota,zigbee2mqtt",
        "IOTFLOW_DECODE_MAPPINGS": str(tmp_path / "site.toml"),
        "IOTFLOW_MQTT_SHARED_GROUP": "fleet",
    }
    payload = '{"Time": "2026-01-01T00:00:00", "ENERGY": {"Power": 45, "Voltage": 230}}'
    done = _iotflow("mappings", "test", "--topic", "tele/plug-1/SENSOR", "--payload", payload, **env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:5] for line in lines] == [
        ["key", "plug-1", "ENERGY.Power", "45", "W"],
        ["key", "plug-1", "ENERGY.Voltage", "230", "V"],
    ]
    dead = _iotflow("mappings", "test", "--topic", "tele/plug-1/SENSOR", "--payload", '{"ENERGY": ', **env)
    assert dead.returncode == 1
    assert dead.stdout.startswith("dead letter: bad_json: mapping tasmota.sensor:")
    ignored = _iotflow("mappings", "test", "--topic", "zigbee2mqtt/bridge/info", "--payload", "{}", **env)
    assert (ignored.returncode, ignored.stdout) == (
        0,
        "ignored: zigbee2mqtt/bridge/info (acknowledged, nothing stored)\n",
    )

    listed = _iotflow("mappings", "list", **env)
    assert listed.returncode == 0, listed.stderr
    assert "site.meter" in listed.stdout and "profile tasmota" in listed.stdout
    assert "ignored: zigbee2mqtt/bridge/# (profile zigbee2mqtt)" in listed.stdout
    subscriptions = listed.stdout.splitlines()[-1]
    assert "$share/fleet/tele/+/SENSOR" in subscriptions and "$share/fleet/site/+/meter/+" in subscriptions
    assert "$share/fleet/devices/+/telemetry" in subscriptions  # mqtt.topics stay


def test_run_refuses_a_malformed_mapping_file_with_exit_2_and_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "plugs.toml"
    bad.write_text('[plug]\ntopic = "plugs/{device}"\nfields = [{ path = "power", unit = 230 }]\n')
    done = _iotflow("run", IOTFLOW_DECODE_MAPPINGS=str(bad))
    assert done.returncode == 2
    assert done.stderr == (
        f"iotflow: configuration error: {bad}:3: mapping 'plug', field 'fields[power].unit': must be text\n"
    )
    overlapping = tmp_path / "z2m.toml"
    overlapping.write_text('[mine]\ntopic = "zigbee2mqtt/{device}"\n')
    done = _iotflow("run", IOTFLOW_DECODE_MAPPINGS=str(overlapping), IOTFLOW_DECODE_PROFILES="zigbee2mqtt")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert "overlapping topic templates: zigbee2mqtt.device" in done.stderr and "z2m.mine" in done.stderr
