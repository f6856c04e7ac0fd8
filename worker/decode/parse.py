"""Topic and payload parsing (docs/decoding.md): pure functions, no I/O.

A message becomes a `ParsedMessage` naming its device and carrying its readings
by label, or raises `Rejected` with a reason code and a detail for the dead letter.
"""

from __future__ import annotations

import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import orjson

from schemas.records import Reason
from worker.decode.codecs import Codec, FrameError, OutOfRange
from worker.stores.devices import canonical_mac

if TYPE_CHECKING:
    from worker.decode.mapped import MappedTopic
    from worker.decode.mappings import MappingSet

_T = TypeVar("_T")


class Rejected(Exception):
    """The message cannot be stored, for `reason`; `detail` says what exactly."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Ignored(Exception):
    """The message is on a topic to ignore, or a mapping's `when` says it is not its kind:
    acknowledged, neither stored nor dead-lettered."""


class DeviceRef(NamedTuple):
    """A device as a topic names it. A tuple, so hashing it (once per message) stays in C."""

    kind: str  # "mac" (F2 controllers) or "key" (devices/{device_key}/telemetry)
    value: str


@dataclass(slots=True)
class ParsedMessage:
    """A message's readings as parallel columns: `labels[i]` measured `values[i]` at
    `timestamps[i]`. An F2 message's `labels` and `units` are its topic's tuples, shared by
    every message on that topic, so a frame allocates only its values."""

    device: DeviceRef
    labels: Sequence[str]
    values: list[float]
    timestamps: list[datetime]
    units: Sequence[str | None] | None = None  # F2: the codec's; JSON telemetry has none
    skipped: list[str] = field(default_factory=list)  # fields dropped, with why
    # Only with Limits.keep_text, parallel to `labels`: a string or boolean value where not
    # None (`values[i]` is then 0.0). None, the common case, means every value is a number.
    texts: list[str | None] | None = None


MAX_LABEL_LENGTH = 128  # a datapoint label, as stored in `datapoints.label`
F2_KEYS = ("timestamp", "data")  # all an F2 payload has, and all it must have
F2_SHAPE = 'expected exactly {"timestamp": …, "data": "<hex>"}'
TIMED_KEYS = ("ts", "values")  # a timed JSON entry: `ts` may be left out (receive time)
TIMED_SHAPE = 'a timed entry is {"ts": …, "values": {…}}'
TOPIC_CACHE_MAX = 100_000  # default of the topics remembered by a MessageParser


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int = 65536
    max_future_s: float = 300.0
    max_age_s: float = 30 * 86400.0
    # Strings and booleans of JSON telemetry are kept (as text) when the time-series store
    # has a column for them (Cassandra); otherwise they are skipped with a reason.
    keep_text: bool = False


class _F2Topic(NamedTuple):
    """What an F2 topic says, worked out once: device, codec, and the labels `{label}.{name}`."""

    device: DeviceRef
    codec: Codec
    labels: tuple[str, ...]
    units: tuple[str | None, ...]


def normalise_mac(text: str) -> str:
    """`AA-BB-CC-DD-EE-01`, `aabbccddee01` … → `aa:bb:cc:dd:ee:01`; Rejected otherwise.
    Once per topic, so once per device of a fleet."""
    mac = canonical_mac(text)
    if mac is None:
        raise Rejected(Reason.BAD_TOPIC, f"{text!r} is not a MAC address")
    return mac


class MessageParser:
    """Parses messages, remembering what each topic it has seen says (a device keeps its
    topics): after the first message, a topic costs one dict lookup. Rejected topics are not
    remembered; past `cache_size` topics the memory starts afresh. With mappings
    (worker/decode/mappings.py) a new topic goes to the most specific of them and the
    built-in layouts, unless it is one to ignore."""

    def __init__(
        self,
        codecs: dict[str, Codec],
        limits: Limits,
        cache_size: int = TOPIC_CACHE_MAX,
        mappings: MappingSet | None = None,
    ) -> None:
        self._codecs = codecs
        self._limits = limits
        self._cache_size = cache_size
        self._mappings = mappings or None
        self._f2: dict[str, _F2Topic] = {}
        self._json: dict[str, DeviceRef] = {}
        self._mapped: dict[str, MappedTopic] = {}
        if self._mappings is not None:
            from worker.decode import mapped  # here: it builds on this module

            self._mapped_topic = mapped.mapped_topic
            self._parse_mapped = mapped.parse_mapped
        # (sensor mode, label) → the labels `{label}.{name}`: every device's `room1` topics
        # share one tuple of strings, not one each.
        self._labels: dict[tuple[str, str], tuple[str, ...]] = {}

    def parse(self, topic: str, payload: bytes, received_at: float) -> ParsedMessage:
        limits = self._limits
        if len(payload) > limits.max_payload_bytes:
            raise Rejected(Reason.TOO_LARGE, f"{len(payload)} bytes > {limits.max_payload_bytes}")
        f2 = self._f2.get(topic)
        if f2 is not None:
            return _parse_f2(f2, payload, received_at, limits)
        device = self._json.get(topic)
        if device is not None:
            return _parse_json_telemetry(device, payload, received_at, limits)
        mapped = self._mapped.get(topic)
        if mapped is not None:
            return self._parse_mapped(mapped, payload, received_at, limits)
        levels = topic.split("/")
        if self._mappings is not None:
            if self._mappings.ignored(topic):
                raise Ignored
            route = self._mappings.route(levels)
            if route is None:
                raise Rejected(Reason.UNSUPPORTED_TOPIC, f"{topic!r} matches no mapping or built-in layout")
            if not isinstance(route, str):
                found = self._remember(self._mapped, topic, self._mapped_topic(route, levels))
                return self._parse_mapped(found, payload, received_at, limits)
        if len(levels) == 5 and levels[0] in ("tele", "stat"):
            f2 = self._remember(self._f2, topic, _f2_topic(levels, self._codecs, self._labels))
            return _parse_f2(f2, payload, received_at, limits)
        if len(levels) == 3 and levels[0] == "devices" and levels[2] == "telemetry" and levels[1]:
            device = self._remember(self._json, topic, DeviceRef("key", levels[1]))
            return _parse_json_telemetry(device, payload, received_at, limits)
        raise Rejected(Reason.UNSUPPORTED_TOPIC, f"{topic!r} matches no known topic layout")

    def _remember(self, cache: dict[str, _T], topic: str, value: _T) -> _T:
        if len(self._f2) + len(self._json) + len(self._mapped) >= self._cache_size:
            self._f2.clear()  # a flood of distinct topics: forget them, at the cost of parsing
            self._json.clear()
            self._mapped.clear()
            self._labels.clear()
        cache[topic] = value
        return value


def parse_message(
    topic: str,
    payload: bytes,
    received_at: float,
    codecs: dict[str, Codec],
    limits: Limits,
    mappings: MappingSet | None = None,
) -> ParsedMessage:
    """One message, without a parser's topic memory (tests, one-off tools)."""
    return MessageParser(codecs, limits, mappings=mappings).parse(topic, payload, received_at)


def _f2_topic(
    levels: list[str], codecs: dict[str, Codec], shared: dict[tuple[str, str], tuple[str, ...]]
) -> _F2Topic:
    _, device_level, mode_level, mode, sensor_level = levels
    if not device_level.startswith("f2-") or mode_level != "sensor-mode":
        raise Rejected(Reason.BAD_TOPIC, "expected {tele|stat}/f2-{mac}/sensor-mode/{mode}/sensor-{label}")
    if not sensor_level.startswith("sensor-") or len(sensor_level) == len("sensor-"):
        raise Rejected(Reason.BAD_TOPIC, f"{sensor_level!r} does not name a sensor")
    mac = normalise_mac(device_level[3:])
    label = sensor_level[len("sensor-") :]
    codec = codecs.get(mode)
    if codec is None:
        raise Rejected(Reason.UNKNOWN_CODEC, f"no codec for sensor mode {mode!r}")
    labels = shared.get((mode, label))
    if labels is None:
        labels = shared[mode, label] = tuple(f"{label}.{name}" for name in codec.labels)
    return _F2Topic(DeviceRef("mac", mac), codec, labels, codec.unit_list())


def _parse_f2(topic: _F2Topic, payload: bytes, received_at: float, limits: Limits) -> ParsedMessage:
    document = _load_json(payload)
    if (
        type(document) is not dict
        or len(document) != 2
        or "data" not in document
        or "timestamp" not in document
    ):
        _check_f2_document(document)
    data = document["data"]
    if not isinstance(data, str):
        raise Rejected(Reason.BAD_PAYLOAD, "`data` must be a hex string")
    try:
        frame = binascii.unhexlify(data)
    except (binascii.Error, ValueError):
        raise Rejected(Reason.BAD_HEX, f"`data` is not hex: {data[:40]!r}") from None
    timestamp = parse_timestamp(document["timestamp"], received_at, limits)
    try:
        values = topic.codec.decode_values(frame)
    except OutOfRange as exc:
        raise Rejected(Reason.OUT_OF_RANGE, str(exc)) from None
    except FrameError as exc:
        raise Rejected(Reason.BAD_FRAME, str(exc)) from None
    return ParsedMessage(topic.device, topic.labels, values, [timestamp] * len(values), topic.units)


def _check_f2_document(document: Any) -> None:
    """Exactly `timestamp` and `data`: a misspelt `timestaCp` must not read as "no timestamp",
    which would store the frame at the receive time without a word."""
    if not isinstance(document, dict):
        raise Rejected(Reason.BAD_PAYLOAD, F2_SHAPE)
    _refuse_unexpected_keys(document, F2_KEYS, F2_SHAPE)
    for key in F2_KEYS:
        if key not in document:
            raise Rejected(Reason.BAD_PAYLOAD, f"no `{key}`; {F2_SHAPE}")


def _refuse_unexpected_keys(document: dict[str, Any], allowed: tuple[str, ...], shape: str) -> None:
    """A key the form does not have is a misspelling (`tT` for `ts`), never ignored: read as
    absent it would store the readings at the receive time without a word."""
    unexpected = [key for key in document if key not in allowed]
    if unexpected:
        names = ", ".join(repr(key[:40]) for key in unexpected[:5])  # bounded, whatever the payload
        raise Rejected(Reason.BAD_PAYLOAD, f"unexpected key {names}; {shape}")


def _parse_json_telemetry(
    device: DeviceRef, payload: bytes, received_at: float, limits: Limits
) -> ParsedMessage:
    document = _load_json(payload)
    entries = document if isinstance(document, list) else [document]
    if not entries:
        raise Rejected(Reason.BAD_PAYLOAD, "empty list")
    labels: list[str] = []
    values: list[float] = []
    timestamps: list[datetime] = []
    skipped: list[str] = []
    texts: list[str | None] | None = None
    for entry in entries:
        if not isinstance(entry, dict):
            raise Rejected(Reason.BAD_PAYLOAD, "telemetry must be an object or a list of objects")
        if "values" in entry:
            fields = entry["values"]
            if not isinstance(fields, dict):
                raise Rejected(Reason.BAD_PAYLOAD, "`values` must be an object")
            if len(entry) > 2 or (len(entry) == 2 and "ts" not in entry):
                _refuse_unexpected_keys(entry, TIMED_KEYS, TIMED_SHAPE)
            timestamp = parse_timestamp(entry.get("ts"), received_at, limits)
        else:
            fields = entry
            timestamp = parse_timestamp(None, received_at, limits)
        for name, value in fields.items():
            if not 0 < len(name) <= MAX_LABEL_LENGTH or "\x00" in name:
                skipped.append(f"{name[:40]!r}: not a usable measurement name")
                continue
            if limits.keep_text and isinstance(value, str | bool):
                if texts is None:
                    texts = [None] * len(values)
                texts.append(("true" if value else "false") if isinstance(value, bool) else value)
                labels.append(name)
                values.append(0.0)
                timestamps.append(timestamp)
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                # decoded_data keeps numbers only: say so rather than coerce.
                skipped.append(f"{name}: {type(value).__name__} value, only numbers are stored")
                continue
            if not math.isfinite(value):
                skipped.append(f"{name}: not a finite number")
                continue
            labels.append(name)
            values.append(float(value))
            timestamps.append(timestamp)
            if texts is not None:
                texts.append(None)
    if not values:
        detail = "; ".join(skipped) or "no values"
        raise Rejected(Reason.NO_NUMERIC_VALUES, detail)
    return ParsedMessage(device, labels, values, timestamps, None, skipped, texts)


def _load_json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Rejected(Reason.BAD_JSON, str(exc)) from None


def parse_timestamp(value: Any, received_at: float, limits: Limits) -> datetime:
    """ISO-8601 text or an epoch in s or ms; absent means receive time."""
    exact: datetime | None = None
    if isinstance(value, str):  # ISO-8601 text, by far the most common: tested first
        try:
            parsed = datetime.fromisoformat(value)  # Python 3.11 reads `Z` too
        except ValueError:
            raise Rejected(Reason.BAD_TIMESTAMP, f"{value[:40]!r} is not ISO-8601") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)  # devices without a zone report UTC
        try:
            epoch = parsed.timestamp()
            exact = parsed if parsed.tzinfo is UTC else parsed.astimezone(UTC)
        except (OverflowError, ValueError):  # year 1 or 9999 pushed past the range by its zone
            raise Rejected(Reason.BAD_TIMESTAMP, f"{value[:40]!r} is out of range") from None
    elif value is None:
        epoch = received_at
    elif isinstance(value, bool):
        raise Rejected(Reason.BAD_TIMESTAMP, "timestamp must be ISO-8601 text or an epoch number")
    elif isinstance(value, int | float):
        epoch = value / 1000.0 if value > 1e11 else float(value)  # > year 5138 in s: it is ms
        if not math.isfinite(epoch):
            raise Rejected(Reason.BAD_TIMESTAMP, "not a finite number")
    else:
        raise Rejected(Reason.BAD_TIMESTAMP, "timestamp must be ISO-8601 text or an epoch number")
    if epoch > received_at + limits.max_future_s:
        raise Rejected(Reason.TIMESTAMP_OUT_OF_RANGE, f"{epoch - received_at:.0f} s in the future")
    if epoch < received_at - limits.max_age_s:
        raise Rejected(Reason.TIMESTAMP_OUT_OF_RANGE, f"older than {limits.max_age_s:.0f} s")
    return exact or datetime.fromtimestamp(epoch, UTC)
