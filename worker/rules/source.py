"""Where rules come from: `device_configs` documents, group membership and datapoint units.

Change detection, so a reload costs little when nothing changed: with the
PostgreSQL document backend one query compares a marker (count and newest
`updated_at` of the configs, a checksum of group membership, the datapoint
count) with the previous one, and the rules are fetched only when it moved.
With MongoDB the configs are fetched every period and compared by content.

`iotflow rules …` publishes on `{prefix}channel:system:rules` after each change;
the rules actor reloads on that message, so the period only matters for edits
made behind the CLI's back (or a missed message while Redis was away).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from worker.rules.model import Rule, RuleError, parse_settings, scope_of
from worker.rules.ruleset import RuleSet
from worker.stores.documents import DocumentStore
from worker.stores.keys import RedisKeys

COLLECTION = "device_configs"
ALL = 10**9  # "no limit" for DocumentStore.find

_MARKER = """
SELECT (SELECT count(*)::text || '/' || coalesce(sum(hashtext(group_id::text || ':' || device_id::text)), 0)
          FROM device_group_members),
       (SELECT count(*) FROM datapoints)
"""


def rules_channel(keys: RedisKeys) -> str:
    """Pub/sub channel announcing rule changes (extends SPEC §6's `channel:system:*`)."""
    return f"{keys.prefix}channel:system:rules"


@dataclass(slots=True)
class RuleProblem:
    """A rule that was not loaded, and why."""

    config: str  # the config document's key
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.config}: {self.path}: {self.problem}"


@dataclass(slots=True)
class LoadedRules:
    ruleset: RuleSet
    problems: list[RuleProblem] = field(default_factory=list)
    signature: str = ""  # content hash, to skip rebuilding state when nothing changed


def parse_configs(docs: list[dict[str, Any]]) -> tuple[list[Rule], list[RuleProblem]]:
    """Every rule of every config document; malformed rules become problems, the rest load."""
    rules: list[Rule] = []
    problems: list[RuleProblem] = []
    for doc in docs:
        key = str(doc.get("_id", "?"))
        try:
            scope = scope_of(doc)
        except RuleError as exc:
            problems.append(RuleProblem(key, exc.path, exc.problem))
            continue
        parsed, errors = parse_settings(doc.get("settings"), scope)
        rules.extend(parsed)
        problems.extend(RuleProblem(key, e.path, e.problem) for e in errors)
    return rules, problems


class RuleSource:
    def __init__(self, documents: DocumentStore, pool: asyncpg.Pool) -> None:
        self._documents = documents
        self._pool = pool
        self._marker: tuple[Any, ...] | None = None

    async def configs(self) -> list[dict[str, Any]]:
        return await self._documents.find(COLLECTION, limit=ALL)

    async def load(self, force: bool = False) -> LoadedRules | None:
        """The current rules, or None when the marker says nothing changed since the last load."""
        marker = None
        configs_marker = await self._documents.change_marker(COLLECTION)
        if configs_marker is not None:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(_MARKER)
            marker = (configs_marker, *row) if row is not None else None
            if not force and marker == self._marker:
                return None
        docs = await self.configs()
        async with self._pool.acquire() as conn:
            members = await conn.fetch("SELECT group_id, device_id FROM device_group_members")
            rules, problems = parse_configs(docs)
            wanted = sorted({r.measurement for r in rules if r.measurement and r.unit is None})
            units = await conn.fetch(
                "SELECT device_id, label, unit FROM datapoints WHERE unit IS NOT NULL AND label = ANY($1)",
                wanted,
            )
        groups: dict[int, list[int]] = {}
        for row in members:
            groups.setdefault(row["group_id"], []).append(row["device_id"])
        signature = hashlib.sha256(
            orjson.dumps(
                [docs, sorted(groups.items()), [tuple(u) for u in units]],
                option=orjson.OPT_SORT_KEYS,
                default=str,
            )
        ).hexdigest()
        self._marker = marker
        ruleset = RuleSet(rules, groups, {(u["device_id"], u["label"]): u["unit"] for u in units})
        return LoadedRules(ruleset, problems, signature)
