"""Times as people write them: `now`, `-24h` (that long before now), or ISO-8601; the
command line (worker/cli/times.py) and the HTTP API read them the same way."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

EXAMPLES = "now, -24h, -15m, -7d or ISO-8601 like 2026-11-21T10:00Z"

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
RELATIVE = re.compile(r"-(\d+)([smhdw])")


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """The UTC moment `text` names; ValueError with the accepted forms otherwise."""
    now = now or datetime.now(UTC)
    word = text.strip()
    if word.lower() == "now":
        return now
    relative = RELATIVE.fullmatch(word)
    if relative:
        amount, unit = relative.groups()
        return now - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        moment = datetime.fromisoformat(word.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time (use {EXAMPLES})") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
