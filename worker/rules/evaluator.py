"""The evaluator: readings in, alert events out. Pure — no I/O, time from an injected clock.

State lives in one `Tracker` per (rule, device): the debounce counter, the start
of the current breach, the previous sample (rate rules), the active alert, and a
watermark — the newest reading already judged. A reading at or before the
watermark is skipped, which makes a redelivered batch (or late data) harmless: it
can neither fire a second alert nor count twice toward a debounce.

Lifecycle of a value rule: samples that breach are counted; once `for_count`
consecutive ones have been seen and the breach has lasted `for_s`, the alert
fires — once: while it is active, further breaching samples raise nothing. It
resolves on the first sample that passes the all-clear test (the `clear` level or
`hysteresis` margin when given, the threshold itself otherwise). Offline rules
fire from `check_offline`, which the rules actor calls on a timer, and resolve on
the device's next reading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from schemas.records import Reading
from worker.rules import messages
from worker.rules.events import AlertEvent, EventKind, alert_id, parse_time
from worker.rules.model import Rule
from worker.rules.ruleset import RuleSet

log = structlog.get_logger("worker.rules")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Tracker:
    """One rule on one device."""

    __slots__ = (
        "active",
        "active_bound",
        "active_seen",
        "count",
        "device_id",
        "last_ts",
        "plain",
        "prev_ts",
        "prev_value",
        "rule",
        "since",
        "watch_from",
    )

    def __init__(self, rule: Rule, device_id: int, since: datetime) -> None:
        self.rule = rule
        self.plain = rule.kind != "rate"  # judged on the value itself, not on a derivative
        self.device_id = device_id
        self.last_ts: datetime | None = None  # watermark: newest reading judged
        self.count = 0  # consecutive breaching samples
        self.since: datetime | None = None  # first sample of the current breach
        self.prev_ts: datetime | None = None  # rate rules: the previous sample
        self.prev_value = 0.0
        self.active: str | None = None  # id of the active alert
        self.active_bound: float | None = None  # the level the active alert fired on
        self.active_seen: datetime | None = None  # offline: last reading before the alert fired
        self.watch_from = since  # offline: silence is counted from here at the earliest

    def change_rule(self, rule: Rule) -> None:
        """A new definition under the same id: keep the active alert, restart the debounce."""
        self.rule = rule
        self.plain = rule.kind != "rate"
        self.active_bound = None  # the message on resolution names the new level
        self.count = 0
        self.since = None
        self.prev_ts = None


@dataclass(slots=True)
class StoredAlert:
    """The part of an `alerts` document the evaluator needs to pick up where it left off."""

    alert_id: str
    rule_id: str
    device_id: int
    user_id: int | None
    status: str
    alert_type: str
    severity: str
    fired_at: datetime
    resolved_at: datetime | None = None
    last_seen: datetime | None = None

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> StoredAlert:
        details = doc.get("details") or {}
        fired_at = parse_time(doc.get("fired_at")) or parse_time(doc.get("created_at"))
        if fired_at is None:
            raise ValueError(f"alert {doc.get('_id')} has no fired_at")
        return cls(
            alert_id=str(doc["_id"]),
            rule_id=str(doc["rule_id"]),
            device_id=int(doc["device_id"]),
            user_id=doc.get("user_id"),
            status=str(doc.get("status", "active")),
            alert_type=str(doc.get("alert_type", "")),
            severity=str(doc.get("severity", "warning")),
            fired_at=fired_at,
            resolved_at=parse_time(doc.get("resolved_at")),
            last_seen=parse_time(details.get("last_seen")) if isinstance(details, dict) else None,
        )


@dataclass(slots=True)
class _View:
    """One device's trackers, by measurement (filled lazily) and for offline rules."""

    offline: tuple[Tracker, ...]
    by_measurement: dict[str, tuple[Tracker, ...]] = field(default_factory=dict)


class Evaluator:
    def __init__(self, rules: RuleSet, clock: Clock = utc_now) -> None:
        self._rules = rules
        self._clock = clock
        self._rules_since = clock()  # when the rules in force began to apply, for offline baselines
        self._trackers: dict[tuple[str, int], Tracker] = {}
        self._views: dict[int, _View] = {}
        self._users: dict[int, int | None] = {}
        self._last_seen: dict[int, datetime] = {}
        self._broken: set[str] = set()  # rules that raised once; logged once, skipped after

    @property
    def rules(self) -> RuleSet:
        return self._rules

    def active_alerts(self) -> dict[tuple[str, int], str]:
        """(rule uid, device id) → active alert id."""
        return {key: t.active for key, t in self._trackers.items() if t.active is not None}

    # --- the stream --------------------------------------------------------------------------------

    def evaluate(
        self, readings: Sequence[Reading], device_users: Mapping[int, int | None] | None = None
    ) -> list[AlertEvent]:
        """Judge a batch of readings, in order; return the alerts fired and resolved."""
        events: list[AlertEvent] = []
        if device_users:
            self._users.update(device_users)
        views = self._views
        last_seen = self._last_seen
        for reading in readings:
            device_id = reading.device_id
            ts = reading.timestamp
            view = views.get(device_id)
            if view is None:
                view = self._view(device_id)
            seen = last_seen.get(device_id)
            if seen is None or ts > seen:
                last_seen[device_id] = ts
                for tracker in view.offline:
                    # Only data newer than what the device sent before going silent counts.
                    if tracker.active is not None and ts > (tracker.active_seen or ts):
                        events.append(self._back_online(tracker, ts))
            trackers = view.by_measurement.get(reading.label)
            if trackers is None:
                trackers = self._bind(view, device_id, reading.label)
            if not trackers:
                continue
            value = reading.value
            if value != value:  # NaN: neither a breach nor an all-clear
                continue
            for tracker in trackers:
                last = tracker.last_ts
                if last is not None and ts <= last:
                    continue  # already judged: a redelivery or a late reading
                tracker.last_ts = ts
                try:
                    # Inline, because this runs for every rule on every reading: the value
                    # judged (the reading, or its rate of change), then the quiet case — nothing
                    # pending, no breach — which is nearly every sample.
                    if tracker.plain:
                        judged = value
                    else:
                        prev_ts = tracker.prev_ts
                        prev_value = tracker.prev_value
                        tracker.prev_ts = ts
                        tracker.prev_value = value
                        if prev_ts is None:
                            continue
                        rule = tracker.rule
                        judged = (value - prev_value) / (ts - prev_ts).total_seconds() * rule.per_s
                        if rule.absolute:
                            judged = abs(judged)
                    if tracker.active is None and not tracker.count and not tracker.rule.breach(judged):
                        continue
                    event = self._observe(tracker, ts, judged)
                except Exception as exc:  # one broken rule must not stop the others
                    self._quarantine(tracker, exc)
                    continue
                if event is not None:
                    events.append(event)
        return events

    def _observe(self, t: Tracker, ts: datetime, value: float) -> AlertEvent | None:
        """The lifecycle step for a judged value (the reading, or for rate rules its rate)."""
        rule = t.rule
        if t.active is None:
            if rule.breach(value):
                t.count += 1
                if t.since is None:
                    t.since = ts
                if t.count >= rule.for_count and (
                    not rule.for_s or (ts - t.since).total_seconds() >= rule.for_s
                ):
                    return self._fire(t, ts, value)
            elif t.count:
                t.count = 0
                t.since = None
            return None
        if rule.cleared(value):
            return self._resolve(t, ts, value)
        return None

    # --- the timer ---------------------------------------------------------------------------------

    def check_offline(self) -> list[AlertEvent]:
        """Fire offline alerts for devices silent longer than their rules allow.

        Silence is counted from the last reading, but never from before the rule
        started watching the device (`watch_from`): after a restart the broker may
        still hold readings sent while the worker was down, and they are not late.
        """
        if not self._rules.has_offline_rules:
            return []
        now = self._clock()
        events: list[AlertEvent] = []
        for device_id, seen in self._last_seen.items():
            view = self._views.get(device_id) or self._view(device_id)
            for t in view.offline:
                if t.active is not None:
                    continue
                baseline = max(seen, t.watch_from)
                if (now - baseline).total_seconds() >= t.rule.duration_s:
                    went_silent = baseline + timedelta(seconds=t.rule.duration_s)
                    events.append(self._fire_offline(t, seen, went_silent))
        return events

    def hold_offline(self, now: datetime) -> None:
        """Count offline silence from `now` at the earliest, as after a restart: the caller
        was stalled (backpressure) and the readings sent meanwhile have not reached it yet."""
        if now > self._rules_since:
            self._rules_since = now
        for t in self._trackers.values():
            if t.rule.kind == "offline" and now > t.watch_from:
                t.watch_from = now

    # --- rule changes and restarts -----------------------------------------------------------------

    def replace_rules(self, rules: RuleSet) -> list[AlertEvent]:
        """Switch to a new rule set, keeping the state of rules that still apply.

        A changed definition restarts its debounce but keeps its active alert (the
        next reading judges it against the new levels); an alert whose rule is gone,
        disabled, no longer applies to its device or changed kind (an offline alert
        is not judged by values, nor a value alert by silence) is resolved now.
        """
        self._rules = rules
        self._rules_since = self._clock()
        self._views.clear()
        self._broken.clear()
        events: list[AlertEvent] = []
        for key, t in list(self._trackers.items()):
            uid, device_id = key
            rule = rules.rules.get(uid)
            if rule is None or not rules.applies(uid, device_id) or rule.kind != t.rule.kind:
                if t.active is not None:
                    events.append(self._withdraw(uid, device_id, t.active, t.rule.kind, t.rule.severity))
                del self._trackers[key]
            elif rule != t.rule:
                t.change_rule(rule)
        return events

    def restore(
        self,
        alerts: Iterable[StoredAlert],
        last_seen: Mapping[int, datetime] | None = None,
        users: Mapping[int, int | None] | None = None,
    ) -> list[AlertEvent]:
        """Resume from the store after a start: active alerts stay active, judged readings stay judged.

        Resolved alerts only move watermarks forward, so the readings that fired and
        resolved them — redelivered because the crash came before the broker ack —
        cannot fire them again. Returns resolutions for active alerts whose rule is gone.
        """
        if users:
            self._users.update(users)
        for device_id, seen in (last_seen or {}).items():
            if device_id not in self._last_seen or seen > self._last_seen[device_id]:
                self._last_seen[device_id] = seen
        events: list[AlertEvent] = []
        for alert in sorted(alerts, key=lambda a: a.fired_at):
            self._users.setdefault(alert.device_id, alert.user_id)
            rule = self._rules.rules.get(alert.rule_id)
            applies = rule is not None and self._rules.applies(alert.rule_id, alert.device_id)
            if alert.status != "active":
                if rule is not None and applies:
                    t = self._tracker(rule, alert.device_id)
                    _advance(t, alert.resolved_at or alert.fired_at)
                continue
            if rule is None or not applies:
                events.append(
                    self._withdraw(
                        alert.rule_id, alert.device_id, alert.alert_id, alert.alert_type, alert.severity
                    )
                )
                continue
            t = self._tracker(rule, alert.device_id)
            if t.active is not None and t.active != alert.alert_id:
                # Two active alerts for one (rule, device) break the invariant: keep the newest.
                events.append(self._withdraw(rule.uid, alert.device_id, t.active, rule.kind, rule.severity))
            t.active = alert.alert_id
            t.active_seen = alert.last_seen or alert.fired_at
            _advance(t, alert.fired_at)
        return events

    # --- internals ---------------------------------------------------------------------------------

    def _tracker(self, rule: Rule, device_id: int) -> Tracker:
        key = (rule.uid, device_id)
        t = self._trackers.get(key)
        if t is None:
            t = self._trackers[key] = Tracker(rule, device_id, self._rules_since)
        return t

    def _view(self, device_id: int) -> _View:
        view = _View(tuple(self._tracker(r, device_id) for r in self._rules.offline(device_id)))
        self._views[device_id] = view
        return view

    def _bind(self, view: _View, device_id: int, measurement: str) -> tuple[Tracker, ...]:
        rules = self._rules.for_measurement(device_id, measurement)
        trackers = tuple(self._tracker(r, device_id) for r in rules if r.uid not in self._broken)
        view.by_measurement[measurement] = trackers
        return trackers

    def _quarantine(self, tracker: Tracker, exc: Exception) -> None:
        uid = tracker.rule.uid
        if uid not in self._broken:
            log.error("rules.evaluation_failed", rule=uid, device_id=tracker.device_id, error=repr(exc))
            self._broken.add(uid)
            self._views.clear()  # rebind without it

    def _event(
        self, kind: EventKind, t: Tracker, alert: str, at: datetime, message: str, details: dict[str, Any]
    ) -> AlertEvent:
        rule = t.rule
        return AlertEvent(
            kind,
            alert,
            rule.uid,
            t.device_id,
            self._users.get(t.device_id),
            rule.kind,
            rule.severity,
            message,
            at,
            self._clock(),
            details,
        )

    def _fire(self, t: Tracker, ts: datetime, value: float) -> AlertEvent:
        rule = t.rule
        threshold = _bound(rule, value)
        unit = self._rules.unit(rule, t.device_id)
        t.active = alert_id(rule.uid, t.device_id, ts)
        t.active_bound = threshold
        t.count = 0
        t.since = None
        return self._event(
            "fired",
            t,
            t.active,
            ts,
            messages.fired(rule, t.device_id, value, threshold, unit),
            _details(rule, value, threshold, unit),
        )

    def _resolve(self, t: Tracker, ts: datetime, value: float) -> AlertEvent:
        rule = t.rule
        assert t.active is not None
        threshold = t.active_bound if t.active_bound is not None else _bound(rule, value)
        unit = self._rules.unit(rule, t.device_id)
        event = self._event(
            "resolved",
            t,
            t.active,
            ts,
            messages.resolved(rule, t.device_id, value, threshold, unit),
            {**_details(rule, value, threshold, unit), "reason": "value_back"},
        )
        t.active = None
        t.active_bound = None
        return event

    def _fire_offline(self, t: Tracker, seen: datetime, fired_at: datetime) -> AlertEvent:
        t.active = alert_id(t.rule.uid, t.device_id, fired_at)
        t.active_seen = seen
        return self._event(
            "fired",
            t,
            t.active,
            fired_at,
            messages.offline(t.rule, t.device_id, seen),
            {
                "measurement": None,
                "value": round((fired_at - seen).total_seconds(), 3),
                "threshold": t.rule.duration_s,
                "unit": "s",
                "last_seen": seen,
            },
        )

    def _back_online(self, t: Tracker, ts: datetime) -> AlertEvent:
        assert t.active is not None
        event = self._event(
            "resolved",
            t,
            t.active,
            ts,
            messages.online(t.device_id),
            {"measurement": None, "last_seen": ts, "reason": "data_received"},
        )
        t.active = None
        t.active_seen = None
        return event

    def _withdraw(self, uid: str, device_id: int, alert: str, alert_type: str, severity: str) -> AlertEvent:
        now = self._clock()
        return AlertEvent(
            "resolved",
            alert,
            uid,
            device_id,
            self._users.get(device_id),
            alert_type,
            severity,
            messages.withdrawn(uid, device_id),
            now,
            now,
            {"reason": "rule_withdrawn"},
        )


def _advance(t: Tracker, ts: datetime) -> None:
    if t.last_ts is None or ts > t.last_ts:
        t.last_ts = ts


def _bound(rule: Rule, value: float) -> float:
    """The level the value is measured against: the threshold, or the range bound it crossed."""
    if rule.kind == "range":
        if rule.minimum is not None and (rule.maximum is None or value < rule.minimum):
            return rule.minimum
        assert rule.maximum is not None  # a range has min, max or both
        return rule.maximum
    assert rule.value is not None  # threshold and rate rules always have one
    return rule.value


def _details(rule: Rule, value: float, threshold: float, unit: str | None) -> dict[str, Any]:
    details: dict[str, Any] = {
        "measurement": rule.measurement,
        "value": value,
        "threshold": threshold,
        "unit": unit,
    }
    if rule.kind == "range":
        details.update(min=rule.minimum, max=rule.maximum)
    elif rule.kind == "rate":
        details["per"] = rule.rate_unit
    return details
