"""Declarative codecs: what the simulator encodes, the decoder reads back."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.decode.codecs import CodecConfigError, FrameError, load_codecs


def test_builtin_codecs_round_trip() -> None:
    codecs = load_codecs()
    climate = codecs["climate"]
    frame = climate.encode({"temperature": -12.34, "humidity": 55.5, "pressure": 1013.25})
    assert len(frame) == climate.length
    assert climate.decode(frame) == [("temperature", -12.34), ("humidity", 55.5), ("pressure", 1013.25)]


def test_flags_become_one_reading_each() -> None:
    io = load_codecs()["io"]
    frame = io.encode({"relay1": True, "relay2": False, "door_open": True, "rssi": -70})
    assert frame == bytes([0b101, 256 - 70])
    assert dict(io.decode(frame)) == {"relay1": 1.0, "relay2": 0.0, "door_open": 1.0, "rssi": -70.0}


def test_little_endian_and_offsets(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[m]\nlength = 6\nfields = [\n"
        '  { name = "a", offset = 0, type = "uint16le", scale = 0.5, offset_value = -10 },\n'
        '  { name = "b", offset = 2, type = "float32le" },\n]\n'
    )
    codec = load_codecs(path)["m"]
    frame = bytes([0x10, 0x00]) + bytes.fromhex("0000c03f")  # 16 * 0.5 - 10 ; 1.5
    assert codec.decode(frame) == [("a", -2.0), ("b", 1.5)]


def test_wrong_length_and_out_of_range_frames_are_rejected() -> None:
    climate = load_codecs()["climate"]
    with pytest.raises(FrameError, match="expects 8 bytes, got 3"):
        climate.decode(b"abc")
    hot = climate.encode({"temperature": 200, "humidity": 1, "pressure": 1000})
    with pytest.raises(FrameError, match="temperature=200 outside"):
        climate.decode(hot)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[m]\nfields = [{ name = "a", offset = 0, type = "uint8" }]', "`length` must be a positive"),
        ("[m]\nlength = 1\nfields = []", "`fields` must be a non-empty list"),
        ('[m]\nlength = 1\nfields = [{ name = "a", offset = 0, type = "int24" }]', "field 'a': `type`"),
        (
            '[m]\nlength = 1\nfields = [{ name = "a", offset = 0, type = "uint16be" }]',
            "`offset` must leave 2",
        ),
        ('[m]\nlength = 1\nfields = [{ name = "a", offset = 0, type = "uint8", scale = 0 }]', "not be 0"),
        ('[m]\nlength = 1\nfields = [{ name = "a", offset = 0, type = "uint8", sclae = 2 }]', "unknown keys"),
        ('[m]\nlength = 1\nfields = [{ name = "a", offset = 0, type = "uint8", flags = { x = 9 } }]', "bit"),
        # A NaN bound compares false with everything: the range would silently never apply.
        (
            '[m]\nlength = 1\nfields = [{ name = "a", offset = 0, type = "uint8", max = nan }]',
            "`max` must be",
        ),
        ('[m]\nlength = 1\nfields = [{ name = "a", offset = 0, type = "uint8", min = 9, max = 1 }]', "above"),
        ("not toml", "c.toml"),
    ],
)
def test_malformed_codec_files_name_codec_and_field(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(body)
    with pytest.raises(CodecConfigError, match=message.replace("(", r"\(")):
        load_codecs(path)


def test_mixed_byte_orders_and_overlapping_fields_decode_each_field(tmp_path: Path) -> None:
    """Fields are grouped into runs one Struct unpacks; a change of byte order, a field
    behind the previous one or one over the same bytes starts a new run."""
    path = tmp_path / "c.toml"
    path.write_text(
        "[m]\nlength = 8\nfields = [\n"
        '  { name = "le", offset = 4, type = "uint16le" },\n'
        '  { name = "be", offset = 0, type = "uint16be" },\n'
        '  { name = "byte", offset = 2, type = "uint8" },\n'
        '  { name = "whole", offset = 0, type = "uint32be" },\n'
        '  { name = "last", offset = 7, type = "int8", scale = 0.5 },\n]\n'
    )
    codec = load_codecs(path)["m"]
    frame = bytes([0x01, 0x02, 0x03, 0x00, 0x04, 0x05, 0x00, 0xFE])
    assert codec.decode(frame) == [
        ("le", 0x0504),
        ("be", 0x0102),
        ("byte", 3),
        ("whole", 0x01020300),
        ("last", -1.0),
    ]


@pytest.mark.parametrize("scale", [1, 0.5, 0.1, 0.01, 0.001, 2.5, 0.0625])
@pytest.mark.parametrize("offset", [0, -40, 0.5, -273.15])
def test_integer_fields_decode_to_the_rounded_value(tmp_path: Path, scale: float, offset: float) -> None:
    """The compiled integer path (integers over a power of ten) gives exactly what rounding
    `raw * scale + offset` to the decimals of scale and offset gives."""
    path = tmp_path / "c.toml"
    path.write_text(
        f'[m]\nlength = 2\nfields = [{{ name = "a", offset = 0, type = "int16be", '
        f"scale = {scale}, offset_value = {offset} }}]\n"
    )
    codec = load_codecs(path)["m"]
    (field,) = codec.fields
    for raw in range(-32768, 32768, 97):
        expected = round(raw * field.scale + field.add, field.decimals)
        assert codec.decode_values(raw.to_bytes(2, "big", signed=True)) == [expected]
