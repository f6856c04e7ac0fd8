"""Rule validation: every malformed rule is refused with the faulty field named."""

from __future__ import annotations

from typing import Any

import pytest

from worker.rules.model import RuleError, Scope, parse_rule, parse_settings, scope_of

DEVICE = Scope("device", 5)


@pytest.mark.parametrize(
    ("raw", "path", "words"),
    [
        ("not a rule", "rule", "must be an object"),
        ({"type": "thresold", "field": "t"}, "rule.type", "'thresold' is not one of"),
        ({"type": "threshold", "field": "t", "condition": ">>", "value": 1}, "rule.condition", "'>>'"),
        ({"type": "threshold", "field": "t", "condition": ">"}, "rule.value", "required"),
        (
            {"type": "threshold", "field": "t", "condition": ">", "value": "30"},
            "rule.value",
            "not a finite number",
        ),
        (
            {"type": "threshold", "field": "t", "condition": ">", "value": True},
            "rule.value",
            "not a finite number",
        ),
        ({"type": "threshold", "condition": ">", "value": 1}, "rule.field", "measurement"),
        (
            {"type": "threshold", "field": "t", "condition": ">", "value": 1, "treshold": 2},
            "rule.treshold",
            "unknown field",
        ),
        (
            {"type": "threshold", "field": "t", "condition": ">", "value": 30, "clear": 31},
            "rule.clear",
            "at or below",
        ),
        (
            {"type": "threshold", "field": "t", "condition": "<", "value": 30, "clear": 29},
            "rule.clear",
            "at or above",
        ),
        (
            {"type": "threshold", "field": "t", "condition": "==", "value": 1, "clear": 1},
            "rule.clear",
            "no meaning",
        ),
        (
            {"type": "threshold", "field": "t", "condition": ">", "value": 1, "for_count": 0},
            "rule.for_count",
            "1 or more",
        ),
        (
            {"type": "threshold", "field": "t", "condition": ">", "value": 1, "for_s": -1},
            "rule.for_s",
            "0 or more",
        ),
        (
            {"type": "threshold", "field": "t", "condition": ">", "value": 1, "severity": "huge"},
            "rule.severity",
            "'huge'",
        ),
        (
            {"type": "threshold", "field": "t", "condition": ">", "value": 1, "id": "a b"},
            "rule.id",
            "letters",
        ),
        (
            {"type": "threshold", "field": "t", "condition": ">", "value": 1, "id": "thresholds.t"},
            "rule.id",
            "settings.thresholds",
        ),
        ({"type": "range", "field": "t"}, "rule.min", "min, max or both"),
        ({"type": "range", "field": "t", "min": 5, "max": 5}, "rule.max", "not greater than min"),
        (
            {"type": "range", "field": "t", "min": 0, "max": 10, "hysteresis": 5},
            "rule.hysteresis",
            "half the width",
        ),
        ({"type": "rate", "field": "t", "condition": "==", "value": 1}, "rule.condition", "rate rule needs"),
        ({"type": "rate", "field": "t", "condition": ">", "value": 1, "per": "hour"}, "rule.per", "'hour'"),
        ({"type": "offline"}, "rule.duration", "positive duration"),
        ({"type": "offline", "duration": "5 fortnights"}, "rule.duration", "positive duration"),
        ({"type": "offline", "duration": 60, "field": "t"}, "rule.field", "unknown field for a offline rule"),
    ],
)
def test_malformed_rules_name_the_faulty_field(raw: Any, path: str, words: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_rule(raw, DEVICE)
    assert caught.value.path == path
    assert words in caught.value.problem


def test_spec_shaped_rules_parse_with_derived_ids() -> None:
    rule = parse_rule({"type": "threshold", "field": "temperature", "condition": ">", "value": 30}, DEVICE)
    assert (rule.uid, rule.measurement, rule.value, rule.for_count) == (
        "device:5/threshold-temperature-gt-30", "temperature", 30.0, 1,
    )  # fmt: skip
    offline = parse_rule({"type": "offline", "duration": "5m"}, Scope("global"))
    assert (offline.uid, offline.duration_s) == ("global/offline-300s", 300.0)


@pytest.mark.parametrize(
    ("text", "seconds"), [(90, 90.0), ("90s", 90.0), ("2h", 7200.0), ("1.5 min", 90.0), ("500ms", 0.5)]
)
def test_durations_accept_numbers_and_units(text: Any, seconds: float) -> None:
    assert parse_rule({"type": "offline", "duration": text}, DEVICE).duration_s == seconds


def test_one_malformed_rule_does_not_hide_the_others() -> None:
    settings = {
        "thresholds": {"temperature": {"min": 10, "max": 30, "unit": "°C"}, "humidity": {"max": "high"}},
        "alerts": [
            {"type": "threshold", "field": "pressure", "condition": ">", "value": 1050},
            {"type": "threshold", "field": "pressure", "condition": "≥", "value": 1050},
            {"type": "offline", "duration": 300},
            {"id": "dup", "type": "offline", "duration": 60},
            {"id": "dup", "type": "offline", "duration": 90},
        ],
    }
    rules, errors = parse_settings(settings, DEVICE)
    assert [r.id for r in rules] == [
        "thresholds.temperature",
        "threshold-pressure-gt-1050",
        "offline-300s",
        "dup",
    ]
    assert [e.path for e in errors] == [
        "settings.thresholds.humidity.max",
        "settings.alerts[1].condition",
        "settings.alerts[4].id",
    ]
    temperature = rules[0]
    assert (temperature.kind, temperature.minimum, temperature.maximum, temperature.unit) == (
        "range",
        10,
        30,
        "°C",
    )


def test_a_config_names_its_scope() -> None:
    assert scope_of({"device_id": 5}) == Scope("device", 5)
    assert scope_of({"group_id": 2}) == Scope("group", 2)
    assert scope_of({"scope": "global"}).key == "global"
    with pytest.raises(RuleError, match="device_id, group_id or scope"):
        scope_of({"settings": {}})
    with pytest.raises(RuleError, match="not an integer"):
        scope_of({"device_id": "5"})
