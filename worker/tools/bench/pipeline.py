"""`iotflow bench`: end-to-end throughput, CPU, latency and memory, against an honest ceiling.

One run, all separate processes, as in production: publisher processes (simulator
messages, F2 climate frames with three readings each, sent by
worker.tools.bench.publisher), Mosquitto, the worker (`iotflow run`), PostgreSQL and
Redis. Every measurement starts its clock when all publishers are connected and told
to go, and stops at the subscriber's last message (the ceiling) or the worker's last
commit. It measures, in order:

1. the ceiling (worker.tools.bench.ceiling): the leanest QoS 1 subscriber this machine
   allows, fed the same flood;
2. with --first-contact, the fleet's first contact: one message per device, none
   registered beforehand (pipeline.unknown_devices = register), as registrations/s;
3. the worker, floods with rules off, and with 10 alert rules per device when the
   rules package provides them, alternated: messages/s, CPU-seconds per 100k messages
   (utime + stime from /proc, the worker's processes summed), peak RSS (VmHWM), zero
   loss (rows counted in PostgreSQL);
4. one paced run at half the flood rate, for publish→commit latency p50/p99 (from the
   worker's /metrics histogram, as histogram_quantile() would; measured from each
   message's own timestamp);
5. with --processes N, floods of `iotflow run --processes N` alternated with the
   one-process floods: the ratio;
6. with --kafka, the Kafka paths (worker.tools.bench.kafka).

Each run also prints the publishers' own send rate (start to their last PUBACK): where
it is barely above the subscriber's rate, the publishers (or the broker) set the pace.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import redis.asyncio as aioredis

from worker.config import Settings
from worker.logging import configure_logging
from worker.stores.migrate import migrate
from worker.stores.postgres import connect
from worker.tools.bench.support import (
    READINGS_PER_MESSAGE,
    Publishers,
    RunResult,
    bench_services,
    cpu_seconds,
    drop_run,
    mean_cpu,
    mean_rate,
    measure_worker,
    peak_rss_mb,
)
from worker.tools.simulate import build_fleet, register_fleet

LIMITED_BY_PUBLISHERS = 1.15  # publishers sending < 15% faster than the subscriber took: their pace


@dataclass
class CeilingResult:
    received: int
    seconds: float
    cpu_s: float
    peak_rss_mb: float
    publisher_rate: float
    messages: int = field(init=False)

    def __post_init__(self) -> None:
        self.messages = self.received

    @property
    def rate(self) -> float:
        return self.received / self.seconds

    @property
    def cpu_per_100k(self) -> float:
        return self.cpu_s / max(self.received, 1) * 100_000


def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    """PostgreSQL and Redis are the configured ones (or embedded with --embedded); the broker
    is always one of the bench's own (bench_services)."""
    configure_logging("warning", "json")
    with bench_services(settings, args.embedded):
        return _bench(settings, args)


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    stamp = int(time.time())
    settings.postgres = replace(settings.postgres, schema=f"bench_{stamp}")
    settings.redis = replace(settings.redis, key_prefix=f"bench:{stamp}:")
    messages, devices, publishers = args.messages, args.devices, args.publishers
    base_env: dict[str, str] = {}
    if args.first_contact:
        base_env["IOTFLOW_PIPELINE_UNKNOWN_DEVICES"] = "register"

    # --compare-fleet: the same floods from a larger fleet, alternated with these, for the
    # ratio of their CPU per message measured in one run (machines drift between runs).
    large = args.compare_fleet
    registered = max(devices, large)

    async def prepare() -> None:
        await migrate(settings.postgres)
        await register_fleet(
            settings.postgres, [] if args.first_contact else build_fleet(registered, "climate")
        )

    asyncio.run(prepare())
    print(
        f"bench: {messages} messages × {READINGS_PER_MESSAGE} readings, {devices} devices"
        f"{f' (and {large} in the floods marked so)' if large else ''}"
        f"{' (registered on first contact)' if args.first_contact else ''}, {publishers} publisher "
        f"processes, broker {settings.mqtt.url}, {len(os.sched_getaffinity(0))} usable cores shared by all",
        flush=True,
    )
    try:
        ceiling = _measure_ceiling(settings, messages, devices, publishers)
        print(
            "ceiling (asyncio streams + mqtt5 codec, parse only, batched PUBACKs): "
            f"{ceiling.rate:,.0f} msg/s, "
            f"{ceiling.cpu_per_100k:.2f} CPU-s/100k, publishers {ceiling.publisher_rate:,.0f} msg/s",
            flush=True,
        )
        results: list[RunResult] = []
        if args.first_contact:
            first = measure_worker(settings, devices, devices, publishers, "first contact", base_env)
            results.append(first)
            print(f"first contact: {devices} new devices registered at {first.rate:,.0f}/s", flush=True)
        off = {**base_env, "IOTFLOW_RULES_ENABLED": "false"}
        warm = not args.cold
        rules_env = _install_rules(settings) if args.rules else None
        on = {**base_env, **rules_env} if rules_env is not None else None
        configurations = [("rules off", off, 1)] + ([("10 rules", on, 1)] if on is not None else [])
        if args.processes > 1:
            configurations.append((f"{args.processes} procs", off, args.processes))
        one_process = [c for c in configurations if c[2] == 1]
        fleets = {devices: configurations} | ({large: one_process} if large else {})
        # Runs on this kind of machine vary by several percent: alternate the configurations.
        floods: dict[tuple[int, str], list[RunResult]] = {}
        for n in range(1, args.repeat + 1):
            for fleet, fleet_configurations in fleets.items():
                for name, env, processes in fleet_configurations:
                    label = f"flood, {name} #{n}" if fleet == devices else f"{fleet:,} dev, {name} #{n}"
                    run = measure_worker(
                        settings, messages, fleet, publishers, label, env, processes=processes, warm=warm
                    )
                    floods.setdefault((fleet, name), []).append(run)
        floods_off, floods_on = floods[devices, "rules off"], floods.get((devices, "10 rules"), [])
        floods_n = floods.get((devices, f"{args.processes} procs"), [])
        # Latency means little while the broker holds a backlog: measure it at half the flood rate.
        paced = mean_rate(floods_off) / 2
        paced_run = measure_worker(
            settings, messages // 2, devices, publishers, f"{paced:,.0f}/s paced", off, paced, warm=warm
        )
        results += [run for runs in floods.values() for run in runs] + [paced_run]
        _report(results, ceiling)
        print(f"\nworker (rules off) / ceiling, mean flood rates: {mean_rate(floods_off) / ceiling.rate:.0%}")
        print(
            f"CPU-s per 100k messages: worker {mean_cpu(floods_off):.2f} (rules off)"
            + (f", {mean_cpu(floods_on):.2f} (10 rules)" if floods_on else "")
            + f"; ceiling {ceiling.cpu_per_100k:.2f}"
        )
        if floods_on:
            ratio = mean_rate(floods_on) / mean_rate(floods_off)
            print(f"rules on / rules off (mean flood rates): {ratio:.1%}")
        if floods_n:
            ratio = mean_rate(floods_n) / mean_rate(floods_off)
            print(f"{args.processes} processes / 1 process (mean flood rates): {ratio:.2f}×")
        for name, _, _ in one_process if large else []:
            big, small = mean_cpu(floods[large, name]), mean_cpu(floods[devices, name])
            # A short flood on a fast machine can stay under one 10 ms clock tick of CPU.
            fleet_ratio = f"{big / small:.2f}×" if small else "no ratio: the base used under one clock tick"
            print(
                f"CPU-s per 100k messages, {large:,} devices / {devices:,} ({name}): "
                f"{big:.2f} / {small:.2f} = {fleet_ratio}"
            )
        print(f"Redis keys under the run's prefix: {asyncio.run(_count_keys(settings)):,}")
        lost = [r for r in results if r.rows != r.messages * READINGS_PER_MESSAGE]
        if args.kafka:
            from worker.tools.bench.kafka import kafka_bench

            if not kafka_bench(settings, args, floods_off, stamp):
                return 1
        return 1 if lost else 0
    finally:
        asyncio.run(drop_run(settings))


# --- the processes of a run ---------------------------------------------------------------------------


def _measure_ceiling(settings: Settings, messages: int, devices: int, publishers: int) -> CeilingResult:
    command = ["worker.tools.bench.ceiling", settings.mqtt.url, str(messages), "300"]
    command.append(str(settings.mqtt.receive_maximum))
    sub = subprocess.Popen([sys.executable, "-m", *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    pubs = None
    try:
        assert sub.stdout is not None
        if sub.stdout.readline().strip() != b"ready":
            raise RuntimeError("the ceiling subscriber did not start")
        pubs = Publishers(settings, messages, devices, publishers)
        cpu_before = cpu_seconds([sub.pid])
        started = pubs.go()
        publisher_rate = pubs.wait(started)
        line = sub.stdout.readline()
        cpu = cpu_seconds([sub.pid]) - cpu_before
        peak = peak_rss_mb(sub.pid)
        result = orjson.loads(line)
        assert sub.stdin is not None
        sub.stdin.close()  # now it may exit
        sub.wait()
    finally:
        if pubs is not None:
            pubs.kill()
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    if result["received"] < messages:
        print(f"  (the ceiling got {result['received']} of {messages}: the broker dropped some)")
    return CeilingResult(result["received"], result["last"] - started, cpu, peak, publisher_rate)


# --- the stores ---------------------------------------------------------------------------------------


def _install_rules(settings: Settings) -> dict[str, str] | None:
    """Ten rules per device through the rules package, when it is there; env to enable them."""
    try:
        from worker.tools.bench.rules import install_bench_rules, traffic_labels
    except ImportError:
        return None

    async def install() -> None:
        conn = await connect(settings.postgres)
        try:
            ids = [row["id"] for row in await conn.fetch("SELECT id FROM devices ORDER BY id")]
        finally:
            await conn.close()
        await install_bench_rules(settings, ids, traffic_labels(), per_device=10)

    asyncio.run(install())
    return {"IOTFLOW_RULES_ENABLED": "true"}


async def _count_keys(settings: Settings) -> int:
    client = aioredis.Redis.from_url(settings.redis.url)
    try:
        return sum([1 async for _ in client.scan_iter(match=f"{settings.redis.key_prefix}*", count=1000)])
    finally:
        await client.aclose()


# --- the report ---------------------------------------------------------------------------------------


def _report(results: list[RunResult], ceiling: CeilingResult) -> None:
    rows: list[dict[str, Any]] = []
    print()
    print(f"{'run':<25} {'msg/s':>8} {'readings/s':>10} {'CPU-s/100k':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'peak RSS MB':>11} {'of ceiling':>10} {'pub msg/s':>9} {'loss':>5}  limited by")  # fmt: skip
    print(f"{'ceiling':<25} {ceiling.rate:>8,.0f} {'':>10} {ceiling.cpu_per_100k:>10.2f} {'':>8} {'':>8} "
          f"{ceiling.peak_rss_mb:>11.1f} {1:>10.0%} {ceiling.publisher_rate:>9,.0f} {'':>5}  "
          f"{_limit(ceiling.rate, ceiling.publisher_rate)}")  # fmt: skip
    for r in results:
        loss = r.messages * READINGS_PER_MESSAGE - r.rows
        print(
            f"{r.label:<25} {r.rate:>8,.0f} {r.rate * READINGS_PER_MESSAGE:>10,.0f} {r.cpu_per_100k:>10.2f} "
            f"{_latency(r, r.p50_s)} {_latency(r, r.p99_s)} {r.peak_rss_mb:>11.1f} "
            f"{r.rate / ceiling.rate:>10.0%} {r.publisher_rate:>9,.0f} {loss:>5}  "
            f"{'the pace asked' if 'paced' in r.label else _limit(r.rate, r.publisher_rate)}"
        )
        rows.append({**r.__dict__, "rate": r.rate, "cpu_per_100k": r.cpu_per_100k, "loss": loss})
    rows.append(
        {"label": "ceiling", **ceiling.__dict__, "rate": ceiling.rate, "cpu_per_100k": ceiling.cpu_per_100k}
    )
    print("\n" + orjson.dumps(rows).decode())


def _latency(run: RunResult, seconds: float) -> str:
    """Only the paced run's: a flood's is the backlog's age (and its messages were built beforehand)."""
    return f"{seconds * 1000:>8.1f}" if "paced" in run.label else f"{'—':>8}"


def _limit(rate: float, publisher_rate: float) -> str:
    return "publishers/broker" if publisher_rate < rate * LIMITED_BY_PUBLISHERS else "the subscriber"
