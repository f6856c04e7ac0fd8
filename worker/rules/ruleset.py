"""The rules in force, indexed so a reading finds its rules in two dictionary lookups.

Rules are defined per device, per device group or globally. For one device the
effective rules are resolved once and cached: a device rule overrides a group or
global rule with the same id (so a fleet default can be tightened or disabled for
one device), a group rule overrides a global one, and among groups the lowest
group id wins. Evaluation cost therefore depends on the rules that apply to a
(device, measurement) pair, never on how many rules exist in total.

Memory does not grow with the rules a fleet repeats: each scope maps to a table of
definitions (id → `Definition`), scopes whose configs say the same share one table
(`RuleSource` builds them so), and a resolution is cached per distinct combination
of a device's own table and its groups, shared by every device with that combination.
That is why a resolved rule names its scope as None for "the device's own config".

A `RuleSet` is immutable once built; a reload builds a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from worker.rules.model import Definition, Rule, Scope

Table = Mapping[str, Definition]  # one scope's rules by id, disabled ones included
GLOBAL = Scope("global")


class Applied(NamedTuple):
    """A definition as it applies to a device, and where it is defined (None: the device's own config)."""

    rule: Definition
    scope: Scope | None

    def uid(self, own: Scope) -> str:
        """Unique across scopes, as `Rule.uid`; `own` is the device's own scope."""
        return f"{(self.scope or own).key}/{self.rule.id}"


@dataclass(slots=True)
class _Effective:
    """The effective rules of the devices that share one own table and one list of groups."""

    by_measurement: dict[str, tuple[Applied, ...]]
    offline: tuple[Applied, ...]
    by_id: dict[str, Applied]


@dataclass(slots=True)
class Units:
    """Datapoint units, for alert messages: per label the unit most of its datapoints have,
    and the (device, label) pairs that differ. Not one entry per datapoint, since a
    fleet's devices mostly share their units."""

    common: dict[str, str]
    other: dict[tuple[int, str], str | None]

    def get(self, device_id: int, label: str) -> str | None:
        key = (device_id, label)
        return self.other[key] if key in self.other else self.common.get(label)


class RuleSet:
    def __init__(
        self,
        rules: Iterable[Rule] = (),
        members: Mapping[int, Iterable[int]] | None = None,
        units: Units | Mapping[tuple[int, str], str | None] | None = None,
        tables: Mapping[Scope, Table] | None = None,
    ) -> None:
        """`rules`: parsed rules; `tables`: scope → its definitions by id, shared between
        scopes (what `RuleSource` loads). `members`: group id → device ids; `units`:
        (device id, label) → datapoint unit."""
        by_scope: dict[Scope, Table] = dict(tables or {})
        own: dict[Scope, dict[str, Definition]] = {}
        # A disabled rule stays in its scope's table so it still overrides the wider
        # scopes' rule of the same id (that is how one device opts out of a fleet rule).
        for rule in rules:
            own.setdefault(rule.scope, {})[rule.id] = rule
        by_scope.update(own)
        self._global: Table = by_scope.get(GLOBAL, {})
        self._groups: dict[int, Table] = {}
        self._devices: dict[int, Table] = {}
        for scope, table in by_scope.items():
            if scope.kind == "group" and scope.ref is not None:
                self._groups[scope.ref] = table
            elif scope.kind == "device" and scope.ref is not None:
                self._devices[scope.ref] = table
        groups_of: dict[int, list[int]] = {}
        for group_id, devices in (members or {}).items():
            for device_id in devices:
                groups_of.setdefault(device_id, []).append(group_id)
        self._groups_of = {device_id: tuple(sorted(groups)) for device_id, groups in groups_of.items()}
        self._units = units if isinstance(units, Units) else Units({}, dict(units or {}))
        self._resolved: dict[tuple[int, tuple[int, ...]], _Effective] = {}
        enabled = {id(table): sum(d.enabled for d in table.values()) for table in by_scope.values()}
        self._size = sum(enabled[id(table)] for table in by_scope.values())
        self.has_offline_rules = any(
            d.enabled and d.kind == "offline" for table in by_scope.values() for d in table.values()
        )

    def __len__(self) -> int:
        """Enabled rules, counted per scope that defines them."""
        return self._size

    def for_measurement(self, device_id: int, measurement: str) -> tuple[Applied, ...]:
        return self._device(device_id).by_measurement.get(measurement, ())

    def offline(self, device_id: int) -> tuple[Applied, ...]:
        return self._device(device_id).offline

    def lookup(self, rule_uid: str, device_id: int) -> Definition | None:
        """The rule `rule_uid` names, if it applies to the device (enabled, not overridden)."""
        scope_key, _, rule_id = rule_uid.rpartition("/")
        applied = self._device(device_id).by_id.get(rule_id)
        if applied is None:
            return None
        key = applied.scope.key if applied.scope is not None else f"device:{device_id}"
        return applied.rule if key == scope_key else None

    def unit(self, rule: Definition, device_id: int) -> str | None:
        if rule.unit is not None or rule.measurement is None:
            return rule.unit
        return self._units.get(device_id, rule.measurement)

    def _device(self, device_id: int) -> _Effective:
        own = self._devices.get(device_id)
        groups = self._groups_of.get(device_id, ())
        key = (0 if own is None else id(own), groups)  # the tables outlive the RuleSet's cache
        effective = self._resolved.get(key)
        if effective is None:
            effective = self._resolved[key] = self._resolve(own, groups)
        return effective

    def _resolve(self, own: Table | None, groups: tuple[int, ...]) -> _Effective:
        chosen: dict[str, Applied] = {}
        # Widest scope first, so narrower scopes overwrite it; among groups the lowest id wins.
        for rule in self._global.values():
            chosen[rule.id] = Applied(rule, GLOBAL)
        for group_id in reversed(groups):
            scope = Scope("group", group_id)
            for rule in self._groups.get(group_id, {}).values():
                chosen[rule.id] = Applied(rule, scope)
        for rule in (own or {}).values():
            chosen[rule.id] = Applied(rule, None)
        by_id = {rule_id: a for rule_id, a in chosen.items() if a.rule.enabled}
        by_measurement: dict[str, list[Applied]] = {}
        offline: list[Applied] = []
        for applied in by_id.values():
            if applied.rule.kind == "offline":
                offline.append(applied)
            elif applied.rule.measurement is not None:
                by_measurement.setdefault(applied.rule.measurement, []).append(applied)
        return _Effective({m: tuple(a) for m, a in by_measurement.items()}, tuple(offline), by_id)
