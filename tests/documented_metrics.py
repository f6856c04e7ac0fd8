"""The series docs/operations.md lists in its metrics table: the tests hold a running
worker's /metrics and the Grafana dashboard to this one list."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

OPERATIONS = Path(__file__).parent.parent / "docs" / "operations.md"
_ROW = re.compile(r"^\| `(?P<name>[a-z_][a-z0-9_]*)` \| (?P<type>\w+) \|(?P<labels>[^|]*)\| [^|]+ \|$")


@dataclass(frozen=True)
class Series:
    type: str
    labels: frozenset[str]


def documented_series() -> dict[str, Series]:
    """name (counters with their `_total`) → type and label names, from "### Metrics"."""
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split("\n### Metrics\n", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    found = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        row = _ROW.match(line)
        assert row, f"a metrics row not in the form | `name` | type | labels | what |: {line}"
        labels = frozenset(re.findall(r"`([^`]+)`", row["labels"]))
        assert row["name"] not in found, f"{row['name']} is listed twice"
        found[row["name"]] = Series(row["type"], labels)
    assert found, "no metrics table under '### Metrics' in docs/operations.md"
    return found
