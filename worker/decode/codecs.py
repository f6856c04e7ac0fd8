"""Declarative frame codecs: byte layouts kept in TOML files, used to decode and encode.

The decoder and the simulator share these definitions, so a frame the simulator
builds is exactly what the decoder expects.
"""

from __future__ import annotations

import math
import struct
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from worker.decode.ranges import ValueRange, format_number

_STRUCT_FORMATS = {
    "int8": ">b", "uint8": ">B",
    "int16be": ">h", "int16le": "<h", "uint16be": ">H", "uint16le": "<H",
    "int32be": ">i", "int32le": "<i", "uint32be": ">I", "uint32le": "<I",
    "float32be": ">f", "float32le": "<f", "float64be": ">d", "float64le": "<d",
}  # fmt: skip


class CodecConfigError(ValueError):
    """A codec file is malformed; the message names the file, codec and field."""


class FrameError(ValueError):
    """A frame does not match its codec (length, a value that is not a finite number)."""


class OutOfRange(FrameError):
    """A field decoded to a number outside its codec's `min`/`max`: a broken sensor."""


@dataclass(frozen=True, slots=True)
class CodecField:
    name: str
    offset: int
    type: str
    scale: float = 1.0
    add: float = 0.0
    unit: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    flags: tuple[tuple[str, int], ...] = ()
    decimals: int = 12  # rounding that removes binary noise (227.70000000000002 → 227.7)

    @property
    def struct(self) -> struct.Struct:
        return struct.Struct(_STRUCT_FORMATS[self.type])

    @property
    def range(self) -> ValueRange:
        return ValueRange(self.minimum, self.maximum)

    def labels(self) -> list[str]:
        return [flag for flag, _ in self.flags] if self.flags else [self.name]


# One step of a compiled codec: (position of the raw value in the unpacked tuple, scale, add,
# divisor, decimals, low, high, flag bits or ()). Built once per codec. An integer field whose
# scale and offset are decimals (0.01, -40) has them as integers over `divisor` (1, -4000 over
# 100): `(raw * 1 - 4000) / 100` is exact integer arithmetic and one correctly rounded division,
# the double nearest the true value, which is what `round(raw * scale + add, decimals)` finds
# the slow way. Other fields have divisor 0 and are rounded.
_Step = tuple[int, float, float, int, int, float, float, tuple[int, ...]]
_EXACT_DECIMALS_MAX = 15  # beyond, integers over 10**decimals could leave a double's 53 bits


@dataclass(frozen=True, slots=True)
class Codec:
    name: str
    length: int
    fields: tuple[CodecField, ...]
    # Compiled at construction, so a frame costs one or two `unpack_from` calls and a loop
    # over plain tuples: no Struct, range or label built per message.
    labels: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _units: tuple[str | None, ...] = field(init=False, repr=False, compare=False)
    _runs: tuple[tuple[struct.Struct, int], ...] = field(init=False, repr=False, compare=False)
    _steps: tuple[_Step, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        runs, positions = _compile_runs(self.fields)
        steps = []
        for f, position in zip(self.fields, positions, strict=True):
            low = -math.inf if f.minimum is None else float(f.minimum)
            high = math.inf if f.maximum is None else float(f.maximum)
            bits = tuple(bit for _, bit in f.flags)
            scale, add, divisor = _exact(f)
            steps.append((position, scale, add, divisor, f.decimals, low, high, bits))
        object.__setattr__(self, "labels", tuple(label for f in self.fields for label in f.labels()))
        object.__setattr__(self, "_units", tuple(f.unit for f in self.fields for _ in f.labels()))
        object.__setattr__(self, "_runs", runs)
        object.__setattr__(self, "_steps", tuple(steps))

    def decode_values(self, frame: bytes) -> list[float]:
        """The values of `labels`, in order; raise FrameError on a bad frame."""
        if len(frame) != self.length:
            raise FrameError(f"codec {self.name} expects {self.length} bytes, got {len(frame)}")
        runs = self._runs
        raws = runs[0][0].unpack_from(frame, runs[0][1])
        for run, offset in runs[1:]:
            raws += run.unpack_from(frame, offset)
        values: list[float] = []
        for index, (position, scale, add, divisor, decimals, low, high, bits) in enumerate(self._steps):
            raw = raws[position]
            if bits:
                values.extend(float((raw >> bit) & 1) for bit in bits)
                continue
            if divisor:
                value = (raw * scale + add) / divisor
            else:
                value = round(raw * scale + add, decimals)
                if not math.isfinite(value):
                    raise FrameError(f"{self.fields[index].name} is not a finite number")
            if not low <= value <= high:
                f = self.fields[index]
                raise OutOfRange(f"{f.name}={format_number(value)} outside {f.range}")
            values.append(value)
        return values

    def decode(self, frame: bytes) -> list[tuple[str, float]]:
        """Return (field or flag name, value) pairs; raise FrameError on a bad frame."""
        return list(zip(self.labels, self.decode_values(frame), strict=True))

    def encode(self, values: dict[str, float]) -> bytes:
        """Build a frame from field (or flag) values; the simulator's half of the contract."""
        frame = bytearray(self.length)
        for f in self.fields:
            if f.flags:
                raw: float = sum(1 << bit for flag, bit in f.flags if values.get(flag))
            else:
                raw = (values[f.name] - f.add) / f.scale
                if not f.type.startswith("float"):
                    raw = round(raw)
            f.struct.pack_into(frame, f.offset, raw)
        return bytes(frame)

    def units(self) -> dict[str, str | None]:
        return dict(zip(self.labels, self._units, strict=True))

    def unit_list(self) -> tuple[str | None, ...]:
        """The unit of each of `labels`, in order."""
        return self._units


def _compile_runs(fields: tuple[CodecField, ...]) -> tuple[tuple[tuple[struct.Struct, int], ...], list[int]]:
    """Group fields into runs that one Struct unpacks (ascending, non-overlapping, one byte
    order, gaps as pad bytes), and say where each field's raw value lands in the
    concatenated result. The built-in codecs are one run each."""
    order = sorted(range(len(fields)), key=lambda i: fields[i].offset)
    runs: list[tuple[str, int, list[str]]] = []  # (byte order, start offset, format codes)
    ends: list[int] = []
    position = [0] * len(fields)
    for count, i in enumerate(order):
        f = fields[i]
        fmt = _STRUCT_FORMATS[f.type]
        size = struct.calcsize(fmt)
        byte_order = fmt[0] if size > 1 else ""
        if runs and f.offset >= ends[-1] and byte_order in ("", runs[-1][0] or byte_order):
            current_order, start, codes = runs[-1]
            codes.append("x" * (f.offset - ends[-1]) + fmt[1])
            runs[-1] = (current_order or byte_order, start, codes)
        else:
            runs.append((byte_order, f.offset, [fmt[1]]))
            ends.append(0)
        ends[-1] = f.offset + size
        position[i] = count
    compiled = tuple((struct.Struct((o or ">") + "".join(c)), start) for o, start, c in runs)
    return compiled, position


def builtin_codec_path() -> Path:
    return Path(str(resources.files("schemas") / "codecs" / "f2.toml"))


def load_codecs(path: Path | None = None) -> dict[str, Codec]:
    """Load and validate a codec file (the built-in F2 layouts when `path` is None)."""
    path = path or builtin_codec_path()
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CodecConfigError(f"{path}: {exc}") from None
    codecs = {}
    for name, table in document.items():
        codecs[name] = _parse_codec(f"{path}: codec {name!r}", name, table)
    if not codecs:
        raise CodecConfigError(f"{path}: defines no codec")
    return codecs


def _parse_codec(where: str, name: str, table: Any) -> Codec:
    if not isinstance(table, dict):
        raise CodecConfigError(f"{where}: must be a table")
    length = table.get("length")
    if not isinstance(length, int) or length <= 0:
        raise CodecConfigError(f"{where}: `length` must be a positive integer")
    raw_fields = table.get("fields")
    if not isinstance(raw_fields, list) or not raw_fields:
        raise CodecConfigError(f"{where}: `fields` must be a non-empty list")
    fields = tuple(_parse_field(where, length, spec) for spec in raw_fields)
    labels = [label for f in fields for label in f.labels()]
    if len(labels) != len(set(labels)):
        raise CodecConfigError(f"{where}: field and flag names must be unique")
    return Codec(name=name, length=length, fields=fields)


def _parse_field(where: str, length: int, spec: Any) -> CodecField:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise CodecConfigError(f"{where}: every field needs a `name`")
    where = f"{where} field {spec['name']!r}"
    allowed = {"name", "offset", "type", "scale", "offset_value", "unit", "min", "max", "flags"}
    unknown = set(spec) - allowed
    if unknown:
        raise CodecConfigError(f"{where}: unknown keys {sorted(unknown)}")
    kind = spec.get("type")
    if kind not in _STRUCT_FORMATS:
        raise CodecConfigError(f"{where}: `type` must be one of {', '.join(_STRUCT_FORMATS)}")
    offset = spec.get("offset")
    size = struct.calcsize(_STRUCT_FORMATS[kind])
    if not isinstance(offset, int) or offset < 0 or offset + size > length:
        raise CodecConfigError(f"{where}: `offset` must leave {size} bytes inside {length}")
    flags = spec.get("flags", {})
    if not isinstance(flags, dict) or not all(
        isinstance(bit, int) and 0 <= bit < size * 8 for bit in flags.values()
    ):
        raise CodecConfigError(f"{where}: `flags` maps names to bit numbers below {size * 8}")
    numbers = {key: spec[key] for key in ("scale", "offset_value", "min", "max") if key in spec}
    for key, value in numbers.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise CodecConfigError(f"{where}: `{key}` must be a number")
        if not math.isfinite(value):  # TOML has nan and inf; neither is a usable scale or bound
            raise CodecConfigError(f"{where}: `{key}` must be a finite number")
    if numbers.get("scale", 1) == 0:
        raise CodecConfigError(f"{where}: `scale` must not be 0")
    if numbers.get("min", -math.inf) > numbers.get("max", math.inf):
        raise CodecConfigError(f"{where}: `min` is above `max`")
    return CodecField(
        name=spec["name"],
        offset=offset,
        type=kind,
        scale=float(numbers.get("scale", 1.0)),
        add=float(numbers.get("offset_value", 0.0)),
        unit=spec.get("unit"),
        minimum=numbers.get("min"),
        maximum=numbers.get("max"),
        flags=tuple(sorted(flags.items(), key=lambda item: item[1])),
        decimals=_decimals(numbers.get("scale", 1.0), numbers.get("offset_value", 0.0)),
    )


def _exact(f: CodecField) -> tuple[float, float, int]:
    """(scale, add, divisor) of a compiled step: integers over 10**decimals where exact."""
    if f.type.startswith("float") or f.decimals > _EXACT_DECIMALS_MAX:
        return f.scale, f.add, 0
    scale, add = (Decimal(repr(n)).scaleb(f.decimals) for n in (f.scale, f.add))
    return int(scale), int(add), 10**f.decimals


def _decimals(*numbers: float) -> int:
    """Decimal places that `raw * scale + offset` can carry, e.g. 3 for scale 0.001."""
    places = [-int(Decimal(repr(float(n))).as_tuple().exponent) for n in numbers]
    return max(0, *places)
