"""The `dead_letters` table read and pruned: a selection by reason, topic and time; counts
per reason; one row; the rows a replay takes, in batches; a purge.

The daemon writes the table (worker/sinks/postgres.py); `iotflow deadletters` and the
`iotflow_dead_letters_held` gauge read it here. `reason` holds `code: detail`; the code
is what precedes the first colon. A topic filter is an MQTT filter (`+` one level, `#`
the rest), matched as a regular expression made from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from schemas.records import Reason
from worker.stores.postgres import Connection

# What a replay never takes: a Kafka record that was no message at all, and a message whose
# readings were stored (the row only says which fields were skipped).
NOT_REPLAYED = (Reason.BAD_ENVELOPE.value, Reason.SKIPPED_FIELDS.value)

_CODE = "split_part(reason, ':', 1)"
# Capped rows kept less than the message: the payload, or the topic (older rows have no size).
CAPPED = (
    "(payload_size > octet_length(payload) OR coalesce(topic_size, char_length(topic)) > char_length(topic))"
)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command means; every part optional."""

    reason: str | None = None  # a reason code
    topic: str | None = None  # an MQTT topic filter
    since: datetime | None = None  # last seen at or after

    def where(self, first: int = 1) -> tuple[str, list[Any]]:
        """A WHERE clause (without the word) and its arguments, numbered from `$first`."""
        clauses: list[str] = ["true"]
        args: list[Any] = []
        if self.reason is not None:
            args.append(self.reason)
            clauses.append(f"{_CODE} = ${first + len(args) - 1}")
        if self.topic is not None:
            args.append(topic_pattern(self.topic))
            clauses.append(f"topic ~ ${first + len(args) - 1}")
        if self.since is not None:
            args.append(self.since)
            clauses.append(f"last_received_at >= ${first + len(args) - 1}")
        return " AND ".join(clauses), args


def topic_pattern(topic_filter: str) -> str:
    """The regular expression of an MQTT topic filter: `devices/+/telemetry`, `tele/#`."""
    levels = []
    for level in topic_filter.split("/"):
        if level == "+":
            levels.append("[^/]*")
        elif level == "#":
            levels.append(".*")
        else:
            levels.append(re.escape(level))
    pattern = "/".join(levels)
    if pattern.endswith("/.*"):  # `a/#` matches `a` too, as MQTT says
        pattern = pattern[: -len("/.*")] + "(/.*)?"
    return f"^{pattern}$"


async def counts_by_reason(conn: Connection, selection: Selection = Selection()) -> dict[str, int]:
    """Dead letters held (rows, not deliveries) per reason code, most first."""
    where, args = selection.where()
    rows = await conn.fetch(
        f"SELECT {_CODE} AS code, count(*) AS n FROM dead_letters WHERE {where} "
        "GROUP BY 1 ORDER BY 2 DESC, 1",
        *args,
    )
    return {row["code"]: row["n"] for row in rows}


async def list_dead_letters(conn: Connection, selection: Selection, limit: int) -> list[dict[str, Any]]:
    """The newest (by last receipt) `limit` rows of the selection, with a payload preview."""
    where, args = selection.where()
    rows = await conn.fetch(
        f"SELECT id, topic, {_CODE} AS code, reason, received_at, last_received_at, occurrences, "
        f"payload_size, substring(payload FROM 1 FOR 64) AS head, {CAPPED} AS capped "
        f"FROM dead_letters WHERE {where} ORDER BY last_received_at DESC, id DESC LIMIT ${len(args) + 1}",
        *args,
        limit,
    )
    return [dict(row) for row in rows]


async def get_dead_letter(conn: Connection, letter_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"SELECT id, topic, topic_size, {_CODE} AS code, reason, received_at, last_received_at, "
        f"occurrences, payload, payload_size, {CAPPED} AS capped FROM dead_letters WHERE id = $1",
        letter_id,
    )
    return dict(row) if row is not None else None


async def purge(conn: Connection, before: datetime, reason: str | None = None) -> dict[str, int]:
    """Delete the dead letters last seen before `before` (of one reason code); the count per code."""
    args: list[Any] = [before]
    extra = ""
    if reason is not None:
        args.append(reason)
        extra = f" AND {_CODE} = $2"
    rows = await conn.fetch(
        f"WITH gone AS (DELETE FROM dead_letters WHERE last_received_at < $1{extra} RETURNING reason) "
        f"SELECT split_part(reason, ':', 1) AS code, count(*) AS n FROM gone GROUP BY 1 ORDER BY 2 DESC, 1",
        *args,
    )
    return {row["code"]: row["n"] for row in rows}


# --- replay ------------------------------------------------------------------------------------------


async def replay_bounds(conn: Connection, selection: Selection) -> tuple[int, int, int]:
    """(highest id, rows to replay, capped rows) of the selection now: a replay goes up to
    that id, so what the daemon adds meanwhile is left for the next one."""
    where, args = selection.where()
    row = await conn.fetchrow(
        f"SELECT coalesce(max(id), 0) AS top, count(*) FILTER (WHERE NOT {CAPPED}) AS replayable, "
        f"count(*) FILTER (WHERE {CAPPED}) AS capped FROM dead_letters "
        f"WHERE {where} AND {_CODE} <> ALL(${len(args) + 1}::text[])",
        *args,
        list(NOT_REPLAYED),
    )
    assert row is not None
    return row["top"], row["replayable"], row["capped"]


async def replay_batch(
    conn: Connection, selection: Selection, after: int, top: int, limit: int
) -> list[dict[str, Any]]:
    """The next `limit` rows by id in (`after`, `top`], capped ones flagged (never replayed)."""
    where, args = selection.where()
    n = len(args)
    rows = await conn.fetch(
        f"SELECT id, topic, payload, {_CODE} AS code, received_at, {CAPPED} AS capped FROM dead_letters "
        f"WHERE {where} AND {_CODE} <> ALL(${n + 1}::text[]) AND id > ${n + 2} AND id <= ${n + 3} "
        f"ORDER BY id LIMIT ${n + 4}",
        *args,
        list(NOT_REPLAYED),
        after,
        top,
        limit,
    )
    return [dict(row) for row in rows]


# In the transaction that stores a batch's readings: the dead letters that became readings
# leave, those still rejected take their new reason (first/last seen and occurrences stay).
RESOLVE = "DELETE FROM dead_letters WHERE id = ANY($1::bigint[])"
RE_REASON = """
UPDATE dead_letters SET reason = u.reason, reason_size = u.size
FROM unnest($1::bigint[], $2::text[], $3::int[]) AS u(id, reason, size)
WHERE dead_letters.id = u.id
"""


async def settle(conn: Connection, resolved: list[int], rejected: list[tuple[int, str, int]]) -> None:
    """Apply a replayed batch's outcome (on `conn`, inside the caller's transaction)."""
    if resolved:
        await conn.execute(RESOLVE, sorted(resolved))
    if rejected:
        rejected = sorted(rejected)  # one lock order for concurrent replays
        await conn.execute(RE_REASON, *(list(column) for column in zip(*rejected, strict=True)))
