"""The rules in force, indexed so a reading finds its rules in two dictionary lookups.

Rules are defined per device, per device group or globally. For one device the
effective rules are resolved once and cached: a device rule overrides a group or
global rule with the same id (so a fleet default can be tightened or disabled for
one device), a group rule overrides a global one, and among groups the lowest
group id wins. Evaluation cost therefore depends on the rules that apply to a
(device, measurement) pair, never on how many rules exist in total.

A `RuleSet` is immutable once built; a reload builds a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from worker.rules.model import Rule, Scope


@dataclass(slots=True)
class _Effective:
    """One device's effective rules: by measurement, plus the offline ones."""

    by_measurement: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    offline: tuple[Rule, ...] = ()
    uids: frozenset[str] = frozenset()


class RuleSet:
    def __init__(
        self,
        rules: Iterable[Rule],
        members: Mapping[int, Iterable[int]] | None = None,
        units: Mapping[tuple[int, str], str | None] | None = None,
    ) -> None:
        """`members`: group id → device ids; `units`: (device id, label) → datapoint unit."""
        self.rules: dict[str, Rule] = {}
        self._by_scope: dict[Scope, dict[str, Rule]] = {}
        # A disabled rule stays in its scope's table so it still overrides the wider
        # scopes' rule of the same id (that is how one device opts out of a fleet rule).
        for rule in rules:
            self._by_scope.setdefault(rule.scope, {})[rule.id] = rule
            if rule.enabled:
                self.rules[rule.uid] = rule
        self._groups_of: dict[int, list[int]] = {}
        for group_id, devices in (members or {}).items():
            for device_id in devices:
                self._groups_of.setdefault(device_id, []).append(group_id)
        for groups in self._groups_of.values():
            groups.sort()
        self._units = dict(units or {})
        self._effective: dict[int, _Effective] = {}
        self.has_offline_rules = any(rule.kind == "offline" for rule in self.rules.values())

    def __len__(self) -> int:
        return len(self.rules)

    def for_measurement(self, device_id: int, measurement: str) -> tuple[Rule, ...]:
        return self._device(device_id).by_measurement.get(measurement, ())

    def offline(self, device_id: int) -> tuple[Rule, ...]:
        return self._device(device_id).offline

    def applies(self, rule_uid: str, device_id: int) -> bool:
        return rule_uid in self._device(device_id).uids

    def unit(self, rule: Rule, device_id: int) -> str | None:
        if rule.unit is not None or rule.measurement is None:
            return rule.unit
        return self._units.get((device_id, rule.measurement))

    def _device(self, device_id: int) -> _Effective:
        effective = self._effective.get(device_id)
        if effective is None:
            effective = self._effective[device_id] = self._resolve(device_id)
        return effective

    def _resolve(self, device_id: int) -> _Effective:
        chosen: dict[str, Rule] = {}
        # Widest scope first, so narrower scopes overwrite it; among groups the lowest id wins.
        scopes = [Scope("global")]
        scopes += [Scope("group", g) for g in reversed(self._groups_of.get(device_id, []))]
        scopes.append(Scope("device", device_id))
        for scope in scopes:
            chosen.update(self._by_scope.get(scope, {}))
        by_measurement: dict[str, list[Rule]] = {}
        offline: list[Rule] = []
        for rule in chosen.values():
            if not rule.enabled:
                continue
            if rule.kind == "offline":
                offline.append(rule)
            elif rule.measurement is not None:
                by_measurement.setdefault(rule.measurement, []).append(rule)
        return _Effective(
            {m: tuple(rs) for m, rs in by_measurement.items()},
            tuple(offline),
            frozenset(r.uid for r in chosen.values() if r.enabled),
        )
