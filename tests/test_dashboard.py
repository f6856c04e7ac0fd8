"""The Grafana dashboard only names series /metrics really has, so it cannot rot silently."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .documented_metrics import documented_series

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "iotflow-dashboard.json"


def _exposed() -> set[str]:
    """The documented series (tests/test_metrics.py holds the list to a running worker's
    /metrics), with a histogram's `_bucket`, `_sum` and `_count`."""
    names = set()
    for name, series in documented_series().items():
        names.add(name)
        if series.type == "histogram":
            names.update(f"{name}_{part}" for part in ("bucket", "sum", "count"))
    return names


def test_every_series_the_dashboard_queries_is_exposed() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\biotflow_[a-z_]+", target["expr"])
    }
    assert queried, "the dashboard queries nothing"
    assert queried <= _exposed(), sorted(queried - _exposed())
