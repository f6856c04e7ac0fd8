"""The times a command line takes: `now`, `-24h` (that long before now), or ISO-8601.

One parser for every time argument (`query --from/--to`, `jobs enqueue --from/--to/--day`),
so that they all read the same:

    now                     the moment the command runs
    -30s  -15m  -24h  -7d  -2w   that long before now
    2026-11-21              midnight UTC
    2026-11-21T10:00Z       with or without an offset; without one it is UTC
"""

from __future__ import annotations

import argparse
from datetime import datetime

from worker.times import EXAMPLES, RELATIVE, parse_time

__all__ = ["EXAMPLES", "attach_relative_times", "parse_time", "time_argument"]


def attach_relative_times(argv: list[str]) -> list[str]:
    """`--from -24h` as `--from=-24h`: argparse takes a word that starts with a minus and is
    not a negative number for an option, so a relative time is attached to the option before
    it. Only words that are exactly a relative time move; no option of ours looks like one."""
    joined: list[str] = []
    for word in argv:
        previous = joined[-1] if joined else ""
        if RELATIVE.fullmatch(word) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={word}"
        else:
            joined.append(word)
    return joined


def time_argument(text: str) -> datetime:
    """`parse_time` as an argparse `type`: a bad time is a usage error (exit 2)."""
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
