"""Rules for `iotflow bench`: N realistic rules per device that are evaluated but stay quiet.

Each device gets rules on the measurements it reports (its datapoint labels that
already have data, or all of them before any data), cycling through the kinds —
threshold, range, rate — plus one offline rule, with levels no simulated value
reaches, so the bench measures the steady-state cost of evaluation rather than the
cost of an alert storm. `python -m worker.tools.bench.rules` prints the
evaluator's own cost per reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.config import Settings
from worker.decode.codecs import load_codecs
from worker.rules.admin import open_admin
from worker.tools.fleet import F2_SENSORS

_FAR = 1e12  # no simulated value or rate comes near it


def traffic_labels() -> list[str]:
    """The labels the bench's traffic (climate frames) carries, not every label a device has:
    rules on labels that never report would cost nothing and measure nothing."""
    climate = load_codecs()["climate"].units()
    return [f"{label}.{name}" for mode, label, _ in F2_SENSORS if mode == "climate" for name in climate]


def bench_rules(labels: Sequence[str], per_device: int) -> list[dict[str, Any]]:
    """`per_device` rule documents over `labels`; one of them is an offline rule."""
    rules: list[dict[str, Any]] = []
    if per_device <= 0:
        return rules
    rules.append({"id": "bench-offline", "type": "offline", "duration": 3600})
    kinds = ("threshold", "range", "rate", "threshold-low")
    for index in range(per_device - 1):
        if not labels:
            break
        label = labels[index % len(labels)]
        kind = kinds[(index // max(1, len(labels))) % len(kinds)]
        rule: dict[str, Any] = {"id": f"bench-{index}", "field": label}
        if kind == "threshold":
            rule.update(type="threshold", condition=">", value=_FAR, clear=_FAR / 2, for_count=3)
        elif kind == "threshold-low":
            rule.update(type="threshold", condition="<", value=-_FAR)
        elif kind == "range":
            rule.update(type="range", min=-_FAR, max=_FAR, hysteresis=1.0)
        else:
            rule.update(type="rate", condition=">", value=_FAR, per="min", abs=True)
        rules.append(rule)
    return rules


async def install_bench_rules(
    settings: Settings, device_ids: Sequence[int], labels: Sequence[str], per_device: int = 10
) -> int:
    """Give each device `per_device` rules over `labels` (the labels its traffic carries, so
    every rule meets it), replacing its rules; return how many were installed.

    Running workers pick them up at once (the import is announced on Redis).
    """
    async with open_admin(settings) as admin:
        rules = bench_rules(labels, per_device)
        configs = [{"device_id": d, "settings": {"alerts": rules}} for d in device_ids]
        installed, _ = await admin.import_configs(configs)
        return installed


async def remove_bench_rules(settings: Settings, device_ids: Sequence[int]) -> None:
    """Clear the rules `install_bench_rules` gave these devices."""
    async with open_admin(settings) as admin:
        await admin.import_configs(
            [{"device_id": device_id, "settings": {"alerts": []}} for device_id in device_ids]
        )


def measure_evaluator(
    devices: int = 100, per_device: int = 10, readings: int = 300_000, same_measurement: bool = False
) -> float:
    """Microseconds per reading spent in `Evaluator.evaluate`, on simulated climate readings.

    `same_measurement` puts all the rules on the one measurement every reading carries:
    the worst case, ten rules judged per reading instead of a few.
    """
    from datetime import UTC, datetime, timedelta
    from time import perf_counter

    from schemas.records import Reading
    from worker.rules.evaluator import Evaluator
    from worker.rules.model import Scope, parse_rule
    from worker.rules.ruleset import RuleSet

    labels = ["room1.temperature", "room1.humidity", "room1.pressure"]
    rules = [
        parse_rule(raw, Scope("device", device))
        for device in range(devices)
        for raw in bench_rules(labels[:1] if same_measurement else labels, per_device)
    ]
    evaluator = Evaluator(RuleSet(rules))
    start = datetime.now(UTC) - timedelta(days=1)
    stream = [
        Reading(
            start + timedelta(milliseconds=i),
            i % devices,
            1,
            20.0 + (i % 7) * 0.1,
            labels[(i // devices) % 3],
        )
        for i in range(readings)
    ]
    if same_measurement:
        stream = [Reading(r.timestamp, r.device_id, 1, r.value, labels[0]) for r in stream]
    batches = [stream[i : i + 2000] for i in range(0, len(stream), 2000)]
    began = perf_counter()
    for batch in batches:
        evaluator.evaluate(batch)
    return (perf_counter() - began) / readings * 1e6


if __name__ == "__main__":
    for per_device, same in ((0, False), (10, False), (10, True)):
        cost = measure_evaluator(per_device=per_device, same_measurement=same)
        shape = "all on one measurement" if same else "spread over the measurements"
        print(f"{per_device:>2} rules/device, {shape}: {cost:.2f} µs/reading")
