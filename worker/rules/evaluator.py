"""The evaluator: readings in, alert events out. Pure — no I/O, time from an injected clock.

State lives in one `Tracker` per (rule, device) while the rule has something to
remember: the debounce counter, the start of the current breach, the previous sample
(rate rules), the active alert, and a watermark — the newest reading already judged.
A reading at or before the watermark is skipped, which makes a redelivered batch (or
late data) harmless: it can neither fire a second alert nor count twice toward a
debounce.

Lifecycle of a value rule: samples that breach are counted; once `for_count`
consecutive ones have been seen and the breach has lasted `for_s`, the alert
fires — once: while it is active, further breaching samples raise nothing. It
resolves on the first sample that passes the all-clear test (the `clear` level or
`hysteresis` margin when given, the threshold itself otherwise). Offline rules
fire from `check_offline`, which the rules actor calls on a timer, and resolve on
the device's next reading.

A device's rules are grouped by measurement into a `_Stream`. While every rule of a
stream is quiet (no alert, no debounce under way) and has judged the same readings,
their state is one watermark and one previous sample, which the stream holds itself,
with no trackers at all; a reading is judged against the rules' definitions alone,
which all devices share. With a large fleet that is one small object per device and
measurement instead of one tracker per rule (memory), and none of the trackers cold in
the CPU caches to touch (time). The first breach makes the trackers from the shared
state (`expand`); once they are all quiet and level again the stream takes the state
back and drops them (`collapse`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from schemas.records import Reading
from worker.rules import messages
from worker.rules.events import AlertEvent, EventKind, alert_id, parse_time
from worker.rules.model import Definition, Scope
from worker.rules.ruleset import Applied, RuleSet

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
        "scope",
        "since",
        "watch_from",
    )

    def __init__(self, rule: Definition, scope: Scope, device_id: int, since: datetime) -> None:
        self.rule = rule
        self.scope = scope  # where the rule is defined: with `rule.id`, its uid
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

    @property
    def uid(self) -> str:
        return f"{self.scope.key}/{self.rule.id}"

    def change_rule(self, rule: Definition) -> None:
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


class _Stream:
    """The rules on one measurement of one device, and their state: while quiet (no
    trackers), the stream's own two fields; else a tracker per rule, `trackers[i]` for
    `applied[i]`."""

    __slots__ = ("applied", "last_ts", "last_value", "own", "plain", "rates", "trackers")

    def __init__(self, applied: tuple[Applied, ...], own: Scope, rules: _SharedRules) -> None:
        self.own = own  # the device's own scope: its device id, and where its own rules live
        self.last_ts: datetime | None = None  # while quiet: every rule's watermark (None: nothing judged)
        self.last_value = 0.0  # while quiet: the previous sample of its rate rules
        self.trackers: tuple[Tracker, ...] = ()
        self.applied = applied
        self.plain, self.rates = rules.of(applied)

    def expand(self) -> None:
        """Make the trackers from the shared state: from here on each holds its own."""
        if self.trackers:
            return
        device_id = self.own.ref
        assert device_id is not None  # a device's own scope names it
        last_ts, last_value = self.last_ts, self.last_value
        trackers = []
        for applied in self.applied:
            t = Tracker(applied.rule, applied.scope or self.own, device_id, _NEVER)
            t.last_ts = last_ts
            if not t.plain:
                t.prev_ts = last_ts
                t.prev_value = last_value
            trackers.append(t)
        self.trackers = tuple(trackers)

    def collapse(self, ts: datetime, value: float) -> None:
        """Take the state back, and drop the trackers, if every one judged this reading and is quiet."""
        for t in self.trackers:
            if t.active is not None or t.count or t.last_ts != ts:
                return
            if not t.plain and (t.prev_ts != ts or t.prev_value != value):
                return
        self.trackers = ()
        self.last_ts = ts
        self.last_value = value

    def without(self, uid: str, rules: _SharedRules) -> None:
        """The stream with rule `uid` left out (expanded first, so no state is lost)."""
        keep = [i for i, a in enumerate(self.applied) if a.uid(self.own) != uid]
        self.applied = tuple(self.applied[i] for i in keep)
        self.trackers = tuple(self.trackers[i] for i in keep)
        self.plain, self.rates = rules.of(self.applied)


# A value rule's tracker never counts silence: where an offline tracker's watch begins
# does not apply to it.
_NEVER = datetime.min.replace(tzinfo=UTC)


class _SharedRules:
    """One tuple of definitions for every stream with the same rules: 20,000 devices under
    the same ten rules read the same few tuples, which stay in the CPU caches."""

    def __init__(self) -> None:
        # Keyed by the definitions' ids: the tuple keeps them alive, so no id is reused.
        self._tuples: dict[tuple[int, ...], tuple[Definition, ...]] = {}

    def of(self, applied: Iterable[Applied]) -> tuple[tuple[Definition, ...], tuple[Definition, ...]]:
        """The plain rules and the rate rules among these."""
        plain = [a.rule for a in applied if a.rule.kind != "rate"]
        rates = [a.rule for a in applied if a.rule.kind == "rate"]
        return self._share(plain), self._share(rates)

    def _share(self, rules: list[Definition]) -> tuple[Definition, ...]:
        return self._tuples.setdefault(tuple(map(id, rules)), tuple(rules))


@dataclass(slots=True)
class _View:
    """One device's trackers, by measurement (bound at the measurement's first reading) and
    for offline rules: their only home, so a (rule, device) pair never judged costs nothing."""

    own: Scope  # the device's own scope, where the rules of its own config are defined
    offline: tuple[Tracker, ...] = ()
    streams: dict[str, _Stream] = field(default_factory=dict)
    last_seen: datetime | None = None  # the device's newest reading
    down: bool = False  # an offline alert of the device is active

    def trackers(self) -> Iterator[Tracker]:
        yield from self.offline
        for stream in self.streams.values():
            stream.expand()
            yield from stream.trackers

    def recount(self) -> None:
        self.down = any(t.active is not None for t in self.offline)


class Evaluator:
    def __init__(self, rules: RuleSet, clock: Clock = utc_now) -> None:
        self._rules = rules
        self._clock = clock
        self._rules_since = clock()  # when the rules in force began to apply, for offline baselines
        self._views: dict[int, _View] = {}
        self._alerting: set[Tracker] = set()  # the trackers with an active alert
        self._users: dict[int, int | None] = {}
        self._shared = _SharedRules()
        self._broken: set[str] = set()  # rules that raised once; logged once, skipped after
        self._benched: list[Tracker] = []  # their trackers, out of the views until the next rules

    @property
    def rules(self) -> RuleSet:
        return self._rules

    def active_alerts(self) -> dict[tuple[str, int], str]:
        """(rule uid, device id) → active alert id."""
        return {(t.uid, t.device_id): t.active for t in self._alerting if t.active is not None}

    @property
    def active_count(self) -> int:
        return len(self._alerting)

    # --- the stream --------------------------------------------------------------------------------

    def evaluate(
        self, readings: Sequence[Reading], device_users: Mapping[int, int | None] | None = None
    ) -> list[AlertEvent]:
        """Judge a batch of readings, in order; return the alerts fired and resolved."""
        events: list[AlertEvent] = []
        if device_users:
            self._users.update(device_users)
        views = self._views
        device_id: int | None = None
        view = _View(Scope("device", 0))  # replaced at the first reading
        for reading in readings:
            ts = reading.timestamp
            if reading.device_id != device_id:  # a message's readings come together
                device_id = reading.device_id
                view = views.get(device_id) or self._view(device_id)
            seen = view.last_seen
            if seen is None or ts > seen:
                view.last_seen = ts
                if view.down:
                    # Only data newer than what the device sent before going silent counts.
                    for tracker in view.offline:
                        if tracker.active is not None and ts > (tracker.active_seen or ts):
                            events.append(self._back_online(tracker, ts))
                    view.recount()
            stream = view.streams.get(reading.label)
            if stream is None:
                stream = self._bind(view, device_id, reading.label)
            value = reading.value
            if value != value or not stream.applied:  # NaN: neither a breach nor an all-clear
                continue
            if not stream.trackers:  # quiet
                # Inline, because this runs for every reading: nothing pending on any rule
                # and no breach now is nearly every sample.
                last = stream.last_ts
                if last is not None and ts <= last:
                    continue  # already judged: a redelivery or a late reading
                calm = True
                try:
                    for rule in stream.plain:
                        if rule.breach(value):
                            calm = False
                            break
                    else:
                        if stream.rates and last is not None:  # the first sample has no rate yet
                            change = (value - stream.last_value) / (ts - last).total_seconds()
                            for rule in stream.rates:
                                if rule.breach(_rate(rule, change)):
                                    calm = False
                                    break
                except Exception:  # the trackers' path finds the broken rule and benches it
                    calm = False
                if calm:
                    stream.last_ts = ts
                    stream.last_value = value
                    continue
                stream.expand()
            self._judge(stream, ts, value, events)
        return events

    def _judge(self, stream: _Stream, ts: datetime, value: float, events: list[AlertEvent]) -> None:
        """A reading judged by each tracker of the stream on its own state."""
        for tracker in stream.trackers:
            last = tracker.last_ts
            if last is not None and ts <= last:
                continue  # already judged: a redelivery or a late reading
            tracker.last_ts = ts
            try:
                if tracker.plain:
                    judged = value
                else:
                    prev_ts = tracker.prev_ts
                    prev_value = tracker.prev_value
                    tracker.prev_ts = ts
                    tracker.prev_value = value
                    if prev_ts is None:
                        continue
                    judged = _rate(tracker.rule, (value - prev_value) / (ts - prev_ts).total_seconds())
                if tracker.active is None and not tracker.count and not tracker.rule.breach(judged):
                    continue
                event = self._observe(tracker, ts, judged)
            except Exception as exc:  # one broken rule must not stop the others
                self._quarantine(tracker, exc)
                continue
            if event is not None:
                events.append(event)
        stream.collapse(ts, value)

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
        for view in self._views.values():
            seen = view.last_seen
            if seen is None:
                continue
            for t in view.offline:
                if t.active is not None:
                    continue
                baseline = max(seen, t.watch_from)
                if (now - baseline).total_seconds() >= t.rule.duration_s:
                    went_silent = baseline + timedelta(seconds=t.rule.duration_s)
                    events.append(self._fire_offline(t, seen, went_silent))
                    view.down = True
        return events

    def hold_offline(self, now: datetime) -> None:
        """Count offline silence from `now` at the earliest, as after a restart: the caller
        was stalled (backpressure) and the readings sent meanwhile have not reached it yet."""
        if now > self._rules_since:
            self._rules_since = now
        for view in self._views.values():
            for t in view.offline:
                if now > t.watch_from:
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
        self._broken.clear()
        self._shared = _SharedRules()
        views, self._views = self._views, {}
        benched: dict[int, list[Tracker]] = {}
        for t in self._benched:
            benched.setdefault(t.device_id, []).append(t)
        self._benched = []
        events: list[AlertEvent] = []
        for device_id in [*views, *(benched.keys() - views.keys())]:
            view = views.get(device_id)
            old = {t.rule.id: t for t in view.trackers()} if view is not None else {}
            old.update((t.rule.id, t) for t in benched.get(device_id, ()))
            # Rebuild the view: a tracker whose rule still applies under the same uid and kind
            # moves to the new one (`_tracker` takes it out of `old`); what is left is withdrawn.
            new = self._view(device_id, old)
            if view is not None:
                new.last_seen = view.last_seen
                for measurement in view.streams:
                    self._bind(new, device_id, measurement, old)
            for t in old.values():
                if t.active is not None:
                    events.append(self._withdraw(t.uid, device_id, t.active, t.rule.kind, t.rule.severity))
                    self._alerting.discard(t)
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
            view = self._views.get(device_id) or self._view(device_id)
            if view.last_seen is None or seen > view.last_seen:
                view.last_seen = seen
        events: list[AlertEvent] = []
        for alert in sorted(alerts, key=lambda a: a.fired_at):
            self._users.setdefault(alert.device_id, alert.user_id)
            t = self._restored(alert.rule_id, alert.device_id)
            if alert.status != "active":
                if t is not None:
                    _advance(t, alert.resolved_at or alert.fired_at)
                continue
            if t is None:
                events.append(
                    self._withdraw(
                        alert.rule_id, alert.device_id, alert.alert_id, alert.alert_type, alert.severity
                    )
                )
                continue
            if t.active is not None and t.active != alert.alert_id:
                # Two active alerts for one (rule, device) break the invariant: keep the newest.
                events.append(self._withdraw(t.uid, alert.device_id, t.active, t.rule.kind, t.rule.severity))
            t.active = alert.alert_id
            self._alerting.add(t)
            t.active_seen = alert.last_seen or alert.fired_at
            _advance(t, alert.fired_at)
            self._views[alert.device_id].recount()  # `_restored` made the view
        return events

    # --- internals ---------------------------------------------------------------------------------

    def _restored(self, uid: str, device_id: int) -> Tracker | None:
        """The tracker of a stored alert's rule on its device, holding its own state; None if
        the rule no longer applies."""
        rule = self._rules.lookup(uid, device_id)
        if rule is None:
            return None
        view = self._views.get(device_id) or self._view(device_id)
        if rule.kind == "offline":
            trackers = view.offline
        else:
            assert rule.measurement is not None  # value rules always name one
            stream = view.streams.get(rule.measurement) or self._bind(view, device_id, rule.measurement)
            stream.expand()
            trackers = stream.trackers
        return next((t for t in trackers if t.rule.id == rule.id), None)

    def _view(self, device_id: int, old: dict[str, Tracker] | None = None) -> _View:
        """The device's view, its offline trackers made (or taken from `old`, after a rule change)."""
        old = {} if old is None else old
        view = _View(Scope("device", device_id))
        view.offline = tuple(self._tracker(view, a, device_id, old) for a in self._rules.offline(device_id))
        view.recount()
        self._views[device_id] = view
        return view

    def _bind(
        self, view: _View, device_id: int, measurement: str, old: dict[str, Tracker] | None = None
    ) -> _Stream:
        applied = self._rules.for_measurement(device_id, measurement)
        if self._broken:
            applied = tuple(a for a in applied if a.uid(view.own) not in self._broken)
        stream = view.streams[measurement] = _Stream(applied, view.own, self._shared)
        if old:  # after a rule change: the trackers carried over keep their state
            stream.trackers = tuple(self._tracker(view, a, device_id, old) for a in applied)
        return stream

    def _tracker(self, view: _View, applied: Applied, device_id: int, old: dict[str, Tracker]) -> Tracker:
        """A new tracker, or after a rule change the device's old one for the same uid and kind."""
        rule, scope = applied.rule, applied.scope or view.own
        t = old.pop(rule.id, None)
        if t is not None:
            if t.scope == scope and t.rule.kind == rule.kind:
                if rule != t.rule:
                    t.change_rule(rule)
                else:
                    t.rule = rule  # the same definition: let the old rule set go
                return t
            old[rule.id] = t  # another rule under that id now: the old one's alert is withdrawn
        return Tracker(rule, scope, device_id, self._rules_since)

    def _quarantine(self, tracker: Tracker, exc: Exception) -> None:
        """Bench a rule that raised: logged once, its trackers set aside until the next rules."""
        uid = tracker.uid
        if uid in self._broken:
            return
        log.error("rules.evaluation_failed", rule=uid, device_id=tracker.device_id, error=repr(exc))
        self._broken.add(uid)
        for view in self._views.values():
            for stream in view.streams.values():
                if any(a.uid(view.own) == uid for a in stream.applied):
                    stream.expand()
                    self._benched += [t for t in stream.trackers if t.uid == uid]
                    stream.without(uid, self._shared)

    def _event(
        self, kind: EventKind, t: Tracker, alert: str, at: datetime, message: str, details: dict[str, Any]
    ) -> AlertEvent:
        rule = t.rule
        return AlertEvent(
            kind,
            alert,
            t.uid,
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
        t.active = alert_id(t.uid, t.device_id, ts)
        self._alerting.add(t)
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
        self._alerting.discard(t)
        return event

    def _fire_offline(self, t: Tracker, seen: datetime, fired_at: datetime) -> AlertEvent:
        t.active = alert_id(t.uid, t.device_id, fired_at)
        self._alerting.add(t)
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
        self._alerting.discard(t)
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


def _rate(rule: Definition, change_per_s: float) -> float:
    """What a rate rule judges: the change in its unit of time, absolute if it says so."""
    rate = change_per_s * rule.per_s
    return abs(rate) if rule.absolute else rate


def _bound(rule: Definition, value: float) -> float:
    """The level the value is measured against: the threshold, or the range bound it crossed."""
    if rule.kind == "range":
        if rule.minimum is not None and (rule.maximum is None or value < rule.minimum):
            return rule.minimum
        assert rule.maximum is not None  # a range has min, max or both
        return rule.maximum
    assert rule.value is not None  # threshold and rate rules always have one
    return rule.value


def _details(rule: Definition, value: float, threshold: float, unit: str | None) -> dict[str, Any]:
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
