"""Loading rules from `device_configs` on PostgreSQL: shared definitions, problems, units, signature."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from schemas.records import Reading
from worker.rules.evaluator import Evaluator
from worker.rules.source import COLLECTION, LoadedRules, RuleSource
from worker.stores import Stores
from worker.stores.documents import PostgresDocumentStore

HOT = {"id": "hot", "type": "threshold", "field": "temperature", "condition": ">", "value": 30}
DRY = {"id": "dry", "type": "range", "field": "humidity", "min": 20, "max": 80}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def _devices(pg: asyncpg.Connection, count: int, units: list[str | None]) -> list[int]:
    """`count` devices, device n with a `temperature` datapoint in `units[n]`."""
    user_id = await pg.fetchval("SELECT id FROM users WHERE username = 'demo'")
    ids = []
    for n in range(count):
        device_id = await pg.fetchval(
            "INSERT INTO devices (device_key, user_id, name) VALUES ($1, $2, $1) RETURNING id",
            f"source-test-{n}",
            user_id,
        )
        await pg.execute(
            "INSERT INTO datapoints (device_id, label, unit) VALUES ($1, 'temperature', $2)",
            device_id,
            units[n],
        )
        ids.append(device_id)
    return ids


async def _load(stores: Stores, configs: dict[str, dict[str, Any]]) -> LoadedRules:
    await PostgresDocumentStore(stores.postgres).upsert_many(COLLECTION, configs)
    loaded = await RuleSource(stores.documents, stores.postgres).load(force=True)
    assert loaded is not None
    return loaded


async def test_configs_that_say_the_same_share_their_rules_and_each_problem_names_its_config(
    stores: Stores, pg: asyncpg.Connection
) -> None:
    a, b, c, odd = await _devices(pg, 4, ["°C", "°C", None, "°F"])
    same = {"alerts": [HOT, DRY]}
    loaded = await _load(
        stores,
        {
            f"device:{a}": {"device_id": a, "settings": same},
            f"device:{b}": {"device_id": b, "settings": same},
            # One good rule, one bad: the good one loads, the bad one is this config's problem.
            f"device:{c}": {"device_id": c, "settings": {"alerts": [HOT, {**DRY, "max": 10}]}},
            f"device:{odd}": {"device_id": odd, "settings": {"alerts": [{**HOT, "value": 90}]}},
        },
    )
    rules = loaded.ruleset
    assert len(rules) == 2 + 2 + 1 + 1
    [(problem_config, problem_path)] = [(p.config, p.path) for p in loaded.problems]
    assert (problem_config, problem_path) == (f"device:{c}", "settings.alerts[1].max")

    def hot(device_id: int) -> Any:
        (applied,) = rules.for_measurement(device_id, "temperature")
        return applied.rule

    assert hot(a) is hot(b) is hot(c)  # one definition for every config that has it
    assert hot(odd) is not hot(a) and hot(odd).value == 90
    assert rules.for_measurement(a, "humidity")[0].rule is rules.for_measurement(b, "humidity")[0].rule
    assert rules.for_measurement(c, "humidity") == ()
    # Units: the usual one, a device's own, and none where its datapoint has none.
    assert [rules.unit(hot(d), d) for d in (a, b, c, odd)] == ["°C", "°C", None, "°F"]

    events = Evaluator(rules).evaluate([Reading(T0, d, 1, 95.0, "temperature") for d in (a, b, odd)])
    assert [(e.rule_id, e.device_id) for e in events] == [
        (f"device:{a}/hot", a),
        (f"device:{b}/hot", b),
        (f"device:{odd}/hot", odd),
    ]


async def test_the_signature_stays_for_the_same_configs_and_moves_with_a_rule(
    stores: Stores, pg: asyncpg.Connection
) -> None:
    (device,) = await _devices(pg, 1, ["°C"])
    configs = {f"device:{device}": {"device_id": device, "settings": {"alerts": [HOT]}}}
    first = await _load(stores, configs)
    assert (await _load(stores, configs)).signature == first.signature
    changed = {f"device:{device}": {"device_id": device, "settings": {"alerts": [{**HOT, "value": 31}]}}}
    assert (await _load(stores, changed)).signature != first.signature
