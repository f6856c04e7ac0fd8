"""Process metrics, served at /metrics by prometheus_client.

The hot path counts in plain dicts (`Metrics.inc`: intake counts every message, and a
dict update is what that can afford); a custom collector turns them into Prometheus
counter families with HELP and TYPE at scrape time. Latencies and batch sizes are
prometheus_client histograms. Each `Metrics` has its own registry, so several daemons
in one process (the tests) never share a series; it holds the collectors the library's
default registry would (process, platform, GC) and `iotflow_build_info`.

Names follow the Prometheus conventions: counters end in `_total` (the library adds it to
the families below), a unit or the thing counted ends every other name, base units.
Every series is listed in docs/operations.md, and a test holds the two together.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "iotflow"
disable_created_metrics()  # `*_created` series per histogram tell an operator nothing

# name → (help, label names). Counting a name that is not here is a bug: it would not be exported.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "messages_received": ("MQTT (or Kafka) messages taken from the broker", ()),
    "messages_decoded": ("messages decoded into readings or dead letters", ()),
    "messages_committed": ("messages stored by every sink and acknowledged", ()),
    "readings_written": ("readings the time-series store's INSERT added", ()),
    "readings_duplicate": ("readings the time-series store already had (redeliveries)", ()),
    "batches_committed": ("batches committed to every sink", ()),
    "dead_letters": ("messages stored as dead letters, by reason", ("reason",)),
    "dead_letters_truncated": ("dead letters whose topic or reason was capped", ()),
    "sink_errors": ("failed writes to a store (each retried)", ("sink",)),
    "sink_slow": ("periods of pipeline.slow_write_s a write was still pending", ("sink",)),
    "outbox_appended": ("batches put in the outbox of a readings store that was down (both mode)", ("sink",)),
    "outbox_replayed": ("batches replayed from an outbox into the store that returned", ("sink",)),
    "hot_state_skipped": ("batches whose hot state was not written (Redis down): rebuilt later", ()),
    "hot_state_rebuilt": ("latest values rewritten from PostgreSQL after a Redis outage", ()),
    "alerts": ("alert events raised, by kind and severity", ("kind", "severity")),
    "notifications_sent": ("alert notifications a receiver took, by kind of channel", ("channel",)),
    "notifications_failed": ("alert notification attempts that failed (each retried)", ("channel",)),
    "mqtt_connects": ("MQTT sessions established (the first one included)", ()),
    "rate_limited": ("messages over their device's rate limit, dead-lettered", ()),
    "kafka_revocations": ("Kafka intake: partition revocations in a rebalance", ()),
    "kafka_uncommitted_dropped": ("Kafka intake: records dropped at a revocation, for the next owner", ()),
}

# Counters another object keeps, read at scrape time (`Metrics.counted`): name → help.
COUNTED: dict[str, str] = {
    "pipeline_restarts": "pipeline restarts after a crash since start",
}

# name → (help, label names); read at scrape time from `Metrics.gauges` (no labels) or
# `Metrics.labeled_gauges` (a reader per label values).
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mailbox_messages": (
        "messages waiting in a stage's mailbox (decoder full: storage is the bottleneck)",
        ("stage",),
    ),
    "mqtt_buffered_messages": ("messages the MQTT client received that intake has not taken yet", ()),
    "intake_unacknowledged_messages": (
        "messages received and not yet acknowledged (MQTT: at most mqtt.receive_maximum)",
        (),
    ),
    "dead_letters_held": ("dead letters in the table, by reason code (counted every 30 s)", ("reason",)),
    "outbox_backlog_batches": ("batches in the outboxes of readings stores that were down (both mode)", ()),
    "readings_stores_behind": ("readings stores down or behind, their batches in an outbox (both mode)", ()),
    "hot_state_stale": ("1 while Redis hot state misses batches, until it is rebuilt from PostgreSQL", ()),
    "rules_loaded": ("alert rules in force", ()),
    "rules_invalid": ("malformed alert rules, not loaded", ()),
    "alerts_active": ("alerts fired and not resolved", ()),
    "notifications_pending": ("alert notifications in the outbox not delivered yet", ()),
    "notification_channel_failing": ("1 while a notification channel's last attempt failed", ("channel",)),
}

# Publish→commit, from the reading's own timestamp: device clocks and broker backlogs included.
# 10-33% apart from 10 ms to 10 s, where a pipeline's latency lives, so a quantile
# interpolated from them (Prometheus' histogram_quantile, the bench) is close.
_DECADE = (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 6, 8)
LATENCY_BUCKETS_S = (
    *(round(edge * decade, 4) for decade in (0.01, 0.1, 1.0) for edge in _DECADE),
    *(10.0, 30.0, 60.0, 300.0, 3600.0),
)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)
WRITE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Log-spaced buckets, ~5% wide, from 0.1 ms to ~30 min: fine enough for p50/p99.
_BUCKET_BASE = 1.05
_BUCKET_MIN = 1e-4
_LOG_BASE = math.log(_BUCKET_BASE)  # math.log(x, base) is log(x) / log(base): the same figure


class LatencyHistogram:
    """Counts durations in log buckets; quantiles are accurate to a bucket's width (~5%).

    prometheus_client's histograms leave quantiles to the server and take fixed buckets;
    the progress line wants an interval's p99 in-process, so the commit latency is counted
    here and exported as a Prometheus histogram at scrape time."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.total = 0
        self.sum: float = 0.0

    def observe(self, seconds: float, times: int = 1) -> None:
        index = 0 if seconds <= _BUCKET_MIN else int(math.log(seconds / _BUCKET_MIN) / _LOG_BASE) + 1
        self.counts[index] += times
        self.total += times
        self.sum += seconds * times

    def quantile(self, q: float) -> float:
        if not self.total:
            return math.nan
        rank = q * self.total
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return _BUCKET_MIN * _BUCKET_BASE**index  # upper edge of the bucket
        return math.nan  # unreachable: ranks never exceed the total

    def reset(self) -> None:
        self.counts.clear()
        self.total = 0
        self.sum = 0.0

    def snapshot(self) -> LatencyHistogram:
        copy = LatencyHistogram()
        copy.counts, copy.total, copy.sum = Counter(self.counts), self.total, self.sum
        return copy

    def since(self, earlier: LatencyHistogram) -> LatencyHistogram:
        """What was observed after `earlier` (a snapshot of this histogram) was taken."""
        delta = LatencyHistogram()
        delta.counts = self.counts - earlier.counts
        delta.total, delta.sum = self.total - earlier.total, self.sum - earlier.sum
        return delta

    def cumulative(self, bounds: tuple[float, ...]) -> list[tuple[str, float]]:
        """Prometheus `le` buckets from the fine ones (each bound rounded to a fine bucket's edge)."""
        buckets, seen, ordered = [], 0, sorted(self.counts.items())
        position = 0
        for bound in bounds:
            while position < len(ordered) and _BUCKET_MIN * _BUCKET_BASE ** ordered[position][0] <= bound:
                seen += ordered[position][1]
                position += 1
            buckets.append((str(bound), float(seen)))
        buckets.append(("+Inf", float(self.total)))
        return buckets


class Metrics:
    """Counters by name (and labels), counters and gauges read at scrape time, histograms."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()  # totals over all labels, for in-process readers
        self.labeled: dict[str, Counter[tuple[str, ...]]] = {}
        self.counted: dict[str, Callable[[], float]] = {}  # names from COUNTED
        self.gauges: dict[str, Callable[[], float]] = {}  # names from GAUGES
        self.labeled_gauges: dict[str, dict[tuple[str, ...], Callable[[], float]]] = {}
        # Publish→commit since start, per reading: one fine histogram serves the /metrics
        # histogram and the progress line's interval p99 (by difference), so the writer
        # observes each reading once.
        self.commit_latency = LatencyHistogram()
        self.registry = CollectorRegistry(auto_describe=True)
        # The default registry's collectors (process_*, python_info, python_gc_*): they only
        # read this process, so each registry may hold them.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        build = Info(f"{PREFIX}_build", "the running iotflow-worker release", registry=self.registry)
        build.info({"version": _release()})
        self.registry.register(_DictCollector(self))
        self._batch_rows = Histogram(
            f"{PREFIX}_batch_rows",
            "rows (readings and dead letters) per committed batch",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._write_seconds = Histogram(
            f"{PREFIX}_sink_write_seconds",
            "time for a store to take a batch, retries included",
            ["sink"],
            buckets=WRITE_BUCKETS_S,
            registry=self.registry,
        )

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        assert name in COUNTERS, f"metric {name!r} is not in COUNTERS: it would never be exported"
        self.counters[name] += amount
        if labels:
            names = COUNTERS[name][1]
            self.labeled.setdefault(name, Counter())[tuple(labels[n] for n in names)] += amount

    def count(self, name: str, **labels: str) -> int:
        """One series' value: `count("sink_errors", sink="postgres")`; without labels, the total."""
        if not labels:
            return self.counters[name]
        names = COUNTERS[name][1]
        return self.labeled.get(name, Counter())[tuple(labels[n] for n in names)]

    def observe_commit_latency(self, seconds: float, readings: int = 1) -> None:
        self.commit_latency.observe(seconds, readings)

    def observe_batch(self, rows: int) -> None:
        self._batch_rows.observe(rows)

    def observe_write(self, sink: str, seconds: float) -> None:
        self._write_seconds.labels(sink).observe(seconds)

    def render_prometheus(self) -> bytes:
        return generate_latest(self.registry)


class _DictCollector(Collector):
    """The dict counters and the gauges as Prometheus families, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        for name, (doc, label_names) in COUNTERS.items():
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=label_names)
            if label_names:
                for values, count in sorted(metrics.labeled.get(name, Counter()).items()):
                    family.add_metric(list(values), count)
            else:
                family.add_metric([], metrics.counters[name])
            yield family
        for name, read in sorted(metrics.counted.items()):
            yield CounterMetricFamily(f"{PREFIX}_{name}", COUNTED[name], value=read())
        for name, read in sorted(metrics.gauges.items()):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", GAUGES[name][0], value=read())
        for name, readers in sorted(metrics.labeled_gauges.items()):
            doc, label_names = GAUGES[name]
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=label_names)
            for values, read in sorted(readers.items()):
                gauge.add_metric(list(values), read())
            yield gauge
        latency = metrics.commit_latency
        yield HistogramMetricFamily(
            f"{PREFIX}_commit_latency_seconds",
            "device timestamp to commit, per reading (bucket edges within 5% of `le`)",
            buckets=latency.cumulative(LATENCY_BUCKETS_S),
            sum_value=latency.sum,
        )


def _release() -> str:
    """The installed distribution's version; a checkout run without installing has none."""
    try:
        return version("iotflow-worker")
    except PackageNotFoundError:
        return "unknown"
