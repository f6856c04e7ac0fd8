"""Human-readable alert messages: the measurement, its value, the threshold and the unit."""

from __future__ import annotations

from datetime import datetime

from worker.rules.model import CONDITION_WORDS, Definition


def quantity(value: float, unit: str | None) -> str:
    text = f"{value:.6g}"
    return f"{text} {unit}" if unit else text


def duration(seconds: float) -> str:
    for size, name in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {name}"
    return f"{seconds:g} s"


def fired(rule: Definition, device_id: int, value: float, threshold: float, unit: str | None) -> str:
    where = f"{rule.measurement} on device {device_id}"
    if rule.kind == "range":
        side = (
            "below the minimum" if rule.minimum is not None and value < rule.minimum else "above the maximum"
        )
        return f"{where} is {quantity(value, unit)}, {side} of {quantity(threshold, unit)}"
    word = CONDITION_WORDS[rule.condition or ">"]
    if rule.kind == "rate":
        per = f"{unit or 'units'}/{rule.rate_unit}"
        how = "changing by" if rule.absolute else "changing at"
        return f"{where} is {how} {quantity(value, per)}, {word} the limit of {quantity(threshold, per)}"
    return f"{where} is {quantity(value, unit)}, {word} the threshold of {quantity(threshold, unit)}"


def resolved(rule: Definition, device_id: int, value: float, threshold: float, unit: str | None) -> str:
    where = f"{rule.measurement} on device {device_id}"
    if rule.kind == "rate":
        per = f"{unit or 'units'}/{rule.rate_unit}"
        return (
            f"{where} is changing at {quantity(value, per)}, within the limit of {quantity(threshold, per)}"
        )
    return f"{where} is back to {quantity(value, unit)} (threshold {quantity(threshold, unit)})"


def offline(rule: Definition, device_id: int, last_seen: datetime) -> str:
    return (
        f"device {device_id} has sent no data for {duration(rule.duration_s)} "
        f"(last seen {last_seen.isoformat(timespec='seconds')})"
    )


def online(device_id: int) -> str:
    return f"device {device_id} is sending data again"


def withdrawn(rule_uid: str, device_id: int) -> str:
    return f"alert closed: rule {rule_uid} was removed, disabled or no longer applies to device {device_id}"


def describe(rule: Definition) -> str:
    """A one-line summary for `iotflow rules list`."""
    if rule.kind == "offline":
        text = f"no data for {duration(rule.duration_s)}"
    elif rule.kind == "range":
        low = "-inf" if rule.minimum is None else f"{rule.minimum:g}"
        high = "inf" if rule.maximum is None else f"{rule.maximum:g}"
        text = f"{rule.measurement} outside [{low}, {high}]"
        if rule.hysteresis:
            text += f" (clears {rule.hysteresis:g} inside)"
    else:
        subject = rule.measurement if rule.kind == "threshold" else f"d({rule.measurement})/{rule.rate_unit}"
        if rule.absolute:
            subject = f"|{subject}|"
        text = f"{subject} {rule.condition} {rule.value:g}"
        if rule.clear is not None:
            text += f" (clears at {rule.clear:g})"
    if rule.for_count > 1:
        text += f", {rule.for_count} samples"
    if rule.for_s:
        text += f", for {duration(rule.for_s)}"
    return text
