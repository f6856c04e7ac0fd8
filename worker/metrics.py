"""Process-wide counters and a latency histogram, rendered as Prometheus text."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

# Log-spaced buckets, ~5% wide, from 0.1 ms to ~30 min: fine enough for p50/p99.
_BUCKET_BASE = 1.05
_BUCKET_MIN = 1e-4


class LatencyHistogram:
    """Counts durations in log buckets; quantiles are accurate to a bucket's width (~5%)."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.total = 0
        self.sum: float = 0.0

    def observe(self, seconds: float, times: int = 1) -> None:
        index = 0 if seconds <= _BUCKET_MIN else int(math.log(seconds / _BUCKET_MIN, _BUCKET_BASE)) + 1
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


class Metrics:
    """Counters by name, gauges read on demand, and the publish→commit latency."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, Callable[[], float]] = {}
        self.commit_latency = LatencyHistogram()  # since start, for /metrics
        self.interval_commit_latency = LatencyHistogram()  # reset by each progress line

    def inc(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def observe_commit_latency(self, seconds: float) -> None:
        self.commit_latency.observe(seconds)
        self.interval_commit_latency.observe(seconds)

    def render_prometheus(self) -> str:
        lines = []
        for name, value in sorted(self.counters.items()):
            lines += [f"# TYPE iotflow_{name}_total counter", f"iotflow_{name}_total {value}"]
        for name, read in sorted(self.gauges.items()):
            lines += [f"# TYPE iotflow_{name} gauge", f"iotflow_{name} {read()}"]
        latency = self.commit_latency
        lines.append("# TYPE iotflow_commit_latency_seconds summary")
        for q in (0.5, 0.9, 0.99):
            lines.append(f'iotflow_commit_latency_seconds{{quantile="{q}"}} {latency.quantile(q)}')
        lines.append(f"iotflow_commit_latency_seconds_sum {latency.sum}")
        lines.append(f"iotflow_commit_latency_seconds_count {latency.total}")
        return "\n".join(lines) + "\n"
