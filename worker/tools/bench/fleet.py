"""What a larger fleet costs per message, stage by stage, in one process.

`iotflow bench --compare-fleet N` gives the end-to-end ratio, but a flood's CPU per
message also moves with its batch sizes and with whatever else the machine runs. This
bench drives the worker's own stages in-process on prepared messages, in batches of a
fixed size, and times each with `time.process_time()`: decoding (parse, device
resolution), alert rules (the evaluator, 10 rules per device), the PostgreSQL write
(COPY, move, last_seen) and the hot-state write (the Redis script). Fleets alternate
within one process, each met once (unmeasured) before its rounds, as a long-running
daemon has met its fleet. Real PostgreSQL and Redis: the configured ones (a schema and
a key prefix of its own, dropped afterwards) or, with `--embedded`, its own.

    python -m worker.tools.bench.fleet --embedded [--fleets 100,20000] [--messages 60000]

Per message the intake (MQTT) is left out: it costs the same for any fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from schemas.records import AckToken, DecodedBatch, RawMessage
from worker.config import Settings, load_settings
from worker.decode.codecs import load_codecs
from worker.decode.decoder import Decoder
from worker.decode.parse import Limits
from worker.decode.registry import DatapointBudget, DeviceRegistry
from worker.logging import configure_logging
from worker.metrics import Metrics
from worker.rules.evaluator import Evaluator
from worker.rules.model import Scope, parse_definitions
from worker.rules.ruleset import RuleSet
from worker.runtime.garbage import tune_gc
from worker.runtime.mailbox import Mailbox
from worker.sinks.postgres import PostgresTimeseriesWriter
from worker.sinks.redis_state import RedisHotStateWriter
from worker.stores import Stores, open_stores
from worker.stores.migrate import migrate
from worker.tools.bench.rules import bench_rules, traffic_labels
from worker.tools.bench.support import drop_run
from worker.tools.simulate import build_fleet, message_stream, register_fleet

STAGES = ("decode", "rules", "postgres", "hot state")
RULES_PER_DEVICE = 10
# Unmeasured messages per device first, as a long-running daemon has met its fleet: its
# caches hold the device, and its rules' state has seen a reading and a rate.
WARM_PASSES = 2
_YEARS = 86_400 * 3650  # the simulator's timestamps are its own clock's: accept them all


def fleet_messages(fleets: list[int], counts: list[int]) -> list[list[RawMessage]]:
    """Each fleet's climate messages (`counts`, round robin over its devices), every fleet on
    devices of its own: a device in two fleets would meet the second one's readings behind
    the first one's newer ones and judge them "already judged", a cheaper path."""
    codecs = load_codecs()
    now = time.time()
    result = []
    firsts = itertools.accumulate(fleets[:-1], initial=0)  # each fleet after the ones before
    for first, devices, count in zip(firsts, fleets, counts, strict=True):
        stream = message_stream(build_fleet(devices, "climate", first=first), codecs, "climate")
        result.append([
            RawMessage(topic, payload, now, AckToken(0, mid % 65_535 + 1))
            for mid, (topic, payload) in enumerate(itertools.islice(stream, count))
        ])  # fmt: skip
    return result


def _evaluator(device_ids: list[int]) -> Evaluator:
    """10 rules per device, each device's config the same document: one shared table of
    definitions, as `RuleSource` builds it from such configs."""
    definitions, errors = parse_definitions(
        {"alerts": bench_rules(traffic_labels(), RULES_PER_DEVICE)}, "bench"
    )
    assert not errors, errors
    table = {definition.id: definition for definition in definitions}
    return Evaluator(RuleSet(tables={Scope("device", device_id): table for device_id in device_ids}))


class Stages:
    """The worker's stages after the intake, on one set of stores."""

    def __init__(self, stores: Stores, evaluator: Evaluator | None) -> None:
        registry = DeviceRegistry(stores.postgres, stores.redis, stores.keys, False, DatapointBudget(100))
        limits = Limits(max_payload_bytes=65_536, max_future_s=_YEARS, max_age_s=_YEARS)
        self._decoder = Decoder(Mailbox(1), Mailbox(1), load_codecs(), limits, registry, Metrics())
        self._evaluator = evaluator
        self._postgres = PostgresTimeseriesWriter(stores)
        self._hot_state = RedisHotStateWriter(stores.redis, stores.keys)

    async def run(self, messages: list[RawMessage], batch_size: int) -> list[float]:
        """CPU-seconds of each stage over `messages`."""
        spent = [0.0] * len(STAGES)
        for start in range(0, len(messages), batch_size):
            began = time.process_time()
            batch: DecodedBatch = await self._decoder.decode(messages[start : start + batch_size])
            decoded = time.process_time()
            if self._evaluator is not None:
                self._evaluator.evaluate(batch.readings, batch.device_users)
            judged = time.process_time()
            await self._postgres.write(batch)
            written = time.process_time()
            await self._hot_state.write(batch)
            done = time.process_time()
            for index, (t0, t1) in enumerate(
                ((began, decoded), (decoded, judged), (judged, written), (written, done))
            ):
                spent[index] += t1 - t0
        return spent


async def _bench(
    settings: Settings, fleets: list[int], messages: int, batch_size: int, rounds: int, rules: bool
) -> None:
    try:
        await migrate(settings.postgres)
        await register_fleet(settings.postgres, build_fleet(sum(fleets), "climate"))
        async with open_stores(settings) as stores:
            ids = [row["id"] for row in await stores.postgres.fetch("SELECT id FROM devices ORDER BY id")]
            stages = Stages(stores, _evaluator(ids) if rules else None)
            # Every round has messages of its own: a replayed one is "already judged" by the
            # rules and older than the hot state's, a cheaper path than the live one.
            warm = [WARM_PASSES * fleet for fleet in fleets]
            prepared = fleet_messages(fleets, [passes + rounds * messages for passes in warm])
            for index in range(len(fleets)):
                await stages.run(prepared[index][: warm[index]], batch_size)
            tune_gc()
            totals = [[0.0] * len(STAGES) for _ in fleets]
            for round_ in range(1, rounds + 1):
                for index, fleet in enumerate(fleets):
                    await stores.postgres.execute("TRUNCATE decoded_data")
                    first = warm[index] + (round_ - 1) * messages
                    spent = await stages.run(prepared[index][first : first + messages], batch_size)
                    totals[index] = [a + b for a, b in zip(totals[index], spent, strict=True)]
                    print(f"round {round_}, {fleet:>7,} devices: {_line(spent, messages)}", flush=True)
        base = sum(totals[0])
        print(f"\nmean of {rounds} rounds, CPU-s per 100k messages, and against {fleets[0]:,} devices:")
        for fleet, total in zip(fleets, totals, strict=True):
            print(f"{fleet:>7,} devices: {_line([t / rounds for t in total], messages)}  "
                  f"{sum(total) / base:.2f}×")  # fmt: skip
    finally:
        await drop_run(settings)


def _line(spent: list[float], messages: int) -> str:
    per_100k = [s / messages * 100_000 for s in spent]
    stages = "  ".join(f"{name} {cost:.3f}" for name, cost in zip(STAGES, per_100k, strict=True))
    return f"{stages}  total {sum(per_100k):.3f}"


def _in_services(embedded: bool, run: Callable[[], Coroutine[Any, Any, None]], settings: Settings) -> None:
    if not embedded:
        asyncio.run(run())
        return
    from worker.tools.embedded import EmbeddedServices

    with (
        tempfile.TemporaryDirectory(prefix="iotflow-fleet-bench-") as root,
        EmbeddedServices(Path(root), mqtt=False) as services,
    ):
        urls = services.start()
        settings.postgres = replace(settings.postgres, url=urls.postgres_url)
        settings.redis = replace(settings.redis, url=urls.redis_url)
        asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.tools.bench.fleet", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--fleets", default="100,20000", help="fleet sizes, the first the base (default 100,20000)"
    )
    parser.add_argument("--messages", type=int, default=60_000, help="messages per round (3 readings each)")
    parser.add_argument("--batch", type=int, default=1000, help="messages per batch (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per fleet, alternated")
    parser.add_argument("--no-rules", dest="rules", action="store_false", help="leave the rules stage out")
    parser.add_argument("--embedded", action="store_true", help="start an embedded PostgreSQL and Redis")
    args = parser.parse_args(argv)
    configure_logging("warning", "console")
    settings = load_settings()
    stamp = int(time.time())
    settings.postgres = replace(settings.postgres, schema=f"fleet_bench_{stamp}")
    settings.redis = replace(settings.redis, key_prefix=f"fleet-bench:{stamp}:")
    fleets = [int(size) for size in args.fleets.split(",")]
    print(
        f"fleet bench: {args.messages:,} messages × 3 readings per round, batches of {args.batch:,}, "
        f"fleets {', '.join(f'{f:,}' for f in fleets)}, rules {'on' if args.rules else 'off'}",
        flush=True,
    )
    _in_services(
        args.embedded,
        lambda: _bench(settings, fleets, args.messages, args.batch, args.rounds, args.rules),
        settings,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
