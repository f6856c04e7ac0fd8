"""Rule definitions: what an operator may write in `device_configs`, checked field by field.

A rule comes from a device config document (`device_configs`, docs/rules.md): an entry of
`settings.alerts` (`threshold`, `range`, `rate`, `offline`) or an entry of
`settings.thresholds` (`{name: {min, max, unit}}`, read as a `range` rule with
the id `thresholds.{name}`). Parsing is strict — an unknown key is an error, so a
typo (`treshold`) is reported instead of silently ignored — and every error names
the faulty field by its path, e.g. `settings.alerts[2].condition`.

A `Definition` is what a rule says; a `Rule` is a definition in its scope (device,
group, global). Each carries its compiled predicates (`breach`, `cleared`) so the
evaluator's inner loop is two plain calls, not a dispatch on the rule kind.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

KINDS = ("threshold", "range", "rate", "offline")
SEVERITIES = ("info", "warning", "critical")
CONDITIONS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
# Words for messages: "temperature is 31 °C, above the threshold of 30 °C".
CONDITION_WORDS = {
    ">": "above",
    ">=": "at or above",
    "<": "below",
    "<=": "at or below",
    "==": "equal to",
    "!=": "not equal to",
}
RATE_UNITS = {"s": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
D = TypeVar("D", bound="Definition")
_RULE_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

_COMMON_KEYS = {"id", "type", "severity", "enabled", "description", "unit"}
_KEYS = {
    "threshold": _COMMON_KEYS | {"field", "measurement", "condition", "value", "clear", "for_count", "for_s"},
    "range": _COMMON_KEYS | {"field", "measurement", "min", "max", "hysteresis", "for_count", "for_s"},
    "rate": _COMMON_KEYS
    | {"field", "measurement", "condition", "value", "per", "abs", "clear", "for_count", "for_s"},
    "offline": _COMMON_KEYS | {"duration"},
}
_THRESHOLD_KEYS = {
    "min",
    "max",
    "unit",
    "hysteresis",
    "severity",
    "enabled",
    "description",
    "for_count",
    "for_s",
}


class RuleError(ValueError):
    """A rule is malformed; `path` names the faulty field."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True, slots=True, order=True)
class Scope:
    """Where a rule is defined: one device, a device group, or every device."""

    kind: str  # "device" | "group" | "global"
    ref: int | None = None

    @property
    def key(self) -> str:
        """The device config document's key, and the prefix of its rules' ids."""
        return "global" if self.kind == "global" else f"{self.kind}:{self.ref}"

    @staticmethod
    def from_key(key: str) -> Scope:
        if key == "global":
            return Scope("global")
        kind, _, ref = key.partition(":")
        if kind not in ("device", "group") or not ref.isdigit():
            raise ValueError(f"{key!r} is not a scope (device:ID, group:ID or global)")
        return Scope(kind, int(ref))


def _never(_: float) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class Definition:
    """What a rule says, apart from where it is defined: its validated fields and compiled tests.

    A loaded rule set holds one `Definition` for every scope that defines the same rule
    (ten rules on 20,000 devices are ten objects, not 200,000). Equal definitions (field
    by field) mean an unchanged rule.
    """

    id: str
    kind: str
    measurement: str | None = None  # None for offline rules, which watch the whole device
    condition: str | None = None
    value: float | None = None
    minimum: float | None = None
    maximum: float | None = None
    clear: float | None = None  # threshold/rate: resolve only once the value is past this level
    hysteresis: float = 0.0  # range: resolve only once this far inside the band
    per_s: float = 1.0  # rate: seconds per rate unit (1 = per second, 60 = per minute)
    absolute: bool = False  # rate: compare |rate|, for "changes fast in either direction"
    duration_s: float = 0.0  # offline
    for_count: int = 1  # debounce: consecutive breaching samples before firing
    for_s: float = 0.0  # debounce: how long the breach must last before firing
    severity: str = "warning"
    unit: str | None = None
    enabled: bool = True
    breach: Callable[[float], bool] = field(default=_never, init=False, compare=False, repr=False)
    cleared: Callable[[float], bool] = field(default=_never, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        breach, cleared = _compile(self)
        object.__setattr__(self, "breach", breach)
        object.__setattr__(self, "cleared", cleared)

    @property
    def rate_unit(self) -> str:
        return "min" if self.per_s == 60.0 else "s"


@dataclass(frozen=True, slots=True)
class Rule(Definition):
    """A definition in its scope: what `iotflow rules` lists and edits."""

    scope: Scope = field(kw_only=True)

    @property
    def uid(self) -> str:
        """Unique across scopes: `device:5/high-temp`, `group:2/thresholds.humidity`, `global/offline`."""
        return f"{self.scope.key}/{self.id}"


def _compile(rule: Definition) -> tuple[Callable[[float], bool], Callable[[float], bool]]:
    """The breach test and the (hysteresis-aware) all-clear test, as closures.

    One specialised closure per comparison rather than `operator.gt(x, level)` inside a
    generic one: these run for every reading, and the extra call costs ~40 ns each time.
    """
    if rule.kind in ("threshold", "rate"):
        level = rule.value if rule.value is not None else 0.0
        clear_level = rule.clear if rule.clear is not None else level
        above = _COMPARE[rule.condition or ">"]
        return above(level), _negate(above(clear_level))
    if rule.kind == "range":
        low = -math.inf if rule.minimum is None else rule.minimum
        high = math.inf if rule.maximum is None else rule.maximum
        inner_low, inner_high = low + rule.hysteresis, high - rule.hysteresis

        def breach_range(x: float) -> bool:
            return x < low or x > high

        def cleared_range(x: float) -> bool:
            return inner_low <= x <= inner_high

        return breach_range, cleared_range
    return _never, _never  # offline rules are judged on silence, not on values


def _negate(test: Callable[[float], bool]) -> Callable[[float], bool]:
    return lambda x: not test(x)


_COMPARE: dict[str, Callable[[float], Callable[[float], bool]]] = {
    ">": lambda level: lambda x: x > level,
    ">=": lambda level: lambda x: x >= level,
    "<": lambda level: lambda x: x < level,
    "<=": lambda level: lambda x: x <= level,
    "==": lambda level: lambda x: x == level,
    "!=": lambda level: lambda x: x != level,
}


# --- parsing -------------------------------------------------------------------------------------


def parse_rule(raw: Any, scope: Scope, path: str = "rule") -> Rule:
    """One `settings.alerts` entry → a `Rule`, or `RuleError` naming the faulty field."""
    return _parse_entry(raw, path, partial(Rule, scope=scope))


def parse_settings(settings: Any, scope: Scope, path: str = "settings") -> tuple[list[Rule], list[RuleError]]:
    """Every rule of one config's `settings`; malformed ones are returned as errors, not raised.

    One bad rule must not hide the good ones next to it, so each is parsed on its own.
    """
    return _parse_settings(settings, scope.key, path, partial(Rule, scope=scope))


def parse_definitions(
    settings: Any, where: str, path: str = "settings"
) -> tuple[list[Definition], list[RuleError]]:
    """`parse_settings` without the scope, for a rule set that shares definitions between
    scopes; `where` (the config's key) only names the config in error messages."""
    return _parse_settings(settings, where, path, Definition)


def _parse_settings(
    settings: Any, where: str, path: str, build: Callable[..., D]
) -> tuple[list[D], list[RuleError]]:
    rules: list[D] = []
    errors: list[RuleError] = []
    if settings is None:
        return rules, errors
    if not isinstance(settings, Mapping):
        return rules, [RuleError(path, "must be an object")]
    thresholds = settings.get("thresholds") or {}
    if not isinstance(thresholds, Mapping):
        errors.append(RuleError(f"{path}.thresholds", "must be an object {name: {min, max, unit}}"))
        thresholds = {}
    for name, raw in thresholds.items():
        try:
            rules.append(_parse_threshold(name, raw, f"{path}.thresholds.{name}", build))
        except RuleError as exc:
            errors.append(exc)
    alerts = settings.get("alerts") or []
    if not isinstance(alerts, list):
        errors.append(RuleError(f"{path}.alerts", "must be a list of rules"))
        alerts = []
    seen = {rule.id for rule in rules}
    for index, raw in enumerate(alerts):
        entry = f"{path}.alerts[{index}]"
        try:
            rule = _parse_entry(raw, entry, build)
        except RuleError as exc:
            errors.append(exc)
            continue
        if rule.id in seen:
            errors.append(RuleError(f"{entry}.id", f"{rule.id!r} is used twice in {where}"))
            continue
        seen.add(rule.id)
        rules.append(rule)
    return rules, errors


def _parse_entry(raw: Any, path: str, build: Callable[..., D]) -> D:
    if not isinstance(raw, Mapping):
        raise RuleError(path, f"must be an object, not {type(raw).__name__}")
    kind = raw.get("type")
    if kind not in KINDS:
        raise RuleError(f"{path}.type", f"{kind!r} is not one of {', '.join(KINDS)}")
    for key in raw:
        if key not in _KEYS[kind]:
            raise RuleError(
                f"{path}.{key}", f"unknown field for a {kind} rule ({', '.join(sorted(_KEYS[kind]))})"
            )
    common = _common(raw, path)
    if (common["id"] or "").startswith("thresholds."):
        raise RuleError(f"{path}.id", "ids starting with 'thresholds.' name settings.thresholds entries")
    if kind == "offline":
        duration = _duration(raw.get("duration"), f"{path}.duration")
        rule_id = common.pop("id") or f"offline-{duration:g}s"
        return build(rule_id, kind, duration_s=duration, **common)
    measurement = _measurement(raw, path)
    debounce = _debounce(raw, path)
    if kind == "range":
        minimum, maximum, hysteresis = _bounds(raw, path)
        rule_id = common.pop("id") or f"range-{measurement}"
        return build(
            rule_id, kind, measurement, minimum=minimum, maximum=maximum,
            hysteresis=hysteresis, **debounce, **common,
        )  # fmt: skip
    condition = raw.get("condition")
    if condition not in CONDITIONS:
        raise RuleError(f"{path}.condition", f"{condition!r} is not one of {' '.join(CONDITIONS)}")
    if kind == "rate" and condition in ("==", "!="):
        raise RuleError(f"{path}.condition", "a rate rule needs >, >=, < or <=")
    value = _number(raw.get("value"), f"{path}.value", required=True)
    assert value is not None  # required=True
    clear = _clear(raw, condition, value, path)
    if kind == "threshold":
        rule_id = common.pop("id") or f"threshold-{measurement}-{_op_name(condition)}-{value:g}"
        return build(rule_id, kind, measurement, condition, value, clear=clear, **debounce, **common)
    per = raw.get("per", "s")
    if per not in RATE_UNITS:
        raise RuleError(f"{path}.per", f"{per!r} is not one of {', '.join(RATE_UNITS)}")
    absolute = raw.get("abs", False)
    if not isinstance(absolute, bool):
        raise RuleError(f"{path}.abs", f"{absolute!r} is not true or false")
    rule_id = common.pop("id") or f"rate-{measurement}-{_op_name(condition)}-{value:g}-per-{per}"
    return build(
        rule_id, kind, measurement, condition, value, clear=clear,
        per_s=RATE_UNITS[per], absolute=absolute, **debounce, **common,
    )  # fmt: skip


def _parse_threshold(name: Any, raw: Any, path: str, build: Callable[..., D]) -> D:
    """A `settings.thresholds.{name}` entry ({min, max, unit}) → a range rule `thresholds.{name}`."""
    if not isinstance(name, str) or not name:
        raise RuleError(path, "a threshold needs a measurement name as its key")
    if not isinstance(raw, Mapping):
        raise RuleError(path, f"must be an object with min and/or max, not {type(raw).__name__}")
    for key in raw:
        if key not in _THRESHOLD_KEYS:
            raise RuleError(f"{path}.{key}", f"unknown field ({', '.join(sorted(_THRESHOLD_KEYS))})")
    minimum, maximum, hysteresis = _bounds(raw, path)
    common = _common({**raw, "id": None}, path)
    common.pop("id")
    return build(
        f"thresholds.{name}", "range", name, minimum=minimum, maximum=maximum,
        hysteresis=hysteresis, **_debounce(raw, path), **common,
    )  # fmt: skip


def scope_of(doc: Mapping[str, Any]) -> Scope:
    """The scope a device config document speaks for, from its own fields."""
    if doc.get("scope") == "global":
        return Scope("global")
    for kind in ("device", "group"):
        ref = doc.get(f"{kind}_id")
        if ref is not None:
            if isinstance(ref, bool) or not isinstance(ref, int):
                raise RuleError(f"{kind}_id", f"{ref!r} is not an integer id")
            return Scope(kind, ref)
    raise RuleError("device_id", 'a config needs device_id, group_id or scope = "global"')


# --- field helpers -------------------------------------------------------------------------------


def _common(raw: Mapping[str, Any], path: str) -> dict[str, Any]:
    rule_id = raw.get("id")
    if rule_id is not None and (not isinstance(rule_id, str) or not _RULE_ID.match(rule_id)):
        raise RuleError(f"{path}.id", f"{rule_id!r} is not 1-64 letters, digits, '.', '_' or '-'")
    severity = raw.get("severity", "warning")
    if severity not in SEVERITIES:
        raise RuleError(f"{path}.severity", f"{severity!r} is not one of {', '.join(SEVERITIES)}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RuleError(f"{path}.enabled", f"{enabled!r} is not true or false")
    unit = raw.get("unit")
    if unit is not None and not isinstance(unit, str):
        raise RuleError(f"{path}.unit", f"{unit!r} is not a string")
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        raise RuleError(f"{path}.description", f"{description!r} is not a string")
    return {"id": rule_id, "severity": severity, "enabled": enabled, "unit": unit}


def _measurement(raw: Mapping[str, Any], path: str) -> str:
    if "field" in raw and "measurement" in raw:
        raise RuleError(f"{path}.measurement", "give field or measurement, not both")
    key = "measurement" if "measurement" in raw else "field"
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise RuleError(f"{path}.{key}", "needs the measurement (datapoint label), e.g. room1.temperature")
    return value


def _number(value: Any, path: str, required: bool = False) -> float | None:
    if value is None:
        if required:
            raise RuleError(path, "is required (a number)")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RuleError(path, f"{value!r} is not a finite number")
    return float(value)


def _bounds(raw: Mapping[str, Any], path: str) -> tuple[float | None, float | None, float]:
    minimum = _number(raw.get("min"), f"{path}.min")
    maximum = _number(raw.get("max"), f"{path}.max")
    if minimum is None and maximum is None:
        raise RuleError(f"{path}.min", "a range needs min, max or both")
    if minimum is not None and maximum is not None and minimum >= maximum:
        raise RuleError(f"{path}.max", f"{maximum:g} is not greater than min {minimum:g}")
    hysteresis = _number(raw.get("hysteresis"), f"{path}.hysteresis") or 0.0
    if hysteresis < 0:
        raise RuleError(f"{path}.hysteresis", "must be 0 or more")
    if minimum is not None and maximum is not None and hysteresis * 2 >= maximum - minimum:
        raise RuleError(f"{path}.hysteresis", "must be less than half the width of the range")
    return minimum, maximum, hysteresis


def _clear(raw: Mapping[str, Any], condition: str, value: float, path: str) -> float | None:
    clear = _number(raw.get("clear"), f"{path}.clear")
    if clear is None:
        return None
    if condition in (">", ">=") and clear > value:
        raise RuleError(f"{path}.clear", f"{clear:g} must be at or below the threshold {value:g}")
    if condition in ("<", "<=") and clear < value:
        raise RuleError(f"{path}.clear", f"{clear:g} must be at or above the threshold {value:g}")
    if condition in ("==", "!="):
        raise RuleError(f"{path}.clear", f"has no meaning with {condition}")
    return clear


def _debounce(raw: Mapping[str, Any], path: str) -> dict[str, Any]:
    count = raw.get("for_count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise RuleError(f"{path}.for_count", f"{count!r} is not an integer of 1 or more")
    seconds = _number(raw.get("for_s", 0), f"{path}.for_s") or 0.0
    if seconds < 0:
        raise RuleError(f"{path}.for_s", "must be 0 or more")
    return {"for_count": count, "for_s": seconds}


def _duration(value: Any, path: str) -> float:
    """Seconds, as a number or text with a unit: 300, "90s", "5m", "2h"."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise RuleError(path, f"{value!r} is not a positive duration (seconds, or text like 90s, 5m, 2h)")
    return seconds


def _op_name(condition: str) -> str:
    return {">": "gt", ">=": "ge", "<": "lt", "<=": "le", "==": "eq", "!=": "ne"}[condition]
