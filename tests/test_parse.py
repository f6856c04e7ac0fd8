"""Topic and payload parsing, without I/O."""

from __future__ import annotations

import math
import struct
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from worker.decode.codecs import load_codecs
from worker.decode.parse import DeviceRef, Limits, MessageParser, Rejected, normalise_mac, parse_message
from worker.tools.simulate import build_fleet, message_stream

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC).timestamp()
CODECS = load_codecs()
LIMITS = Limits()


def parse(topic: str, body: object) -> object:
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_message(topic, payload, NOW, CODECS, LIMITS)


@pytest.mark.parametrize("mac", ["aa:bb:cc:dd:ee:01", "AABBCCDDEE01", "aa-bb-cc-dd-ee-01", "aabb.ccdd.ee01"])
def test_mac_forms_normalise_to_colon_lower_case(mac: str) -> None:
    assert normalise_mac(mac) == "aa:bb:cc:dd:ee:01"


@pytest.mark.parametrize("mac", ["aabbccddee0", "aabbccddee011", "aabbccddee0g", "aa:bb:cc:dd:ee:0 1", ""])
def test_what_is_no_mac_is_rejected(mac: str) -> None:
    with pytest.raises(Rejected, match="is not a MAC address"):
        normalise_mac(mac)


def test_the_topics_of_a_fleet_share_their_labels() -> None:
    """A topic's labels are worked out once per sensor mode and label, not once per device."""
    parser = MessageParser(CODECS, LIMITS)
    frame = CODECS["climate"].encode({"temperature": 21.5, "humidity": 40, "pressure": 990}).hex()
    payload = orjson.dumps({"timestamp": "2026-11-22T11:59:00Z", "data": frame})
    first, second, other = (
        parser.parse(f"tele/f2-{mac}/sensor-mode/climate/sensor-{label}", payload, NOW)
        for mac, label in [("aabbccddee01", "room1"), ("aabbccddee02", "room1"), ("aabbccddee03", "hall")]
    )
    assert first.device != second.device
    assert first.labels is second.labels
    assert other.labels == ("hall.temperature", "hall.humidity", "hall.pressure")


def test_f2_frame_becomes_labelled_readings() -> None:
    frame = CODECS["climate"].encode({"temperature": 21.5, "humidity": 40, "pressure": 990})
    message = parse(
        "tele/f2-AABBCCDDEE01/sensor-mode/climate/sensor-room1",
        {"timestamp": "2026-11-22T11:59:00.123456Z", "data": frame.hex().upper()},
    )
    assert message.device == DeviceRef("mac", "aa:bb:cc:dd:ee:01")
    assert list(zip(message.labels, message.values, message.units or (), strict=True)) == [
        ("room1.temperature", 21.5, "°C"),
        ("room1.humidity", 40.0, "%"),
        ("room1.pressure", 990.0, "hPa"),
    ]
    assert message.timestamps == [datetime(2026, 11, 22, 11, 59, 0, 123456, tzinfo=UTC)] * 3


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        (NOW - 60, NOW - 60),  # epoch seconds
        ((NOW - 60) * 1000, NOW - 60),  # epoch milliseconds
        ("2026-11-22T13:59:00+02:00", NOW - 60),  # with a zone
        ("2026-11-22T11:59:00", NOW - 60),  # naive means UTC
        (None, NOW),  # absent: receive time
    ],
)
def test_timestamp_forms(stamp: object, expected: float) -> None:
    frame = CODECS["io"].encode({"relay1": 1, "rssi": -50})
    message = parse(
        "stat/f2-aabbccddee01/sensor-mode/io/sensor-relay", {"timestamp": stamp, "data": frame.hex()}
    )
    assert message.timestamps[0].timestamp() == pytest.approx(expected)


def test_json_telemetry_forms() -> None:
    flat = parse("devices/dev-1/telemetry", {"temperature": 23.5, "humidity": 61})
    assert flat.device == DeviceRef("key", "dev-1")
    assert list(zip(flat.labels, flat.values, strict=True)) == [("temperature", 23.5), ("humidity", 61.0)]
    assert flat.timestamps[0].timestamp() == NOW

    ms = int(NOW * 1000) - 5877
    timed = parse("devices/dev-1/telemetry", {"ts": ms, "values": {"temperature": 1}})
    assert timed.timestamps == [datetime.fromtimestamp(ms / 1000, UTC)]

    batch = parse(
        "devices/dev-1/telemetry",
        [{"ts": ms, "values": {"a": 1}}, {"ts": ms + 1, "values": {"a": 2}}],
    )
    assert batch.values == [1.0, 2.0]
    assert batch.timestamps == [datetime.fromtimestamp(t / 1000, UTC) for t in (ms, ms + 1)]


def test_strings_and_booleans_are_skipped_with_a_reason() -> None:
    message = parse("devices/dev-1/telemetry", {"t": 1.0, "ok": True, "state": "on"})
    assert list(message.labels) == ["t"]
    assert message.skipped == [
        "ok: bool value, only numbers are stored",
        "state: str value, only numbers are stored",
    ]


@pytest.mark.parametrize(
    ("topic", "body", "code"),
    [
        ("devices/x/telemetry", b"\xff\xfe", "bad_json"),
        ("devices/x/telemetry", [], "bad_payload"),
        ("devices/x/telemetry", [1, 2], "bad_payload"),
        ("devices/x/telemetry", {"ts": 1, "values": [1]}, "bad_payload"),
        ("devices/x/telemetry", {"a": "b"}, "no_numeric_values"),
        ("devices/x/telemetry", {"ts": True, "values": {"a": 1}}, "bad_timestamp"),
        ("devices/x/telemetry", {"ts": NOW + 3600, "values": {"a": 1}}, "timestamp_out_of_range"),
        ("devices/x/telemetry", {"ts": NOW - 400 * 86400, "values": {"a": 1}}, "timestamp_out_of_range"),
        ("tele/f2-aabbccddee01/sensor-mode/climate/sensor-", {"data": "00"}, "bad_topic"),
        ("tele/f2-aabbccddee01/sensor-mode/climate/sensor-x", {"data": 5}, "bad_payload"),
        ("tele/f2-aabbccddee01/sensor-mode/climate/sensor-x", {"timestamp": NOW, "data": "0g"}, "bad_hex"),
        ("tele/f2-aabbccddee01/sensor-mode/climate/sensor-x", {"timestamp": NOW, "data": "00"}, "bad_frame"),
        ("tele/f2-aabbccddee01/sensor-mode/warp/sensor-x", {"data": "00"}, "unknown_codec"),
        ("tele/x2-aabbccddee01/sensor-mode/climate/sensor-x", {"data": "00"}, "bad_topic"),
        ("tele/f2-aabbccddee0/sensor-mode/climate/sensor-x", {"data": "00"}, "bad_topic"),
        ("other/topic", {}, "unsupported_topic"),
        ("devices/x/status", {}, "unsupported_topic"),
    ],
)
def test_rejections_carry_a_reason_code(topic: str, body: object, code: str) -> None:
    with pytest.raises(Rejected) as caught:
        parse(topic, body)
    assert caught.value.reason == code
    assert str(caught.value).startswith(f"{code}: ")


def test_oversized_payloads_are_rejected_before_parsing() -> None:
    with pytest.raises(Rejected, match="too_large"):
        parse_message("devices/x/telemetry", b"{" * 70000, NOW, CODECS, LIMITS)


def test_unusable_measurement_names_are_skipped_not_stored() -> None:
    message = parse("devices/dev-1/telemetry", {"te\u0000mp": 1.0, "x" * 200: 2.0, "ok": 3.0})
    assert list(message.labels) == ["ok"]
    assert len(message.skipped) == 2 and all("not a usable measurement name" in s for s in message.skipped)
    assert not any("\x00" in s for s in message.skipped)


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_timestamps_pushed_out_of_range_by_their_zone_are_rejected(stamp: str) -> None:
    with pytest.raises(Rejected, match="bad_timestamp"):
        parse("devices/x/telemetry", {"ts": stamp, "values": {"a": 1}})


GAUGE_CODEC = (
    "[gauge]\nlength = 8\nfields = [\n"
    '  { name = "pressure", offset = 0, type = "float64be", unit = "hPa", min = 300, max = 1200 },\n]\n'
    "[raw]\nlength = 8\nfields = [\n"
    '  { name = "level", offset = 0, type = "float64be", scale = 10 },\n]\n'
)


def gauge_message(tmp_path: Path, mode: str, value: float) -> object:
    path = tmp_path / "gauge.toml"
    path.write_text(GAUGE_CODEC)
    payload = orjson.dumps({"timestamp": NOW, "data": struct.pack(">d", value).hex()})
    return parse_message(
        f"tele/f2-aabbccddee01/sensor-mode/{mode}/sensor-tank", payload, NOW, load_codecs(path), LIMITS
    )


@pytest.mark.parametrize("value", [1e308, 5e-324, -1e308, 299.9, 1200.1])
def test_f2_values_outside_the_codec_range_are_out_of_range(tmp_path: Path, value: float) -> None:
    """Finite but absurd: a pressure sensor does not report 1e308 hPa, nor 5e-324."""
    with pytest.raises(Rejected) as caught:
        gauge_message(tmp_path, "gauge", value)
    assert caught.value.reason == "out_of_range"
    assert "pressure=" in caught.value.detail and "[300, 1200]" in caught.value.detail


@pytest.mark.parametrize("value", [300.0, 1200.0, 1013.5])
def test_f2_values_inside_the_codec_range_are_readings(tmp_path: Path, value: float) -> None:
    message = gauge_message(tmp_path, "gauge", value)
    assert list(zip(message.labels, message.values, strict=True)) == [("tank.pressure", value)]


def test_builtin_climate_codec_range_is_enforced() -> None:
    hot = CODECS["climate"].encode({"temperature": 300.0, "humidity": 40.0, "pressure": 1000.0})
    with pytest.raises(Rejected) as caught:
        parse("tele/f2-aabbccddee01/sensor-mode/climate/sensor-x", {"timestamp": NOW, "data": hot.hex()})
    assert caught.value.reason == "out_of_range"
    assert "temperature=300" in caught.value.detail


@pytest.mark.parametrize(
    ("mode", "value"),
    [*((mode, v) for mode in ("gauge", "raw") for v in (math.nan, math.inf, -math.inf)), ("raw", 1.7e308)],
)
def test_f2_non_finite_values_are_bad_frames(tmp_path: Path, mode: str, value: float) -> None:
    """NaN and ±inf in a frame, ranged or not, or a finite raw value its scale pushes past the float range."""
    with pytest.raises(Rejected) as caught:
        gauge_message(tmp_path, mode, value)
    assert caught.value.reason == "bad_frame"
    assert "not a finite number" in caught.value.detail


@pytest.mark.parametrize(
    "payload",
    [b'{"t": 1e400}', b'{"t": NaN}', b'{"t": Infinity, "u": 1}', b'{"ts": 1, "values": {"t": -1e999}}'],
)
def test_json_non_finite_numbers_never_become_readings(payload: bytes) -> None:
    with pytest.raises(Rejected) as caught:
        parse_message("devices/dev-1/telemetry", payload, NOW, CODECS, LIMITS)
    assert caught.value.reason == "bad_json"


CLIMATE_HEX = CODECS["climate"].encode({"temperature": 21.5, "humidity": 40, "pressure": 990}).hex()


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"timestaCp": NOW, "data": CLIMATE_HEX}, "'timestaCp'"),  # a misspelt timestamp key
        ({"tT": NOW, "data": CLIMATE_HEX}, "'tT'"),
        ({"Timestamp": NOW, "data": CLIMATE_HEX}, "'Timestamp'"),
        ({"data": CLIMATE_HEX}, "`timestamp`"),  # no timestamp at all
        ({"timestamp": NOW, "data": CLIMATE_HEX, "rssi": -60}, "'rssi'"),
        ({"timestamp": NOW}, "`data`"),
    ],
)
def test_f2_payload_keys_must_be_exactly_timestamp_and_data(body: dict[str, object], named: str) -> None:
    """A typo must not turn into "no timestamp": stored at receive time, silently."""
    with pytest.raises(Rejected) as caught:
        parse("tele/f2-aabbccddee01/sensor-mode/climate/sensor-room1", body)
    assert caught.value.reason == "bad_payload"
    assert named in caught.value.detail


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"tT": NOW * 1000, "values": {"temperature": 21.0}}, "'tT'"),  # a misspelt `ts`
        ({"time": NOW, "values": {"temperature": 21.0}}, "'time'"),
        ({"ts": NOW, "values": {"temperature": 21.0}, "unit": "C"}, "'unit'"),
        ([{"ts": NOW, "values": {"a": 1}}, {"Ts": NOW, "values": {"a": 2}}], "'Ts'"),  # one entry of a list
    ],
)
def test_a_timed_json_entry_has_only_ts_and_values(body: object, named: str) -> None:
    """Like F2's keys: a typo of `ts` must not store the readings at the receive time."""
    with pytest.raises(Rejected) as caught:
        parse("devices/dev-1/telemetry", body)
    assert caught.value.reason == "bad_payload"
    assert named in caught.value.detail


def test_a_timed_json_entry_may_leave_ts_out() -> None:
    (timestamp,) = parse("devices/dev-1/telemetry", {"values": {"temperature": 21.0}}).timestamps
    assert timestamp.timestamp() == NOW


@pytest.mark.parametrize("profile", ["mixed", "climate"])  # climate: what the bench publisher sends
def test_every_simulated_message_parses(profile: str) -> None:
    """The simulator (and so the bench) always sends `timestamp`: the strict F2 keys cost it nothing."""
    stream = message_stream(build_fleet(12, profile), CODECS, profile)
    for _ in range(200):
        topic, payload = next(stream)
        message = parse_message(topic, payload, time.time(), CODECS, LIMITS)
        assert message.values and len(message.labels) == len(message.values) == len(message.timestamps)


def test_a_parser_remembers_topics_up_to_its_cache_size() -> None:
    parser = MessageParser(CODECS, LIMITS, cache_size=2)
    frame = CODECS["climate"].encode({"temperature": 20, "humidity": 50, "pressure": 1000})
    payload = orjson.dumps({"timestamp": NOW, "data": frame.hex()})
    topics = [f"tele/f2-aabbccddee0{n}/sensor-mode/climate/sensor-room1" for n in (1, 2, 3)]
    first = parser.parse(topics[0], payload, NOW)
    assert parser.parse(topics[0], payload, NOW).labels is first.labels  # worked out once
    assert parser.parse(topics[1], payload, NOW).device == DeviceRef("mac", "aa:bb:cc:dd:ee:02")
    third = parser.parse(topics[2], payload, NOW)  # past the size: memory starts afresh
    assert third.device == DeviceRef("mac", "aa:bb:cc:dd:ee:03")
    assert parser.parse(topics[0], payload, NOW).labels is not first.labels
    with pytest.raises(Rejected):  # a rejected topic is not remembered as anything
        parser.parse("tele/f2-zz/sensor-mode/climate/sensor-room1", payload, NOW)
    with pytest.raises(Rejected):
        parser.parse("tele/f2-zz/sensor-mode/climate/sensor-room1", payload, NOW)
