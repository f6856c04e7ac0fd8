"""`iotflow rules …` and `iotflow alerts …` against real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from schemas.records import AlertEvent
from worker.config import Settings
from worker.rules.events import alert_id
from worker.sinks.alerts import AlertSink
from worker.stores import Stores

from .conftest import worker_env
from .helpers import Cli

CONFIGS = "SELECT count(*) FROM documents WHERE collection = 'device_configs'"


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(settings, monkeypatch, capsys)


@pytest.fixture
async def device_id(pg: asyncpg.Connection) -> int:
    found: int = await pg.fetchval("SELECT id FROM devices WHERE device_key = 'sim-json-03'")
    return found


async def test_set_list_and_delete_a_rule(cli: Cli, device_id: int, pg: asyncpg.Connection) -> None:
    code, out, _ = await cli(
        "rules", "set", "--device", str(device_id),
        "id=hot", "type=threshold", "field=temperature", "condition=>", "value=30", "clear=28", "for_count=3",
    )  # fmt: skip
    assert code == 0
    assert out.strip() == f"set device:{device_id}/hot: temperature > 30 (clears at 28), 3 samples"
    code, out, _ = await cli(
        "rules", "set", "--global", '{"type": "offline", "duration": "15m", "severity": "critical"}'
    )
    assert code == 0 and "global/offline-900s" in out

    code, out, _ = await cli("rules", "list")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [f"device:{device_id}/hot", "global/offline-900s"]
    assert "no data for 15 min" in lines[1] and "critical" in lines[1]
    code, out, _ = await cli("rules", "list", "--device", str(device_id), "--json")
    (doc,) = orjson.loads(out)
    assert doc["device_id"] == device_id and doc["config_version"] == 1
    assert doc["settings"]["alerts"][0]["value"] == 30

    code, _, err = await cli("rules", "delete", "--device", str(device_id), "nope")
    assert code == 1 and "there is no rule 'nope'" in err
    code, _, _ = await cli("rules", "delete", "--device", str(device_id), "hot")
    assert code == 0
    code, out, _ = await cli("rules", "list", "--device", str(device_id))
    assert out.strip() == "no rules"


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (
            ["type=threshold", "field=temperature", "condition=>>", "value=30"],
            "rule.condition: '>>' is not one of",
        ),
        (
            ["type=threshold", "field=temperature", "condition=>", "value=hot"],
            "rule.value: 'hot' is not a finite number",
        ),
        (["type=range", "field=humidity", "min=50", "max=20"], "rule.max: 20 is not greater than min 50"),
        (["type=offline"], "rule.duration"),
        (["type:threshold"], "'type:threshold' is not key=value"),
    ],
)
async def test_malformed_rules_are_refused_naming_the_field(
    cli: Cli, device_id: int, pg: asyncpg.Connection, words: list[str], message: str
) -> None:
    code, _, err = await cli("rules", "set", "--device", str(device_id), *words)
    assert code == 1
    assert message in err
    assert await pg.fetchval(CONFIGS) == 0


async def test_rules_for_an_unknown_device_are_refused(cli: Cli) -> None:
    code, _, err = await cli("rules", "set", "--device", "99999", "type=offline", "duration=60")
    assert code == 2 and err == "iotflow: rules set: unknown device 99999\n"


async def test_import_is_all_or_nothing_and_lists_every_problem(
    cli: Cli, device_id: int, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(
        orjson.dumps(
            [
                {"device_id": device_id, "settings": {"thresholds": {"temperature": {"min": 10, "max": 30}}}},
                {"device_id": device_id + 100000, "settings": {}},
                {
                    "scope": "global",
                    "settings": {"alerts": [{"type": "rate", "field": "t", "condition": ">"}]},
                },
            ]
        )
    )
    code, _, err = await cli("rules", "import", str(bad))
    assert code == 1
    assert f"configs[1].device_id: there is no device {device_id + 100000}" in err
    assert "configs[2].settings.alerts[0].value: is required" in err
    assert "2 problem(s), nothing imported" in err
    assert await pg.fetchval(CONFIGS) == 0

    good = tmp_path / "rules.toml"
    good.write_text(
        f"""
[[configs]]
device_id = {device_id}
[configs.settings.thresholds.temperature]
min = 10
max = 30
unit = "°C"
[[configs.settings.alerts]]
id = "fast-rise"
type = "rate"
field = "temperature"
condition = ">"
value = 2
per = "min"

[[configs]]
scope = "global"
[[configs.settings.alerts]]
type = "offline"
duration = "5m"
""",
        encoding="utf-8",
    )
    code, out, _ = await cli("rules", "import", str(good), "--dry-run")
    assert (code, out.strip()) == (0, "valid: 3 rule(s) in 2 scope(s)")
    assert await pg.fetchval(CONFIGS) == 0
    code, out, _ = await cli("rules", "import", str(good))
    assert (code, out.strip()) == (0, "imported 3 rule(s) in 2 scope(s)")
    code, out, _ = await cli("rules", "list")
    assert [line.split()[0] for line in out.splitlines()] == [
        f"device:{device_id}/fast-rise", f"device:{device_id}/thresholds.temperature", "global/offline-300s",
    ]  # fmt: skip


async def test_list_and_acknowledge_alerts(
    cli: Cli, settings: Settings, stores: Stores, device_id: int, pg: asyncpg.Connection
) -> None:
    now = datetime.now(UTC)
    alert = alert_id("global/hot", device_id, now)
    sink = AlertSink(stores)
    try:
        fired = AlertEvent(
            "fired", alert, "global/hot", device_id, 1, "threshold", "critical",
            f"temperature on device {device_id} is 45 °C, above the threshold of 40 °C", now, now,
            {"measurement": "temperature", "value": 45.0, "threshold": 40.0, "unit": "°C"},
        )  # fmt: skip
        await sink.write_events([fired])
    finally:
        await sink.close()

    code, out, _ = await cli("alerts", "list", "--active", "--device", str(device_id))
    assert code == 0
    assert out.startswith(f"{alert}  active   -   critical")
    code, out, _ = await cli("alerts", "list", "--device", str(device_id + 1))
    assert out.strip() == "no alerts"

    client = aioredis.Redis.from_url(settings.redis.url)
    pubsub = client.pubsub()
    await pubsub.subscribe(f"{settings.redis.key_prefix}channel:system:alerts")
    try:
        code, out, _ = await cli("alerts", "ack", alert, "--by", "ops")
        assert code == 0 and out.startswith(f"acknowledged {alert} (active)")
        message = None
        for _ in range(100):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message:
                break
        assert message is not None and orjson.loads(message["data"])["event"] == "alert.acknowledged"
    finally:
        await pubsub.aclose()
        await client.aclose()
    code, _, _ = await cli("alerts", "ack", alert)  # again: nothing new
    assert code == 0
    doc = orjson.loads(await pg.fetchval("SELECT doc FROM documents WHERE key = $1", alert))
    assert doc["acknowledged"] is True and doc["acknowledged_by"] == "ops" and doc["status"] == "active"
    logged = await pg.fetch(
        "SELECT doc->>'event_type' AS t FROM documents WHERE collection = 'event_logs' ORDER BY key"
    )
    assert sorted(r["t"] for r in logged) == ["alert.acknowledged", "alert.fired"]
    code, out, _ = await cli("alerts", "list", "--json")
    assert orjson.loads(out)[0]["acknowledged"] is True

    code, _, err = await cli("alerts", "ack", "no-such-alert")
    assert code == 1 and "there is no alert 'no-such-alert'" in err


async def test_the_console_script_runs_the_rules_commands(settings: Settings) -> None:
    process = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker", "rules", "list"],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == "no rules"
