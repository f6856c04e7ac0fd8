"""The `iotflow` command: run, migrate, simulate, demo, bench, and the rules/alerts/jobs tools.

Each sub-command is a parser plus a handler `(settings, args) -> exit code`;
feature packages add theirs through `add_commands(commands)`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

import orjson

from worker.config import ConfigError, Settings, load_settings
from worker.logging import configure_logging

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    from jobs.cli import add_commands as add_jobs_commands
    from worker.rules.cli import add_commands as add_rules_commands

    parser = argparse.ArgumentParser(prog="iotflow", description="IoTFlow worker")
    parser.add_argument("--config", type=Path, help="TOML settings file (IOTFLOW_* variables win)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", help="run the daemon").set_defaults(handler=_run)
    commands.add_parser("migrate", help="apply schemas and seed metadata to PostgreSQL").set_defaults(
        handler=_migrate
    )
    commands.add_parser("config", help="print the effective settings (secrets included)").set_defaults(
        handler=_print_config
    )

    sim = commands.add_parser("simulate", help="publish simulated F2 and JSON device telemetry")
    sim.add_argument("--devices", type=int, default=8, help="number of devices (default 8)")
    sim.add_argument("--rate", type=float, default=50.0, help="messages/s, 0 = flat out (default 50)")
    sim.add_argument("--count", type=int, default=None, help="stop after this many messages")
    sim.add_argument("--profile", choices=("mixed", "climate"), default="mixed")
    sim.add_argument("--register", action="store_true", help="insert devices beyond the seed metadata")
    sim.add_argument("--first-device", type=int, default=0, help="skip this many (parallel publishers)")
    sim.set_defaults(handler=_simulate)

    demo = commands.add_parser("demo", help="the whole path on embedded services, with live progress")
    demo.add_argument("--data-dir", type=Path, default=Path(".iotflow/demo"))
    demo.add_argument("--devices", type=int, default=8)
    demo.add_argument("--rate", type=float, default=200.0)
    demo.add_argument("--count", type=int, default=3000)
    demo.add_argument("--external", action="store_true", help="use the configured services instead")
    demo.add_argument("--keep", action="store_true", help="keep the embedded services up afterwards")
    demo.set_defaults(handler=_demo)

    bench = commands.add_parser("bench", help="measure end-to-end throughput, latency and memory")
    bench.add_argument("--messages", type=int, default=200_000)
    bench.add_argument("--devices", type=int, default=100)
    bench.add_argument("--publishers", type=int, default=1, help="publisher processes")
    bench.add_argument("--repeat", type=int, default=2, help="flood runs per configuration, alternated")
    bench.add_argument(
        "--embedded", action="store_true", help="embedded PostgreSQL and Redis too (the broker always is)"
    )
    bench.set_defaults(handler=_bench)

    add_rules_commands(commands)
    add_jobs_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        # One line on stderr (the journal keeps it), before logging is even configured.
        print(f"iotflow: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log.level, settings.log.format)
    code: int = args.handler(settings, args)
    return code


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from worker.decode.codecs import CodecConfigError, load_codecs
    from worker.pipeline import run_daemon

    try:
        load_codecs(Path(settings.pipeline.codecs) if settings.pipeline.codecs else None)
    except CodecConfigError as exc:
        print(f"iotflow: configuration error: pipeline.codecs: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_daemon(settings))
    return uvloop.run(run_daemon(settings))


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from worker.migrate import migrate

    asyncio.run(migrate(settings.postgres))
    return 0


def _print_config(settings: Settings, args: argparse.Namespace) -> int:
    print(orjson.dumps(dataclasses.asdict(settings), option=orjson.OPT_INDENT_2).decode())
    return 0


def _simulate(settings: Settings, args: argparse.Namespace) -> int:
    from worker.simulate import build_fleet, register_fleet, simulate

    if args.register:
        fleet = build_fleet(args.devices, args.profile, first=args.first_device)
        asyncio.run(register_fleet(settings.postgres, fleet))
    simulate(settings.mqtt.url, args.devices, args.rate, args.count, args.profile, first=args.first_device)
    return 0


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(settings, args)


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    from worker.bench import run_bench

    return run_bench(settings, args)
