"""/metrics, scraped during a real run: Prometheus text with HELP and TYPE, counters equal to what was sent."""

from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import replace

import asyncpg
import orjson
from prometheus_client.parser import text_string_to_metric_families

from worker.config import Settings
from worker.decode.codecs import load_codecs
from worker.metrics import LatencyHistogram
from worker.tools.simulate import build_fleet, message_stream, readings_per_message

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
        assert daemon.health is not None
        text, samples = await asyncio.to_thread(_scrape, daemon.health.port)

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
    assert value("iotflow_intake_unacknowledged") == 0
    assert value("iotflow_mailbox_raw") == 0


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
