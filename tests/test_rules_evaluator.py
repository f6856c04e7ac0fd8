"""The evaluator on its own: pure, fast, time from a controllable clock."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.records import AlertEvent, Reading
from worker.rules.evaluator import Evaluator, StoredAlert
from worker.rules.events import alert_id
from worker.rules.model import Rule, Scope, parse_rule
from worker.rules.ruleset import RuleSet

T0 = datetime(2025, 1, 1, tzinfo=UTC)
DEVICE = Scope("device", 1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Clock:
    def __init__(self, seconds: float = 0.0) -> None:
        self.now = at(seconds)

    def __call__(self) -> datetime:
        return self.now

    def set(self, seconds: float) -> None:
        self.now = at(seconds)


def rule(scope: Scope = DEVICE, **raw: Any) -> Rule:
    return parse_rule(raw, scope)


def evaluator(
    *rules: Rule, clock: Clock | None = None, members: dict[int, list[int]] | None = None
) -> Evaluator:
    return Evaluator(RuleSet(rules, members), clock or Clock())


def readings(
    values: Iterable[float],
    label: str = "temperature",
    device: int = 1,
    start: float = 0.0,
    step: float = 1.0,
) -> list[Reading]:
    return [Reading(at(start + i * step), device, 7, v, label) for i, v in enumerate(values)]


def kinds(events: list[AlertEvent]) -> list[tuple[str, datetime]]:
    return [(e.kind, e.at) for e in events]


def test_threshold_fires_once_and_resolves_when_the_value_is_back() -> None:
    ev = evaluator(rule(id="hot", type="threshold", field="temperature", condition=">", value=30, unit="°C"))
    events = ev.evaluate(readings([25, 31, 32, 33, 29]), {1: 42})
    assert kinds(events) == [("fired", at(1)), ("resolved", at(4))]
    fired, resolved = events
    assert fired.alert_id == resolved.alert_id == alert_id("device:1/hot", 1, at(1))
    assert fired.message == "temperature on device 1 is 31 °C, above the threshold of 30 °C"
    assert fired.details == {"measurement": "temperature", "value": 31, "threshold": 30, "unit": "°C"}
    assert fired.user_id == 42 and fired.severity == "warning" and fired.alert_type == "threshold"
    assert resolved.message == "temperature on device 1 is back to 29 °C (threshold 30 °C)"


@pytest.mark.parametrize(
    ("condition", "level", "breaching", "fine"),
    [
        (">", 30, 30.5, 30),
        (">=", 30, 30, 29.9),
        ("<", 10, 9.9, 10),
        ("<=", 10, 10, 10.1),
        ("==", 1, 1, 0),
        ("!=", 1, 0, 1),
    ],
)
def test_each_condition_fires_on_its_side_only(
    condition: str, level: float, breaching: float, fine: float
) -> None:
    ev = evaluator(rule(type="threshold", field="temperature", condition=condition, value=level))
    assert ev.evaluate(readings([fine])) == []
    assert kinds(ev.evaluate(readings([breaching, fine], start=1))) == [("fired", at(1)), ("resolved", at(2))]


def test_no_alert_storm_while_a_breach_continues() -> None:
    ev = evaluator(rule(type="threshold", field="temperature", condition=">", value=30))
    events = ev.evaluate(readings([31 + i % 5 for i in range(500)]))
    assert [e.kind for e in events] == ["fired"]
    assert len(ev.active_alerts()) == 1


def test_range_fires_outside_min_max_and_names_the_crossed_bound() -> None:
    ev = evaluator(rule(type="range", field="humidity", min=20, max=80, unit="%"))
    events = ev.evaluate(readings([50, 15, 50, 85, 80], label="humidity"))
    assert kinds(events) == [("fired", at(1)), ("resolved", at(2)), ("fired", at(3)), ("resolved", at(4))]
    assert events[0].message == "humidity on device 1 is 15 %, below the minimum of 20 %"
    assert events[1].message == "humidity on device 1 is back to 50 % (threshold 20 %)"
    assert events[2].message == "humidity on device 1 is 85 %, above the maximum of 80 %"


def test_range_hysteresis_clears_only_inside_the_margin() -> None:
    ev = evaluator(rule(type="range", field="humidity", min=20, max=80, hysteresis=5))
    events = ev.evaluate(readings([81, 79, 76, 75], label="humidity"))
    # 79 and 76 are back in range but within 5 of the bound: still active; 75 is the edge and clears.
    assert kinds(events) == [("fired", at(0)), ("resolved", at(3))]


def test_threshold_hysteresis_edges() -> None:
    ev = evaluator(rule(type="threshold", field="temperature", condition=">", value=30, clear=28))
    events = ev.evaluate(readings([30, 30.1, 29, 28.5, 28, 30, 30.01]))
    # 30 is not above 30; 30.1 fires; 29 and 28.5 are above the clear level; 28 clears; 30 does not refire.
    assert kinds(events) == [("fired", at(1)), ("resolved", at(4)), ("fired", at(6))]


def test_debounce_by_consecutive_samples() -> None:
    ev = evaluator(rule(type="threshold", field="temperature", condition=">", value=30, for_count=3))
    events = ev.evaluate(readings([31, 32, 20, 31, 32, 33, 34]))
    # The run of two is broken by 20; the next run fires on its third sample.
    assert kinds(events) == [("fired", at(5))]
    assert events[0].alert_id.endswith(":1:20250101T000005.000000Z")


def test_debounce_by_breach_duration() -> None:
    ev = evaluator(rule(type="threshold", field="temperature", condition=">", value=30, for_s=60))
    assert ev.evaluate(readings([31, 31, 31], step=29.9)) == []  # 0 … 59.8 s: not yet
    assert kinds(ev.evaluate([Reading(at(60), 1, 7, 31, "temperature")])) == [("fired", at(60))]


def test_debounce_duration_restarts_after_a_good_sample() -> None:
    ev = evaluator(rule(type="threshold", field="temperature", condition=">", value=30, for_s=10))
    assert ev.evaluate(readings([31, 31, 20, 31, 31], step=5)) == []  # breach runs 0–5 s, then 15–20 s
    assert kinds(ev.evaluate([Reading(at(25), 1, 7, 31, "temperature")])) == [("fired", at(25))]


def test_rate_of_change_per_minute_in_either_direction() -> None:
    ev = evaluator(
        rule(type="rate", field="temperature", condition=">", value=2, per="min", abs=True, unit="°C")
    )
    # +0.2 °C in 10 s = 1.2 °C/min; then +0.5 in 10 s = 3 °C/min; then flat; then -1 in 10 s = 6 °C/min.
    events = ev.evaluate(readings([20, 20.2, 20.7, 20.7, 19.7], step=10))
    assert kinds(events) == [("fired", at(20)), ("resolved", at(30)), ("fired", at(40))]
    assert events[0].message == "temperature on device 1 is changing by 3 °C/min, above the limit of 2 °C/min"
    assert math.isclose(events[2].details["value"], 6.0)


def test_rate_without_abs_is_signed() -> None:
    ev = evaluator(rule(type="rate", field="level", condition="<", value=-1, per="s"))
    assert kinds(ev.evaluate(readings([10, 9.5, 7, 7], label="level"))) == [
        ("fired", at(2)),
        ("resolved", at(3)),
    ]


def test_nan_is_neither_a_breach_nor_an_all_clear() -> None:
    ev = evaluator(rule(type="threshold", field="temperature", condition=">", value=30))
    events = ev.evaluate(readings([math.nan, 31, math.nan, 29]))
    assert kinds(events) == [("fired", at(1)), ("resolved", at(3))]


def test_rules_on_one_measurement_judge_from_their_shared_state_once_quiet() -> None:
    # Quiet readings leave the state with the stream (one watermark, one previous sample);
    # the rate that breaches is computed from that shared sample.
    ev = evaluator(
        rule(id="hot", type="threshold", field="temperature", condition=">", value=30, for_count=2),
        rule(id="fast", type="rate", field="temperature", condition=">", value=2, per="min", abs=True),
    )
    quiet = readings([20, 20.1, 20.2, 20.3], step=10)
    assert ev.evaluate(quiet) == []
    fired = ev.evaluate(readings([21.0], start=40))  # +0.7 in 10 s: 4.2 °C/min
    assert [(e.kind, e.rule_id, e.at) for e in fired] == [("fired", "device:1/fast", at(40))]
    assert math.isclose(fired[0].details["value"], 4.2)
    assert ev.evaluate(quiet) == []  # a redelivery of what the stream judged while quiet
    events = ev.evaluate(readings([31, 32, 32], start=50, step=10))
    assert [(e.kind, e.rule_id, e.at) for e in events] == [
        ("fired", "device:1/hot", at(60)),
        ("resolved", "device:1/fast", at(70)),
    ]


def test_a_restored_watermark_holds_back_only_its_own_rule() -> None:
    first, second = (
        rule(id="a", type="threshold", field="temperature", condition=">", value=30),
        rule(id="b", type="threshold", field="temperature", condition=">", value=25),
    )
    batch = readings([31, 20])
    before = evaluator(first, second).evaluate(batch)
    a_fired, a_resolved = (e for e in before if e.rule_id == "device:1/a")
    ev = evaluator(first, second)
    ev.restore([stored(a_fired, "resolved", resolved_at=a_resolved.at)])
    again = ev.evaluate(batch)  # "b" lost its alert with the crash: it judges the batch again
    assert [(e.kind, e.rule_id) for e in again] == [("fired", "device:1/b"), ("resolved", "device:1/b")]
    assert [e.rule_id for e in ev.evaluate(readings([31], start=2))] == ["device:1/a", "device:1/b"]


def test_a_rule_change_keeps_what_quiet_rules_judged() -> None:
    hot = rule(id="hot", type="threshold", field="temperature", condition=">", value=30)
    fast = rule(id="fast", type="rate", field="temperature", condition=">", value=900, per="min", abs=True)
    ev = evaluator(hot, fast)
    batch = readings([31, 20, 20.5])  # "hot" fires and resolves, then both rules are quiet
    assert [e.kind for e in ev.evaluate(batch)] == ["fired", "resolved"]
    cooler = rule(id="hot", type="threshold", field="temperature", condition=">", value=25)
    assert ev.replace_rules(RuleSet([cooler, fast])) == []
    assert ev.evaluate(batch) == []  # redelivered: judged before the change
    (fired,) = ev.evaluate(readings([26], start=3))  # the new level
    assert fired.rule_id == "device:1/hot"
    # The rate from the last sample judged before the change: +19 in 1 s.
    assert [e.rule_id for e in ev.evaluate(readings([45], start=4))] == ["device:1/fast"]


def test_a_rule_benched_while_other_devices_are_quiet_keeps_their_state() -> None:
    fleet = Scope("global")
    flaky = rule(fleet, id="flaky", type="threshold", field="temperature", condition=">", value=30)

    def breach(value: float) -> bool:
        if value > 100:
            raise ArithmeticError("boom")
        return value > 30

    object.__setattr__(flaky, "breach", breach)
    fine = rule(fleet, id="fine", type="threshold", field="temperature", condition=">", value=30)
    ev = evaluator(flaky, fine)
    first = [*readings([20]), *readings([20], device=2)]
    assert ev.evaluate(first) == []
    assert [e.rule_id for e in ev.evaluate(readings([150], start=1))] == ["global/fine"]  # "flaky" raised
    second = readings([35], device=2, start=1)
    assert [(e.rule_id, e.device_id) for e in ev.evaluate(second)] == [("global/fine", 2)]  # benched: skipped
    fixed = rule(fleet, id="flaky", type="threshold", field="temperature", condition=">", value=30)
    assert ev.replace_rules(RuleSet([fixed, fine])) == []
    assert ev.evaluate(first) == []  # both rules had judged it
    # "flaky" was benched before device 2's second reading: back, it judges that one only.
    assert [(e.rule_id, e.device_id) for e in ev.evaluate(second)] == [("global/flaky", 2)]


def test_rules_only_see_their_measurement_and_device() -> None:
    ev = evaluator(rule(type="threshold", field="room1.temperature", condition=">", value=30))
    assert ev.evaluate(readings([99], label="room2.temperature")) == []
    assert ev.evaluate(readings([99], label="room1.temperature", device=2)) == []
    assert len(ev.evaluate(readings([99], label="room1.temperature", start=5))) == 1


def test_a_redelivered_batch_raises_nothing_new() -> None:
    ev = evaluator(rule(type="threshold", field="temperature", condition=">", value=30, for_count=2))
    batch = readings([31, 32, 20, 31])
    assert kinds(ev.evaluate(batch)) == [("fired", at(1)), ("resolved", at(2))]
    assert ev.evaluate(batch) == []
    assert ev.evaluate(batch[:2]) == []  # older readings do not count toward a new debounce either
    assert kinds(ev.evaluate(readings([32], start=4))) == [("fired", at(4))]


def test_alert_ids_are_deterministic_from_the_triggering_reading() -> None:
    def run() -> list[str]:
        ev = evaluator(rule(type="threshold", field="temperature", condition=">", value=30, for_count=2))
        return [e.alert_id for e in ev.evaluate(readings([20, 31, 31, 31]))]

    assert run() == run() == ["device:1/threshold-temperature-gt-30:1:20250101T000002.000000Z"]


def stored(event: AlertEvent, status: str = "active", resolved_at: datetime | None = None) -> StoredAlert:
    return StoredAlert(
        event.alert_id, event.rule_id, event.device_id, event.user_id, status, event.alert_type,
        event.severity, event.at, resolved_at, event.details.get("last_seen"),
    )  # fmt: skip


def test_after_a_restart_an_active_alert_is_not_fired_again_and_resolves_under_its_id() -> None:
    hot = rule(type="threshold", field="temperature", condition=">", value=30)
    (fired,) = evaluator(hot).evaluate(readings([31]))
    ev = evaluator(hot)
    assert ev.restore([stored(fired)]) == []
    assert ev.evaluate(readings([31, 35, 40])) == []  # includes the redelivered triggering reading
    (resolved,) = ev.evaluate(readings([20], start=5))
    assert resolved.kind == "resolved" and resolved.alert_id == fired.alert_id


def test_after_a_restart_resolved_alerts_keep_redelivered_readings_from_refiring() -> None:
    hot = rule(type="threshold", field="temperature", condition=">", value=30)
    batch = readings([31, 20])
    first = evaluator(hot).evaluate(batch)
    ev = evaluator(hot)
    ev.restore([stored(first[0], "resolved", resolved_at=first[1].at)])
    assert ev.evaluate(batch) == []
    assert [e.kind for e in ev.evaluate(readings([31], start=2))] == ["fired"]


def test_restoring_an_alert_whose_rule_is_gone_resolves_it() -> None:
    hot = rule(id="hot", type="threshold", field="temperature", condition=">", value=30)
    (fired,) = evaluator(hot).evaluate(readings([31]))
    ev = evaluator(rule(id="other", type="threshold", field="temperature", condition=">", value=30))
    (withdrawn,) = ev.restore([stored(fired)])
    assert withdrawn.kind == "resolved" and withdrawn.alert_id == fired.alert_id
    assert withdrawn.details["reason"] == "rule_withdrawn"


def test_offline_fires_after_the_duration_of_silence_and_resolves_on_data() -> None:
    clock = Clock(0)
    ev = evaluator(rule(type="offline", duration="5m"), clock=clock)
    ev.evaluate(readings([20], start=10))
    clock.set(309.9)
    assert ev.check_offline() == []
    clock.set(310)
    (fired,) = ev.check_offline()
    assert (fired.kind, fired.at, fired.alert_type) == ("fired", at(310), "offline")
    assert fired.message == "device 1 has sent no data for 5 min (last seen 2025-01-01T00:00:10+00:00)"
    clock.set(900)
    assert ev.check_offline() == []  # still offline: one alert
    assert ev.evaluate(readings([20], start=5)) == []  # a redelivered old reading is not news
    (back,) = ev.evaluate(readings([21], label="humidity", start=901))
    assert (back.kind, back.alert_id, back.at) == ("resolved", fired.alert_id, at(901))


def test_offline_counts_silence_from_the_start_when_the_last_reading_is_older() -> None:
    clock = Clock(1000)
    ev = evaluator(rule(type="offline", duration=300), clock=clock)
    ev.restore([], last_seen={1: at(0)})
    clock.set(1299)
    assert ev.check_offline() == []  # the broker may still hold what was sent while we were down
    clock.set(1300)
    assert kinds(ev.check_offline()) == [("fired", at(1300))]


def test_an_offline_device_stays_offline_across_a_restart() -> None:
    clock = Clock(0)
    offline = rule(type="offline", duration=60)
    first = evaluator(offline, clock=clock)
    first.evaluate(readings([1]))
    clock.set(100)
    (fired,) = first.check_offline()
    ev = evaluator(offline, clock=clock)
    ev.restore([stored(fired)], last_seen={1: at(0)})
    clock.set(1000)
    assert ev.check_offline() == []
    assert [e.kind for e in ev.evaluate(readings([1], start=1001))] == ["resolved"]


def test_device_rules_override_group_and_global_rules_with_the_same_id() -> None:
    fleet = rule(Scope("global"), id="hot", type="threshold", field="temperature", condition=">", value=30)
    group = rule(Scope("group", 9), id="hot", type="threshold", field="temperature", condition=">", value=40)
    opt_out = rule(
        Scope("device", 3),
        id="hot",
        type="threshold",
        field="temperature",
        condition=">",
        value=30,
        enabled=False,
    )
    ev = evaluator(fleet, group, opt_out, members={9: [2]})
    assert [e.rule_id for e in ev.evaluate(readings([35], device=1))] == ["global/hot"]
    assert ev.evaluate(readings([35], device=2)) == []
    assert [e.rule_id for e in ev.evaluate(readings([45], device=2, start=1))] == ["group:9/hot"]
    assert ev.evaluate(readings([99], device=3)) == []


def test_lookup_cost_does_not_depend_on_rules_elsewhere() -> None:
    many = [
        rule(Scope("device", d), id=f"r{i}", type="threshold", field=f"m{i}", condition=">", value=1)
        for d in range(2, 200)
        for i in range(20)
    ]
    mine = rule(type="threshold", field="temperature", condition=">", value=30)
    rules = RuleSet([*many, mine])
    assert [applied.rule for applied in rules.for_measurement(1, "temperature")] == [mine]
    assert rules.for_measurement(1, "m3") == ()


def test_a_changed_rule_keeps_its_alert_and_judges_by_the_new_level() -> None:
    ev = evaluator(rule(id="hot", type="threshold", field="temperature", condition=">", value=30))
    (fired,) = ev.evaluate(readings([35]))
    assert (
        ev.replace_rules(
            RuleSet([rule(id="hot", type="threshold", field="temperature", condition=">", value=40)])
        )
        == []
    )
    (resolved,) = ev.evaluate(readings([35], start=1))
    assert resolved.alert_id == fired.alert_id
    assert "threshold 40" in resolved.message


def test_a_deleted_rule_resolves_its_active_alert() -> None:
    clock = Clock(50)
    ev = evaluator(
        rule(id="hot", type="threshold", field="temperature", condition=">", value=30), clock=clock
    )
    (fired,) = ev.evaluate(readings([35]))
    (withdrawn,) = ev.replace_rules(RuleSet([]))
    assert (withdrawn.kind, withdrawn.alert_id, withdrawn.at) == ("resolved", fired.alert_id, at(50))
    assert ev.evaluate(readings([50], start=1)) == []


def test_a_rule_that_changes_kind_under_the_same_id_withdraws_its_alert() -> None:
    clock = Clock(50)
    ev = evaluator(
        rule(id="watch", type="threshold", field="temperature", condition=">", value=30), clock=clock
    )
    (fired,) = ev.evaluate(readings([35]))
    (withdrawn,) = ev.replace_rules(RuleSet([rule(id="watch", type="offline", duration=60)]))
    assert (withdrawn.kind, withdrawn.alert_id, withdrawn.details) == (
        "resolved",
        fired.alert_id,
        {"reason": "rule_withdrawn"},
    )
    assert ev.active_alerts() == {}
    clock.set(200)  # the offline rule now watches the device, from the change on
    (offline,) = ev.check_offline()
    assert (offline.alert_type, offline.at) == ("offline", at(110))
    (back,) = ev.evaluate(readings([20], start=201))
    assert (back.kind, back.alert_id) == ("resolved", offline.alert_id)


def test_holding_offline_after_a_stall_counts_silence_from_then() -> None:
    clock = Clock(0)
    ev = evaluator(rule(type="offline", duration=60), clock=clock)
    ev.evaluate(readings([20], start=10))
    clock.set(500)  # the actor was stalled: what the device sent meanwhile has not arrived yet
    ev.hold_offline(clock())
    assert ev.check_offline() == []
    ev.evaluate(readings([21], start=400))  # the backlog arrives
    clock.set(559)
    assert ev.check_offline() == []
    clock.set(560)
    assert kinds(ev.check_offline()) == [("fired", at(560))]


def test_a_rule_that_raises_is_skipped_and_the_others_still_fire() -> None:
    broken = rule(id="broken", type="threshold", field="temperature", condition=">", value=30)

    def boom(_: float) -> bool:
        raise ArithmeticError("boom")

    object.__setattr__(broken, "breach", boom)
    ev = evaluator(broken, rule(id="fine", type="threshold", field="temperature", condition=">", value=30))
    assert [e.rule_id for e in ev.evaluate(readings([35, 36]))] == ["device:1/fine"]


def test_a_narrower_rule_taking_over_an_id_withdraws_the_wider_ones_alert() -> None:
    clock = Clock(50)
    fleet = rule(Scope("global"), id="hot", type="threshold", field="temperature", condition=">", value=30)
    ev = evaluator(fleet, clock=clock)
    (fired,) = ev.evaluate(readings([35]))
    assert fired.rule_id == "global/hot"
    mine = rule(id="hot", type="threshold", field="temperature", condition=">", value=40)
    (withdrawn,) = ev.replace_rules(RuleSet([fleet, mine]))
    assert (withdrawn.alert_id, withdrawn.details) == (fired.alert_id, {"reason": "rule_withdrawn"})
    assert ev.active_alerts() == {}
    assert [e.rule_id for e in ev.evaluate(readings([35, 45], start=1))] == ["device:1/hot"]


def test_a_rule_benched_for_raising_keeps_its_alert_until_the_next_rules() -> None:
    flaky = rule(id="flaky", type="threshold", field="temperature", condition=">", value=30)
    ev = evaluator(flaky)
    (fired,) = ev.evaluate(readings([35]))

    def boom(_: float) -> bool:
        raise ArithmeticError("boom")

    object.__setattr__(flaky, "cleared", boom)
    assert ev.evaluate(readings([20, 21], start=1)) == []  # raised once, then skipped
    assert ev.active_count == 1
    fixed = rule(id="flaky", type="threshold", field="temperature", condition=">", value=30)
    assert ev.replace_rules(RuleSet([fixed])) == []
    (resolved,) = ev.evaluate(readings([22], start=3))
    assert (resolved.kind, resolved.alert_id) == ("resolved", fired.alert_id)
    assert ev.active_count == 0


def test_the_active_count_follows_fires_resolutions_and_withdrawals() -> None:
    fleet = rule(Scope("global"), id="hot", type="threshold", field="temperature", condition=">", value=30)
    ev = evaluator(fleet)
    ev.evaluate([*readings([35]), *readings([35], device=2), *readings([35], device=3)])
    assert ev.active_count == len(ev.active_alerts()) == 3
    ev.evaluate(readings([20], device=2, start=1))
    assert ev.active_count == len(ev.active_alerts()) == 2
    assert len(ev.replace_rules(RuleSet([]))) == 2 and ev.active_count == 0
