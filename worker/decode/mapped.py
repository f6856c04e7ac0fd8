"""A message on a mapped topic into readings (docs/decoding.md, "Mappings"): pure, no I/O.

A `MappedTopic` is what one topic says under its mapping, worked out once per topic (the
parser remembers it): the device, the label around each path. Every rejection names the
mapping, so a dead letter says which rule the payload missed.
"""

from __future__ import annotations

import math
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

import orjson

from schemas.records import Reason
from worker.decode.mappings import FieldRule, Mapping
from worker.decode.parse import (
    MAX_LABEL_LENGTH,
    DeviceRef,
    Ignored,
    Limits,
    ParsedMessage,
    Rejected,
    parse_timestamp,
)

_TRUE = frozenset({"true", "on", "yes", "1", "open", "online"})
_FALSE = frozenset({"false", "off", "no", "0", "closed", "offline"})
_ALL = FieldRule(("*",))  # a mapping without fields: every value of the payload
_NO_TEXT_COLUMN = "text value, kept only where the store has a text column"
_UNJUDGED, _UNSELECTED = object(), object()
JUDGED_MAX = 10_000  # paths remembered per mapping


class MappedTopic(NamedTuple):
    mapping: Mapping
    device: DeviceRef
    prefix: str  # label = prefix + path + suffix
    suffix: str


def mapped_topic(mapping: Mapping, levels: list[str]) -> MappedTopic:
    values = {name: level for name, level in zip(mapping.levels, levels, strict=True) if name is not None}
    device = levels[mapping.device]
    if not device:
        raise Rejected(Reason.BAD_TOPIC, f"mapping {mapping.name}: the device level is empty")
    before, _, after = mapping.label.partition("{path}")
    try:
        prefix, suffix = before.format(**values), after.format(**values)
    except (KeyError, IndexError, ValueError) as exc:  # the loader checked the names: a brace in a level
        raise Rejected(Reason.BAD_TOPIC, f"mapping {mapping.name}: label: {exc}") from None
    return MappedTopic(mapping, DeviceRef("key", device), prefix, suffix)


def parse_mapped(topic: MappedTopic, payload: bytes, received_at: float, limits: Limits) -> ParsedMessage:
    mapping = topic.mapping
    if mapping.payload == "value":
        return _parse_value(topic, payload, received_at, limits)
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Rejected(Reason.BAD_JSON, f"mapping {mapping.name}: {exc}") from None
    if mapping.when:
        for path, allowed in mapping.when:
            if _at(document, path) not in allowed:
                raise Ignored
    root = _at(document, mapping.root) if mapping.root else document
    if type(root) is not dict and type(root) is not list:
        where = ".".join(mapping.root) or "the payload"
        raise Rejected(Reason.BAD_PAYLOAD, f"mapping {mapping.name}: no object at {where}")
    timestamp = _timestamp(mapping, root, received_at, limits)
    judged, paths = mapping.judged, mapping.paths
    if len(judged) >= JUDGED_MAX or len(paths) >= JUDGED_MAX:
        judged.clear()  # a device inventing keys: forget, at the cost of judging again
        paths.clear()
    leaves: list[tuple[str, Any]] = []
    _leaves(root, "", leaves, paths)
    labels: list[str] = []
    values: list[float] = []
    units: list[str | None] = []
    skipped: list[str] = []
    texts: list[str | None] | None = None
    selected = 0  # values a rule takes, stored or deliberately left out
    prefix, suffix = topic.prefix, topic.suffix
    affixed = bool(prefix or suffix)
    keep_text = limits.keep_text
    for where, raw in leaves:
        take = judged.get(where, _UNJUDGED)
        if take is _UNJUDGED:
            take = judged[where] = _judge(mapping, where)
        if take is _UNSELECTED:
            continue
        selected += 1
        if take is None:
            continue
        entry: _Take = take  # type: ignore[assignment]  # the sentinels are behind
        rule, label, plain = entry
        if affixed and rule.name is None:
            label = _usable(prefix + where + suffix)
        if label is None:
            skipped.append(f"{(prefix + where + suffix)[:40]!r}: not a usable measurement name")
            continue
        kind = type(raw)
        if plain and (kind is float or kind is int):  # the common case, without a call
            labels.append(label)
            values.append(float(raw))
            units.append(rule.unit)
            if texts is not None:
                texts.append(None)
            continue
        value, text, problem = _convert(rule, raw, keep_text)
        if problem is not None:
            if rule.exact:  # asked for by name: say why it is not stored
                skipped.append(f"{where}: {problem}")
            continue  # a wildcard takes what the store can keep
        if text is not None:
            if texts is None:
                texts = [None] * len(values)
            texts.append(text)
        elif texts is not None:
            texts.append(None)
        labels.append(label)
        values.append(value)
        units.append(rule.unit)
    if not values:
        if selected and not skipped:
            raise Ignored  # all it holds is left out on purpose (ignored, or text without a column)
        detail = "; ".join(skipped) or "no value at " + ", ".join(
            ".".join(rule.path) or "the root" for rule in mapping.fields or (_ALL,)
        )
        raise Rejected(Reason.NO_NUMERIC_VALUES, f"mapping {mapping.name}: {detail}")
    return ParsedMessage(topic.device, labels, values, [timestamp] * len(values), units, skipped, texts)


class _Take(NamedTuple):
    """A path a rule takes: the rule, the label when the topic adds nothing to it (None:
    unusable), and whether a JSON number is taken as it is."""

    rule: FieldRule
    label: str | None
    plain: bool


def _usable(label: str) -> str | None:
    return label if 0 < len(label) <= MAX_LABEL_LENGTH and "\x00" not in label else None


def _judge(mapping: Mapping, where: str) -> object:
    """What becomes of the value at `where`: a _Take for the first rule selecting it, None
    when ignored on purpose, _UNSELECTED when no rule selects it (or it is the time)."""
    segments = where.split(".")
    if mapping.time == tuple(segments):
        return _UNSELECTED  # the time is no value
    if mapping.ignore and _ignored(mapping.ignore, segments):
        return None
    for rule in mapping.fields or (_ALL,):
        if _selects(rule.path, segments):
            return _Take(rule, _usable(rule.name or where), rule.plain)
    return _UNSELECTED


def _parse_value(topic: MappedTopic, payload: bytes, received_at: float, limits: Limits) -> ParsedMessage:
    mapping = topic.mapping
    try:
        raw: Any = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Rejected(Reason.BAD_PAYLOAD, f"mapping {mapping.name}: the payload is not UTF-8 text") from None
    label = _usable(topic.prefix + topic.suffix)
    if label is None:
        raise Rejected(
            Reason.BAD_TOPIC, f"mapping {mapping.name}: the label is not a usable measurement name"
        )
    rule = mapping.value_rule
    if rule.type in ("auto", "number"):
        number = _number(raw)
        raw = raw if number is None else number
    value, text, problem = _convert(rule, raw, limits.keep_text)
    if problem is _NO_TEXT_COLUMN:
        raise Ignored  # a text entity, and no store to keep its text
    if problem is not None:
        raise Rejected(Reason.NO_NUMERIC_VALUES, f"mapping {mapping.name}: {problem}")
    timestamp = parse_timestamp(None, received_at, limits)
    texts: list[str | None] | None = None if text is None else [text]
    return ParsedMessage(topic.device, [label], [value], [timestamp], [rule.unit], [], texts)


def _leaves(node: Any, where: str, out: list[tuple[str, Any]], paths: dict[tuple[str, Any], str]) -> None:
    """(path, value) of every value under `node`, objects and arrays walked through. A path is
    built once per mapping (`paths`): the same string object each message, its hash kept."""
    items = node.items() if type(node) is dict else enumerate(node)
    for key, value in items:
        if not where and type(key) is str:
            path = key
        else:
            found = paths.get((where, key))
            if found is None:
                found = paths[where, key] = f"{where}.{key}" if where else str(key)
            path = found
        if type(value) is dict or type(value) is list:
            _leaves(value, path, out, paths)
        else:
            out.append((path, value))


def _at(document: Any, path: tuple[str, ...]) -> Any:
    for segment in path:
        if isinstance(document, dict):
            document = document.get(segment)
        elif isinstance(document, list) and segment.isdigit() and int(segment) < len(document):
            document = document[int(segment)]
        else:
            return None
    return document


def _ignored(patterns: tuple[tuple[str, ...], ...], segments: list[str]) -> bool:
    """A pattern ignores its path and everything under it (`update` ignores `update.state`)."""
    return any(_selects(pattern, segments) for pattern in patterns)


def _selects(pattern: tuple[str, ...], segments: list[str]) -> bool:
    """`pattern` names these segments or a parent of theirs: `ENERGY.*` selects `ENERGY.Power`,
    `*` every value, `POWER*` `POWER1`; an array's positions are segments `0`, `1`, …"""
    return len(pattern) <= len(segments) and all(
        want == have or want == "*" or ("*" in want and fnmatchcase(have, want))
        for want, have in zip(pattern, segments, strict=False)
    )


def _timestamp(mapping: Mapping, root: Any, received_at: float, limits: Limits) -> datetime:
    path, fmt = mapping.time, mapping.time_format
    if path is None or fmt == "none":
        return parse_timestamp(None, received_at, limits)
    value: Any = root.get(path[0]) if len(path) == 1 and type(root) is dict else _at(root, path)
    kind = type(value)
    if fmt != "iso" and (kind is int or kind is float):  # the common case: finite, JSON has no inf
        value = value / 1000.0 if fmt == "ms" else float(value)
    else:
        value = _time_value(mapping, value)
    try:
        return parse_timestamp(value, received_at, limits)
    except Rejected as exc:
        raise Rejected(exc.reason, f"{_time_where(mapping)}: {exc.detail}") from None


def _time_value(mapping: Mapping, value: Any) -> Any:
    """The time field's value as parse_timestamp takes it, or Rejected naming the mapping."""
    fmt = mapping.time_format
    if value is None:
        raise Rejected(Reason.BAD_TIMESTAMP, f"{_time_where(mapping)} is missing")
    if fmt == "iso":
        if not isinstance(value, str):
            raise Rejected(Reason.BAD_TIMESTAMP, f"{_time_where(mapping)} is not ISO-8601 text")
        return value
    number = _number(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        raise Rejected(Reason.BAD_TIMESTAMP, f"{_time_where(mapping)} is not an epoch in {fmt}")
    return number / 1000.0 if fmt == "ms" else float(number)


def _time_where(mapping: Mapping) -> str:
    return f"mapping {mapping.name}: time {'.'.join(mapping.time or ())}"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _convert(rule: FieldRule, raw: Any, keep_text: bool) -> tuple[float, str | None, str | None]:
    """(number, text, problem): a number to store, or a text (then the number is 0.0), or why not."""
    kind = rule.type
    if kind == "text" or (kind == "auto" and isinstance(raw, str)):
        if raw is None or isinstance(raw, dict | list):
            return 0.0, None, "no text value"
        if not keep_text:
            return 0.0, None, _NO_TEXT_COLUMN
        text = raw if isinstance(raw, str) else orjson.dumps(raw).decode()
        return 0.0, text, None
    if kind == "boolean" or isinstance(raw, bool):
        if isinstance(raw, bool):
            number = 1.0 if raw else 0.0
        elif isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            number = 1.0 if raw.strip().lower() in _TRUE else 0.0
        elif isinstance(raw, int | float) and raw in (0, 1):
            number = float(raw)
        else:
            return 0.0, None, f"{str(raw)[:40]!r} is not a boolean"
        return number, None, None
    if kind == "number" and isinstance(raw, str):
        parsed = _number(raw)
        raw = raw if parsed is None else parsed
    if not isinstance(raw, int | float):
        return 0.0, None, f"{type(raw).__name__} value, not a number"
    if not math.isfinite(raw):
        return 0.0, None, "not a finite number"
    if rule.scale != 1.0 or rule.offset != 0.0:
        value = float(f"{raw * rule.scale + rule.offset:.12g}")  # 12 digits: no binary noise
        if not math.isfinite(value):
            return 0.0, None, "not a finite number"
        return value, None, None
    return float(raw), None, None
