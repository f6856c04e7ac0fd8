"""The Grafana dashboard only names series /metrics really has, so it cannot rot silently."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import Metrics

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "iotflow-dashboard.json"


def _exposed() -> set[str]:
    metrics = Metrics()
    metrics.inc("sink_errors", sink="postgres")  # labelled families show once they have a series
    metrics.observe_write("postgres", 0.01)
    for name in ("mailbox_raw", "mailbox_decoded", "intake_unacknowledged", "mqtt_buffered"):
        metrics.gauges[name] = lambda: 0.0
    metrics.gauges.update(pipeline_restarts=lambda: 0.0, alerts_active=lambda: 0.0)
    names = set()
    for family in text_string_to_metric_families(metrics.render_prometheus().decode()):
        names.update(sample.name for sample in family.samples)
        names.add(family.name + ("_total" if family.type == "counter" else ""))
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
