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

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from worker.rules.model import Definition, Rule, RuleError, Scope, parse_definitions, parse_settings, scope_of
from worker.rules.ruleset import RuleSet, Table, Units
from worker.stores.documents import DocumentStore
from worker.stores.keys import RedisKeys

COLLECTION = "device_configs"
ALL = 10**9  # "no limit" for DocumentStore.find

_MARKER = """
SELECT (SELECT count(*)::text || '/' || coalesce(sum(hashtext(group_id::text || ':' || device_id::text)), 0)
          FROM device_group_members),
       (SELECT count(*) FROM datapoints)
"""


# Units for messages: per label the unit most of its datapoints have (device_id NULL),
# then the datapoints whose unit differs from it (NULL included).
_UNITS = """
WITH counted AS (
    SELECT label, unit, count(*) AS n FROM datapoints
     WHERE label = ANY($1) AND unit IS NOT NULL GROUP BY label, unit
), common AS (
    SELECT DISTINCT ON (label) label, unit FROM counted ORDER BY label, n DESC, unit
)
SELECT NULL::integer AS device_id, label, unit FROM common
UNION ALL
SELECT d.device_id, d.label, d.unit FROM datapoints d JOIN common c USING (label)
 WHERE d.unit IS DISTINCT FROM c.unit
ORDER BY 1 NULLS FIRST, 2
"""


def rules_channel(keys: RedisKeys) -> str:
    """Pub/sub channel announcing rule changes (beside `channel:system:alerts`)."""
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
        digest = hashlib.sha256()
        tables, problems, wanted = await self._tables(digest)
        async with self._pool.acquire() as conn:
            members = await conn.fetch(
                "SELECT group_id, device_id FROM device_group_members ORDER BY group_id, device_id"
            )
            unit_rows = await conn.fetch(_UNITS, sorted(wanted))
        groups: dict[int, list[int]] = {}
        for row in members:
            groups.setdefault(row["group_id"], []).append(row["device_id"])
        units = Units({}, {})
        for row in unit_rows:
            if row["device_id"] is None:
                units.common[row["label"]] = row["unit"]
            else:
                units.other[(row["device_id"], row["label"])] = row["unit"]
        digest.update(orjson.dumps([sorted(groups.items()), [tuple(u) for u in unit_rows]]))
        self._marker = marker
        return LoadedRules(RuleSet(members=groups, units=units, tables=tables), problems, digest.hexdigest())

    async def _tables(self, digest: hashlib._Hash) -> tuple[dict[Scope, Table], list[RuleProblem], set[str]]:
        """Every config's rules as a table per scope, read a page at a time, hashed as read.

        A fleet's configs mostly repeat each other (the same rules on every device of a
        kind): configs with the same settings share one table, parsed once, and equal
        definitions one object, which is what keeps 200,000 device rules small.
        Returns the tables, the problems and the measurements of rules without a unit.
        """
        tables: dict[Scope, Table] = {}
        problems: list[RuleProblem] = []
        parsed: dict[bytes, Table] = {}  # settings as JSON → its table (when it had no problem)
        definitions: dict[Definition, Definition] = {}
        async with contextlib.aclosing(self._documents.scan(COLLECTION)) as docs:
            async for doc in docs:
                key = str(doc.get("_id", "?"))
                settings = doc.pop("settings", None)
                text = orjson.dumps(settings, option=orjson.OPT_SORT_KEYS, default=str)
                digest.update(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS, default=str))
                digest.update(text)
                try:
                    scope = scope_of(doc)
                except RuleError as exc:
                    problems.append(RuleProblem(key, exc.path, exc.problem))
                    continue
                table = parsed.get(text)
                if table is None:
                    rules, errors = parse_definitions(settings, scope.key)
                    table = {rule.id: definitions.setdefault(rule, rule) for rule in rules}
                    if errors:  # not shared: each config reports its own
                        problems.extend(RuleProblem(key, e.path, e.problem) for e in errors)
                    else:
                        parsed[text] = table
                # Two configs for one scope: their rules merge, the later one's winning an id.
                tables[scope] = {**tables[scope], **table} if scope in tables else table
        wanted = {d.measurement for d in definitions if d.measurement and d.unit is None}
        return tables, problems, wanted
