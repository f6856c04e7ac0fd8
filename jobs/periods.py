"""Time arithmetic of the jobs: UTC buckets, period keys and the CLI's period syntax.

Every bucket and period is aligned in UTC, whatever the machine's time zone, so two
workers on differently configured hosts agree on what "the hour" and "the day" are.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

_SPAN = re.compile(r"^-?(\d+)([hd])$")  # `-7d` as the CLI writes a relative time, or `7d`


def utc_now() -> datetime:
    return datetime.now(UTC)


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def floor_day(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def floor_minutes(moment: datetime, width: int) -> datetime:
    """Start of the `width`-minute slot holding `moment` (slots tile each hour from :00)."""
    moment = moment.astimezone(UTC).replace(second=0, microsecond=0)
    return moment.replace(minute=moment.minute // width * width)


def ceil_hour(moment: datetime) -> datetime:
    floor = floor_hour(moment)
    return floor if floor == moment else floor + HOUR


def steps(start: datetime, end: datetime, width: timedelta) -> Iterator[datetime]:
    """`start`, `start + width`, … while before `end`."""
    moment = start
    while moment < end:
        yield moment
        moment += width


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def parse_time(text: str) -> datetime:
    """ISO-8601 date or date-time; without an offset it is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 time (example: 2026-11-21T10:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def parse_report_period(text: str, now: datetime) -> tuple[datetime, datetime]:
    """`1d`, `7d`, `12h` (or `-7d`): the span ending now; `2026-11-21`: that UTC day."""
    span = _SPAN.match(text)
    if span:
        amount = int(span.group(1))
        if amount <= 0:
            raise ValueError(f"{text!r}: the span must be positive")
        width = DAY if span.group(2) == "d" else HOUR
        return now - amount * width, now
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a span like 1d or 7d nor a date like 2026-11-21") from None
    start = day_start(day)
    return start, start + DAY


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()
