"""Managing rules in the document store: set, delete, import, list — each change announced.

Rules live in `device_configs` documents keyed by scope (`device:{id}`,
`group:{id}`, `global`). A write validates first and stores nothing when a rule
is malformed; after a write the scope key is published on
`{prefix}channel:system:rules`, which makes running workers reload at once.
Concurrent edits of the same scope are last-writer-wins (an operator tool, not a
transactional API).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from worker.config import Settings
from worker.rules.model import Rule, RuleError, Scope, parse_rule, parse_settings, scope_of
from worker.rules.source import ALL, COLLECTION, RuleProblem, parse_configs, rules_channel
from worker.stores import Stores, open_stores

_CONFIG_KEYS = {"_id", "device_id", "group_id", "scope", "user_id", "config_version", "settings"}


class InvalidRules(ValueError):
    """An import was refused; every problem is listed, nothing was stored."""

    def __init__(self, errors: list[RuleError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


@dataclass(slots=True)
class ListedRules:
    rules: list[Rule]
    problems: list[RuleProblem]


class RuleAdmin:
    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self.documents = stores.documents
        self._channel = rules_channel(stores.keys)

    # --- changes ---------------------------------------------------------------------------------

    async def set_rule(self, scope: Scope, raw: Mapping[str, Any]) -> Rule:
        """Add the rule to its scope, or replace the rule with the same id there."""
        rule = parse_rule(raw, scope, "rule")
        doc = await self._config(scope)
        alerts = [entry for entry in _alerts(doc) if _entry_id(entry, scope) != rule.id]
        alerts.append({**raw, "id": rule.id})
        doc["settings"]["alerts"] = alerts
        await self._save(scope, doc)
        return rule

    async def delete_rule(self, scope: Scope, rule_id: str) -> bool:
        doc = await self.documents.get(COLLECTION, scope.key)
        if doc is None:
            return False
        settings = doc.setdefault("settings", {})
        if rule_id.startswith("thresholds."):
            thresholds = settings.get("thresholds") or {}
            if thresholds.pop(rule_id.removeprefix("thresholds."), None) is None:
                return False
            settings["thresholds"] = thresholds
        else:
            alerts = _alerts(doc)
            kept = [entry for entry in alerts if _entry_id(entry, scope) != rule_id]
            if len(kept) == len(alerts):
                return False
            settings["alerts"] = kept
        await self._save(scope, doc)
        return True

    async def import_configs(self, configs: Any, dry_run: bool = False) -> tuple[int, int]:
        """Replace the thresholds and alerts of every scope listed; all valid, or nothing stored.

        `configs`: a list of config documents, or `{"configs": [...]}`. Returns (rules, scopes).
        """
        if isinstance(configs, Mapping) and set(configs) == {"configs"}:
            configs = configs["configs"]
        if not isinstance(configs, list):
            raise InvalidRules([RuleError("configs", "must be a list of device configs")])
        errors: list[RuleError] = []
        parsed: list[tuple[Scope, dict[str, Any], int]] = []
        seen: set[Scope] = set()
        for index, config in enumerate(configs):
            where = f"configs[{index}]"
            try:
                scope = self._import_scope(config, where, seen)
                await self._check_scope(scope, where)
            except RuleError as exc:
                errors.append(exc)
                continue
            settings = config.get("settings")
            rules, problems = parse_settings(settings, scope, f"{where}.settings")
            if problems:
                errors += problems
                continue
            parsed.append((scope, dict(settings or {}), len(rules)))
        if errors:
            raise InvalidRules(errors)
        if not dry_run:
            for scope, settings, _ in parsed:
                doc = await self._config(scope)
                doc["settings"].update(
                    thresholds=settings.get("thresholds") or {}, alerts=settings.get("alerts") or []
                )
                doc["settings"].update(
                    {k: v for k, v in settings.items() if k not in ("thresholds", "alerts")}
                )
                await self._save(scope, doc, announce=False)
            await self.announce("import")
        return sum(count for _, _, count in parsed), len(parsed)

    async def announce(self, what: str) -> None:
        await self.stores.redis.publish(self._channel, what)

    # --- reading ---------------------------------------------------------------------------------

    async def list_rules(self, scope: Scope | None = None) -> ListedRules:
        if scope is None:
            docs = await self.documents.find(COLLECTION, limit=ALL)
        else:
            doc = await self.documents.get(COLLECTION, scope.key)
            docs = [doc] if doc else []
        rules, problems = parse_configs(docs)
        return ListedRules(sorted(rules, key=lambda r: (r.scope, r.id)), problems)

    # --- internals -------------------------------------------------------------------------------

    def _import_scope(self, config: Any, where: str, seen: set[Scope]) -> Scope:
        if not isinstance(config, Mapping):
            raise RuleError(where, "must be an object with device_id, group_id or scope, and settings")
        for key in config:
            if key not in _CONFIG_KEYS:
                raise RuleError(
                    f"{where}.{key}", f"unknown field ({', '.join(sorted(_CONFIG_KEYS - {'_id'}))})"
                )
        try:
            scope = scope_of(config)
        except RuleError as exc:
            raise RuleError(f"{where}.{exc.path}", exc.problem) from None
        if scope in seen:
            raise RuleError(where, f"{scope.key} is listed twice")
        seen.add(scope)
        return scope

    async def _check_scope(self, scope: Scope, where: str = "") -> int | None:
        """The owner's user id; RuleError when the device or group does not exist."""
        if scope.kind == "global":
            return None
        table = "devices" if scope.kind == "device" else "device_groups"
        row = await self.stores.postgres.fetchrow(f"SELECT user_id FROM {table} WHERE id = $1", scope.ref)
        if row is None:
            field = f"{where}.{scope.kind}_id" if where else f"--{scope.kind}"
            raise RuleError(field, f"there is no {scope.kind} {scope.ref}")
        user_id: int | None = row["user_id"]
        return user_id

    async def _config(self, scope: Scope) -> dict[str, Any]:
        doc = await self.documents.get(COLLECTION, scope.key)
        if doc is None:
            user_id = await self._check_scope(scope)
            doc = {"scope": "global"} if scope.kind == "global" else {f"{scope.kind}_id": scope.ref}
            doc.update(user_id=user_id, config_version=0)
        doc.pop("_id", None)
        settings = doc.get("settings")
        doc["settings"] = dict(settings) if isinstance(settings, Mapping) else {}
        return doc

    async def _save(self, scope: Scope, doc: dict[str, Any], announce: bool = True) -> None:
        doc["config_version"] = int(doc.get("config_version") or 0) + 1
        await self.documents.upsert(COLLECTION, scope.key, doc)
        if announce:
            await self.announce(scope.key)


def _alerts(doc: Mapping[str, Any]) -> list[Any]:
    alerts = doc.get("settings", {}).get("alerts") or []
    return list(alerts) if isinstance(alerts, list) else []


def _entry_id(entry: Any, scope: Scope) -> str | None:
    """The id a stored entry goes by: its own, or the one derived from its definition."""
    try:
        return parse_rule(entry, scope).id
    except RuleError:
        return entry.get("id") if isinstance(entry, Mapping) else None


@contextlib.asynccontextmanager
async def open_admin(settings: Settings) -> AsyncIterator[RuleAdmin]:
    """The stores for one CLI command."""
    async with open_stores(settings, application_name="iotflow-admin", pool_size=2) as stores:
        yield RuleAdmin(stores)
