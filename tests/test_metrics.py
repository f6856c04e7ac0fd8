"""/metrics, scraped during a real run: Prometheus text with HELP and TYPE, counters equal to
what was sent, every series in docs/operations.md's list and named by Prometheus' conventions."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from dataclasses import replace
from importlib.metadata import version

import asyncpg
import orjson
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from schemas.records import AckToken, DecodedBatch, RawMessage
from worker.config import Settings
from worker.decode.codecs import load_codecs
from worker.decode.registry import DatapointBudget
from worker.metrics import LatencyHistogram, Metrics
from worker.pipeline import Pipeline
from worker.stores import Stores
from worker.tools.bench.support import histogram_quantile, parse_metrics
from worker.tools.simulate import build_fleet, message_stream, readings_per_message

from .documented_metrics import Series, documented_series
from .helpers import publish, running_daemon, wait_for, wait_for_count


def _scrape(port: int) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


async def test_metrics_count_exactly_what_was_sent(settings: Settings, pg: asyncpg.Connection) -> None:
    settings.http = replace(settings.http, enabled=True, port=0)
    codecs = load_codecs()
    stream = message_stream(build_fleet(8), codecs)
    good = [next(stream) for _ in range(120)]
    readings = sum(readings_per_message(t, p, codecs) for t, p in good)
    bad = [("devices/sim-json-01/telemetry", b"{broken %d" % n) for n in range(7)]
    strangers = [("devices/nobody/telemetry", orjson.dumps({"temperature": n})) for n in range(3)]
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, [*good, *bad, *strangers])
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", readings)
        total = len(good) + len(bad) + len(strangers)

        async def all_committed() -> bool:
            return daemon.metrics.counters["messages_committed"] == total

        await wait_for(all_committed)
        assert daemon.http is not None
        text, samples = await asyncio.to_thread(_scrape, daemon.http.port)

    assert "# HELP iotflow_messages_committed_total" in text
    assert "# TYPE iotflow_commit_latency_seconds histogram" in text

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("iotflow_messages_received_total") == total
    assert value("iotflow_messages_committed_total") == total
    assert value("iotflow_readings_written_total") == readings
    assert value("iotflow_dead_letters_total", reason="bad_json") == len(bad)
    assert value("iotflow_dead_letters_total", reason="unknown_device") == len(strangers)
    batches = value("iotflow_batches_committed_total")
    assert value("iotflow_batch_rows_count") == batches
    assert value("iotflow_batch_rows_sum") == readings + len(bad) + len(strangers)
    assert value("iotflow_commit_latency_seconds_count") == readings
    assert value("iotflow_sink_write_seconds_count", sink="postgres") == batches
    assert value("iotflow_mqtt_connects_total") == 1
    assert value("iotflow_intake_unacknowledged_messages") == 0
    assert value("iotflow_mailbox_messages", stage="decoder") == 0
    assert value("iotflow_pipeline_restarts_total") == 0


def test_the_latency_histogram_serves_buckets_quantiles_and_intervals() -> None:
    latency = LatencyHistogram()
    latency.observe(0.02, 3)
    mark = latency.snapshot()
    latency.observe(0.3, 2)
    latency.observe(40.0)
    buckets = dict(latency.cumulative((0.025, 0.5, 60.0)))
    assert buckets == {"0.025": 3.0, "0.5": 5.0, "60.0": 6.0, "+Inf": 6.0}
    recent = latency.since(mark)
    assert recent.total == 3 and abs(recent.sum - 40.6) < 1e-9
    assert 0.28 < recent.quantile(0.5) < 0.32 and 38 < recent.quantile(0.99) < 42


async def _scrape_after_traffic(settings: Settings) -> str:
    """A running worker's /metrics after good and bad messages, so labelled series exist."""
    settings.http = replace(settings.http, enabled=True, port=0)
    codecs = load_codecs()
    stream = message_stream(build_fleet(4), codecs)
    messages = [next(stream) for _ in range(20)] + [("devices/sim-json-01/telemetry", b"{broken")]
    async with running_daemon(settings) as daemon:
        await publish(settings.mqtt.url, messages)

        async def all_committed() -> bool:
            return daemon.metrics.counters["messages_committed"] == len(messages)

        await wait_for(all_committed)
        assert daemon.http is not None
        text, _ = await asyncio.to_thread(_scrape, daemon.http.port)
        return text


def _exposed(text: str) -> tuple[dict[str, Series], dict[str, str], list[Sample]]:
    """Families as docs/operations.md names them (a counter with its `_total`), their HELP,
    and every sample."""
    families, helps, samples = {}, {}, []
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        families[name] = Series(family.type, frozenset(labels))
        helps[name] = family.documentation
        samples += family.samples
    return families, helps, samples


# Registered only by the both-mode sink; tests/test_both_mode.py scrapes them there. The
# notification gauges only with a channel configured; tests/test_notify.py scrapes them.
BOTH_MODE_ONLY = {"iotflow_outbox_backlog_batches", "iotflow_readings_stores_behind"}
NOTIFY_ONLY = {"iotflow_notifications_pending", "iotflow_notification_channel_failing"}


async def test_every_series_exposed_is_documented_and_every_documented_one_is_exposed(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    families, _, _ = _exposed(await _scrape_after_traffic(settings))
    documented = documented_series()
    undocumented = sorted(set(families) - set(documented))
    assert not undocumented, f"exposed but not in docs/operations.md: {undocumented}"
    missing = sorted(set(documented) - set(families) - BOTH_MODE_ONLY - NOTIFY_ONLY)
    assert not missing, f"in docs/operations.md but not exposed: {missing}"
    for name, series in families.items():
        assert series.type == documented[name].type, name
        if series.labels:  # a labelled family with no sample yet shows no label names
            assert series.labels == documented[name].labels, name


async def test_the_series_follow_the_prometheus_naming_conventions(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """Every breach is listed at once, so one run shows them all."""
    families, helps, samples = _exposed(await _scrape_after_traffic(settings))
    problems = []
    for name, series in families.items():
        if series.type == "counter" and not name.endswith("_total"):
            problems.append(f"{name}: a counter whose name does not end in _total")
        if series.type != "counter" and name.endswith("_total"):
            problems.append(f"{name}: a {series.type} named like a counter")
        if series.type == "summary" or "quantile" in name or "quantile" in series.labels:
            problems.append(f"{name}: a quantile beside the histograms (ask Prometheus for one)")
        if re.search(r"_(ms|milliseconds|minutes|hours|kb|mb|percent)(_|$)", name):
            problems.append(f"{name}: not in a base unit")
        if not helps[name] or helps[name] == name.removeprefix("iotflow_"):
            problems.append(f"{name}: no HELP text")
        problems += [
            f"{name}: label {label!r} is not snake_case"
            for label in series.labels
            if not _SNAKE.fullmatch(label)
        ]
    if families.get("iotflow_pipeline_restarts_total") != Series("counter", frozenset()):
        problems.append("no iotflow_pipeline_restarts_total counter")
    mailboxes = sorted(name for name in families if name.startswith("iotflow_mailbox_"))
    if mailboxes != ["iotflow_mailbox_messages"]:
        problems.append(f"mailbox gauges {mailboxes}: one series, one unit (messages), by stage")
    # The default collectors a Prometheus user expects of a Python process.
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
    ):
        if name not in families:
            problems.append(f"no {name}")
    build = [(sample.labels, sample.value) for sample in samples if sample.name == "iotflow_build_info"]
    if build != [({"version": version("iotflow-worker")}, 1.0)]:
        problems.append(f"iotflow_build_info is {build}")
    assert not problems, "\n".join(problems)


_SNAKE = re.compile(r"[a-z][a-z0-9_]*")


async def test_every_mailbox_gauge_counts_messages_even_where_batches_wait(stores: Stores) -> None:
    metrics = Metrics()
    pipeline = Pipeline(stores, metrics, DatapointBudget(0))
    metrics.labeled_gauges["mailbox_messages"] = pipeline.mailbox_gauges()
    await pipeline.raw.put_some(
        [RawMessage("devices/a/telemetry", b"{}", 0.0, AckToken(0, n)) for n in range(3)]
    )
    for size in (250, 7):  # the writer's mailbox holds decoded batches
        await pipeline.decoded.put(DecodedBatch(messages=size))
    scraped = parse_metrics(metrics.render_prometheus().decode())
    assert scraped['iotflow_mailbox_messages{stage="decoder"}'] == 3
    assert scraped['iotflow_mailbox_messages{stage="writer"}'] == 257


def test_a_quantile_read_from_the_exported_histogram_is_close_to_the_fine_one() -> None:
    """The bench reads its p50/p99 from the histogram /metrics exports, as a dashboard does."""
    metrics = Metrics()
    for step in range(2000):  # 100 to 300 ms, evenly
        metrics.observe_commit_latency(0.1 + 0.2 * step / 2000)
    scraped = parse_metrics(metrics.render_prometheus().decode())
    for q in (0.5, 0.99):
        fine = metrics.commit_latency.quantile(q)
        assert abs(histogram_quantile(q, scraped, "iotflow_commit_latency_seconds") - fine) < 0.1 * fine, q
