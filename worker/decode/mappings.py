"""Topic and JSON mappings (docs/decoding.md, "Mappings"): the model, its loader, topic routing.

A mapping file is TOML: one table per mapping (a topic template, the level naming the
device, a payload rule) and an optional top-level `ignore_topics`. The shipped profiles are
such files in `schemas/mappings/`. What a mapped payload becomes is worked out in
`worker/decode/mapped.py`.
"""

from __future__ import annotations

import math
import re
import string
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from worker.decode.codecs import CodecConfigError

PROFILES_PACKAGE = "schemas"
TIME_FORMATS = ("iso", "s", "ms", "none")
FIELD_TYPES = ("auto", "number", "boolean", "text")
PAYLOADS = ("json", "value")
# The built-in layouts (worker/decode/parse.py) take part in routing like templates: a mapping
# may not take their shape, and a more literal one wins over them (`tele/{d}/SENSOR` is not F2).
BUILTIN_LAYOUTS = ("tele/{}/{}/{}/{}", "stat/{}/{}/{}/{}", "devices/{}/telemetry")
_MAPPING_KEYS = {
    "topic", "device", "payload", "type", "label", "root", "time", "time_format", "when", "fields",
    "ignore", "unit", "scale", "offset",
}  # fmt: skip
_FIELD_KEYS = {"path", "name", "unit", "scale", "offset", "type"}
_LEVEL = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class MappingConfigError(CodecConfigError):
    """A mapping file is malformed: the message names the file, the line and the field. A
    CodecConfigError, so that every place refusing a bad codec file refuses it alike."""


FieldType = Literal["auto", "number", "boolean", "text"]


@dataclass(frozen=True, slots=True)
class FieldRule:
    """Values at `path` (segments; `*` or a glob such as `POWER*` matches any key or index)."""

    path: tuple[str, ...]
    name: str | None = None  # the datapoint label instead of the path (an exact path only)
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0
    type: FieldType = "auto"
    # A JSON number taken as it is (no type to convert to, no scale or offset): the fast path.
    plain: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plain = self.type in ("auto", "number") and self.scale == 1.0 and self.offset == 0.0
        object.__setattr__(self, "plain", plain)

    @property
    def exact(self) -> bool:
        return not any("*" in segment for segment in self.path)


@dataclass(frozen=True, slots=True)
class Mapping:
    name: str  # `{file stem}.{table}`: `tasmota.sensor`
    source: str  # the file it came from
    topic: str
    levels: tuple[str | None, ...]  # per topic level: a level name, or None for a literal
    literals: tuple[str | None, ...]  # per topic level: the literal, or None for a named level
    device: int  # index of the level naming the device
    payload: Literal["json", "value"] = "json"
    label: str = "{path}"
    root: tuple[str, ...] = ()
    time: tuple[str, ...] | None = None
    time_format: str = "none"
    when: tuple[tuple[tuple[str, ...], tuple[Any, ...]], ...] = ()
    fields: tuple[FieldRule, ...] = ()  # none: every value of the payload
    ignore: tuple[tuple[str, ...], ...] = ()
    value_rule: FieldRule = field(default_factory=lambda: FieldRule(()))  # payload = "value"
    # A payload's path → what becomes of its value, and (object path, key) → the path: a device
    # repeats its shape, so a path is built and judged once (worker/decode/mapped.py). Filled
    # as messages come; bounded there.
    judged: dict[str, object] = field(default_factory=dict, compare=False, repr=False)
    paths: dict[tuple[str, Any], str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def filter(self) -> str:
        """The MQTT topic filter it subscribes to."""
        return "/".join("+" if literal is None else literal for literal in self.literals)

    def matches(self, levels: Sequence[str]) -> bool:
        return len(levels) == len(self.literals) and all(
            literal is None or literal == level for literal, level in zip(self.literals, levels, strict=True)
        )


@dataclass(frozen=True, slots=True)
class MappingSet:
    """What is enabled: the mappings and the topics to ignore, with where each came from."""

    mappings: tuple[Mapping, ...] = ()
    ignore_topics: tuple[tuple[str, str], ...] = ()  # (filter, source)
    # By topic level count, most specific first: a literal level left of a named one wins.
    _routes: dict[int, tuple[Mapping | str, ...]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        shapes: list[tuple[tuple[str | None, ...], Mapping | str]] = [
            (tuple(None if level == "{}" else level for level in layout.split("/")), layout)
            for layout in BUILTIN_LAYOUTS
        ]
        shapes += [(mapping.literals, mapping) for mapping in self.mappings]
        by_count: dict[int, list[tuple[tuple[str | None, ...], Mapping | str]]] = {}
        for literals, target in shapes:
            by_count.setdefault(len(literals), []).append((literals, target))
        for count, entries in by_count.items():
            entries.sort(key=lambda entry: tuple(literal is None for literal in entry[0]))
            self._routes[count] = tuple(target for _, target in entries)

    def __bool__(self) -> bool:
        return bool(self.mappings or self.ignore_topics)

    @property
    def filters(self) -> list[str]:
        """The topic filters the mappings subscribe to, in order, each once."""
        return list(dict.fromkeys(mapping.filter for mapping in self.mappings))

    def route(self, levels: Sequence[str]) -> Mapping | str | None:
        """The mapping for a topic's levels, a built-in layout's name, or None."""
        for target in self._routes.get(len(levels), ()):
            if isinstance(target, str):
                if all(
                    want == "{}" or want == level
                    for want, level in zip(target.split("/"), levels, strict=True)
                ):
                    return target
            elif target.matches(levels):
                return target
        return None

    def ignored(self, topic: str) -> bool:
        return any(topic_matches(pattern, topic) for pattern, _ in self.ignore_topics)


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching: `+` one level, `#` the rest (the parent level included)."""
    want, have = pattern.split("/"), topic.split("/")
    for index, level in enumerate(want):
        if level == "#":
            return True
        if index >= len(have) or (level != "+" and level != have[index]):
            return False
    return len(want) == len(have)


def profile_names() -> list[str]:
    """The shipped profiles: `schemas/mappings/{name}.toml`."""
    folder = resources.files(PROFILES_PACKAGE) / "mappings"
    return sorted(
        entry.name.removesuffix(".toml") for entry in folder.iterdir() if entry.name.endswith(".toml")
    )


def profile_path(name: str) -> Path:
    return Path(str(resources.files(PROFILES_PACKAGE) / "mappings" / f"{name}.toml"))


def load_mappings(profiles: Iterable[str] = (), paths: Iterable[str | Path] = ()) -> MappingSet:
    """The enabled profiles and mapping files; MappingConfigError if one is malformed, a profile
    is unknown, or two templates take the same shape."""
    known = profile_names()
    files: list[Path] = []
    for name in profiles:
        if name not in known:
            raise MappingConfigError(f"decode.profiles: no profile {name!r} (one of {', '.join(known)})")
        files.append(profile_path(name))
    files += [Path(path) for path in paths]
    mappings: list[Mapping] = []
    ignore: list[tuple[str, str]] = []
    for path in files:
        found, ignored = _load_file(path)
        mappings += found
        ignore += [(pattern, str(path)) for pattern in ignored]
    _refuse_overlaps(mappings)
    return MappingSet(tuple(mappings), tuple(ignore))


def _refuse_overlaps(mappings: list[Mapping]) -> None:
    """Two templates with the same literals in the same places (the level names aside) would
    each claim the same topics: refused, naming both. Different shapes are ordered instead."""
    seen: dict[tuple[str | None, ...], str] = {
        tuple(
            None if level == "{}" else level for level in layout.split("/")
        ): f"the built-in layout {layout}"
        for layout in BUILTIN_LAYOUTS
    }
    names: dict[str, str] = {}
    for mapping in mappings:
        where = f"{mapping.name} ({mapping.topic}, {mapping.source})"
        if mapping.name in names:
            raise MappingConfigError(
                f"two mappings are named {mapping.name!r}: in {names[mapping.name]} and {mapping.source}"
            )
        names[mapping.name] = mapping.source
        other = seen.get(mapping.literals)
        if other is not None:
            raise MappingConfigError(f"overlapping topic templates: {other} and {where}")
        seen[mapping.literals] = where


def _load_file(path: Path) -> tuple[list[Mapping], list[str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingConfigError(f"{path}: cannot be read: {exc}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MappingConfigError(f"{path}: not valid TOML: {exc}") from None
    locate = _Locator(path, text)
    ignore = document.pop("ignore_topics", [])
    if not isinstance(ignore, list) or not all(isinstance(p, str) and _is_filter(p) for p in ignore):
        raise locate.error(None, "ignore_topics", "must be a list of MQTT topic filters")
    mappings = []
    for table, spec in document.items():
        if not isinstance(spec, dict):
            raise locate.error(None, table, "must be a table [name] of a mapping, or ignore_topics")
        mappings.append(_parse_mapping(locate, path, table, spec))
    if not mappings and not ignore:
        raise MappingConfigError(f"{path}: defines no mapping")
    return mappings, ignore


class _Locator:
    """Finds the line of a mapping's key (tomllib gives no positions for values)."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line(self, table: str | None, key: str | None, needle: str | None = None) -> int:
        start, end = 0, len(self.lines)
        if table is not None:
            header = re.compile(rf"^\s*\[\s*[\"']?{re.escape(table)}[\"']?\s*\]")
            for number, line in enumerate(self.lines):
                if header.match(line):
                    start = number
                    break
            for number in range(start + 1, len(self.lines)):
                if self.lines[number].lstrip().startswith("["):
                    end = number
                    break
        found = start
        if key is not None:
            pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
            for number in range(start, end):
                if pattern.match(self.lines[number]):
                    found = number
                    break
        if needle is not None:
            for number in range(found, end):
                if needle in self.lines[number]:
                    return number + 1
        return found + 1

    def error(
        self, table: str | None, key: str, problem: str, needle: str | None = None, shown: str = ""
    ) -> MappingConfigError:
        """`file:line: mapping 'm', field 'key': problem`; `shown` names the field instead of `key`."""
        line = self.line(table, key, needle)
        name = shown or key
        where = f"mapping {table!r}, field {name!r}" if table is not None else f"field {name!r}"
        return MappingConfigError(f"{self.path}:{line}: {where}: {problem}")


def _is_filter(pattern: str) -> bool:
    levels = pattern.split("/")
    return bool(pattern) and all(
        ("#" not in level or (level == "#" and index == len(levels) - 1))
        and ("+" not in level or level == "+")
        for index, level in enumerate(levels)
    )


def _parse_mapping(locate: _Locator, path: Path, table: str, spec: dict[str, Any]) -> Mapping:
    def fail(key: str, problem: str, needle: str | None = None, shown: str = "") -> MappingConfigError:
        return locate.error(table, key, problem, needle, shown)

    unknown = sorted(set(spec) - _MAPPING_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key (known: {', '.join(sorted(_MAPPING_KEYS))})")
    topic = spec.get("topic")
    if not isinstance(topic, str) or not topic:
        raise fail("topic", 'is required: a topic template such as "tele/{device}/SENSOR"')
    names: list[str | None] = []
    literals: list[str | None] = []
    for level in topic.split("/"):
        named = _LEVEL.fullmatch(level)
        if named:
            names.append(named.group(1))
            literals.append(None)
        elif not level or set(level) & set("{}+#"):
            raise fail("topic", f"level {level!r} is neither a literal nor a {{name}}")
        else:
            names.append(None)
            literals.append(level)
    named_levels = [name for name in names if name is not None]
    if len(set(named_levels)) != len(named_levels):
        raise fail("topic", "a level name is used twice")
    device_level = _text(spec, "device", "device", fail)
    if device_level not in named_levels:
        raise fail("device", f"{device_level!r} is not a level of {topic!r}")
    payload = _choice(spec, "payload", "json", PAYLOADS, fail)
    label = _text(spec, "label", "{path}" if payload == "json" else "", fail)
    try:
        parts = [name for _, name, _, _ in string.Formatter().parse(label) if name is not None]
    except ValueError as exc:
        raise fail("label", f"is not a template: {exc}") from None
    for part in parts:
        if part != "path" and part not in named_levels:
            raise fail("label", f"{{{part}}} is neither {{path}} nor a level of the topic")
    if payload == "value" and (not label or "path" in parts):
        raise fail("label", 'a bare value needs a label from the topic, such as "{measurement}"')
    if parts.count("path") > 1:
        raise fail("label", "{path} may appear once")
    time = spec.get("time")
    if time is not None and (payload != "json" or not isinstance(time, str) or not time):
        raise fail("time", "is the path of the time field in a JSON payload")
    time_format = _choice(spec, "time_format", "iso" if time else "none", TIME_FORMATS, fail)
    if time is None and time_format != "none":
        raise fail("time_format", f"{time_format!r} needs `time`, the field holding it")
    when = spec.get("when", {})
    if not isinstance(when, dict):
        raise fail("when", 'must be a table of path = value(s), such as { method = "NotifyStatus" }')
    raw_fields = spec.get("fields", [])
    if payload == "value" and "fields" in spec:
        raise fail("fields", "a bare value has no fields: give `type`, `unit`, `scale`, `offset`")
    if not isinstance(raw_fields, list):
        raise fail("fields", "must be a list of { path = …, unit = … } tables")
    rules = tuple(_parse_field(fail, raw) for raw in raw_fields)
    ignore = spec.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(p, str) and p for p in ignore):
        raise fail("ignore", "must be a list of paths")
    if payload == "json":
        for key in ("type", "unit", "scale", "offset"):
            if key in spec:
                raise fail(key, "belongs to a field of a JSON payload (or to a bare value)")
        value_rule = FieldRule(())
    else:
        own = {key: spec[key] for key in ("type", "unit", "scale", "offset") if key in spec}
        value_rule = _parse_field(fail, {"path": "", **own}, bare=True)
    return Mapping(
        name=f"{path.stem}.{table}",
        source=str(path),
        topic=topic,
        levels=tuple(names),
        literals=tuple(literals),
        device=names.index(device_level),
        payload=payload,  # type: ignore[arg-type]  # one of PAYLOADS, checked above
        label=label,
        root=_path(spec.get("root", ""), "root", fail),
        time=_path(time, "time", fail) if time else None,
        time_format=time_format,
        when=tuple(
            (_path(key, "when", fail), tuple(value) if isinstance(value, list) else (value,))
            for key, value in when.items()
        ),
        fields=rules,
        ignore=tuple(_path(pattern, "ignore", fail) for pattern in ignore),
        value_rule=value_rule,
    )


def _parse_field(fail: Any, raw: Any, bare: bool = False) -> FieldRule:
    """One entry of `fields` (or, `bare`, the value rule of a bare payload's own keys)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
        raise fail("fields", "every field needs a `path`")
    needle = None if bare else f'"{raw["path"]}"'

    def bad(key: str, problem: str) -> MappingConfigError:
        if bare:
            return fail(key, problem)
        return fail("fields", problem, needle, f"fields[{raw['path']}].{key}")

    unknown = sorted(set(raw) - _FIELD_KEYS)
    if unknown:
        raise bad(unknown[0], f"unknown key (known: {', '.join(sorted(_FIELD_KEYS))})")
    numbers = {}
    for key in ("scale", "offset"):
        value = raw.get(key, 0.0 if key == "offset" else 1.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad(key, "must be a finite number")
        numbers[key] = float(value)
    if numbers["scale"] == 0:
        raise bad("scale", "must not be 0")
    kind = raw.get("type", "auto")
    if kind not in FIELD_TYPES:
        raise bad("type", f"{kind!r} is not one of {', '.join(FIELD_TYPES)}")
    unit = raw.get("unit")
    if unit is not None and not isinstance(unit, str):
        raise bad("unit", "must be text")
    name = raw.get("name")
    rule = FieldRule(
        path=tuple(raw["path"].split(".")) if raw["path"] else (),
        name=name,
        unit=unit,
        scale=numbers["scale"],
        offset=numbers["offset"],
        type=kind,
    )
    if not bare and not all(rule.path):
        raise bad("path", f"{raw['path']!r} has an empty segment")
    if name is not None and (not isinstance(name, str) or not name or not rule.exact):
        raise bad("name", "is a non-empty label, for a path without wildcards")
    return rule


def _path(value: Any, key: str, fail: Any) -> tuple[str, ...]:
    if not isinstance(value, str):
        raise fail(key, "a path is text, such as ENERGY.Power")
    if not value:
        return ()
    segments = tuple(value.split("."))
    if not all(segments):
        raise fail(key, f"path {value!r} has an empty segment")
    return segments


def _text(spec: dict[str, Any], key: str, default: str, fail: Any) -> str:
    value = spec.get(key, default)
    if not isinstance(value, str):
        raise fail(key, "must be text")
    return value


def _choice(spec: dict[str, Any], key: str, default: str, choices: tuple[str, ...], fail: Any) -> str:
    value = spec.get(key, default)
    if value not in choices:
        raise fail(key, f"{value!r} is not one of {', '.join(choices)}")
    return str(value)
