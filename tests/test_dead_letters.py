"""Dead letters are bounded: a fuzzer's 60,000-character topic is not stored in full, twice."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson

from schemas.records import DEAD_LETTER_REASON_CHARS, DEAD_LETTER_TOPIC_CHARS
from worker.config import Settings

from .helpers import publish, running_daemon, wait_for, wait_for_count


async def test_huge_topics_and_reasons_are_capped_with_their_full_length_kept(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    huge_key = "k" * 60_000  # an unknown device: its key is repeated in the reason
    topic = f"devices/{huge_key}/telemetry"
    other = f"devices/{huge_key}x/telemetry"  # the same beyond the cap: still its own dead letter
    payload = orjson.dumps({"temperature": 1.0})
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, [(topic, payload), (other, payload), (topic, payload)])
        await wait_for_count(pg, "SELECT coalesce(sum(occurrences), 0) FROM dead_letters", 3)
        # The rows show before the batch's other sinks finish and the counters move.
        counters = daemon.metrics.counters
        await wait_for(lambda: asyncio.sleep(0, counters["dead_letters"] >= 3))
        truncated = counters["dead_letters_truncated"]
    rows = await pg.fetch(
        "SELECT topic, topic_size, reason, reason_size, occurrences FROM dead_letters ORDER BY topic_size"
    )
    assert [(row["topic_size"], row["occurrences"]) for row in rows] == [(len(topic), 2), (len(other), 1)]
    for row in rows:
        assert len(row["topic"]) == DEAD_LETTER_TOPIC_CHARS
        assert row["reason"].startswith("unknown_device: key kkk")
        assert len(row["reason"]) <= DEAD_LETTER_REASON_CHARS < row["reason_size"]
    assert truncated == 3


async def test_ordinary_dead_letters_keep_everything(settings: Settings, pg: asyncpg.Connection) -> None:
    topic = "devices/nobody/telemetry"
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, [(topic, b"{broken")])
        await wait_for_count(pg, "SELECT count(*) FROM dead_letters", 1)
        assert daemon.metrics.counters["dead_letters_truncated"] == 0
    row = await pg.fetchrow("SELECT topic, topic_size, reason, reason_size FROM dead_letters")
    assert row["topic"] == topic and row["topic_size"] == len(topic)
    assert row["reason_size"] == len(row["reason"]) and row["reason"].startswith("bad_json: ")
