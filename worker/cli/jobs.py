"""`iotflow jobs …` (run the arq worker, enqueue, status, bench) and `iotflow report …`.

The `jobs` package is imported only when one of these runs, so the daemon never loads it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from worker.cli.device_ref import DEVICE_HELP, device_id, unknown_device
from worker.cli.times import EXAMPLES, time_argument
from worker.config import Settings
from worker.exit_codes import ExitCode
from worker.stores.devices import UnknownDevice


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register the jobs and report sub-commands."""
    jobs = commands.add_parser("jobs", help="arq jobs: rollups, reports, retention, sweeps (default: run)")
    jobs.set_defaults(handler=_run_worker, burst=False, cron=True)
    sub = jobs.add_subparsers(dest="jobs_command", metavar="JOBS_COMMAND")

    run = sub.add_parser("run", help="start an arq worker (the default); run several to scale out")
    run.add_argument("--burst", action="store_true", help="run what is queued, then exit")
    run.add_argument("--no-cron", dest="cron", action="store_false", help="do not schedule, only run jobs")
    run.set_defaults(handler=_run_worker)

    enqueue = sub.add_parser("enqueue", help="queue one job now")
    enqueue.add_argument("job", choices=("rollup", "report", "retention", "sweep"))
    enqueue.add_argument(
        "--from", dest="start", type=time_argument, help=f"rollup backfill: first hour ({EXAMPLES})"
    )
    enqueue.add_argument("--to", dest="end", type=time_argument, help="rollup backfill: end, exclusive")
    enqueue.add_argument(
        "--day", type=time_argument, help="report: the UTC day holding this time (default: yesterday)"
    )
    enqueue.add_argument("--device", metavar="DEVICE", help=f"report: one device only ({DEVICE_HELP})")
    enqueue.add_argument("--force", action="store_true", help="run even if this period is done")
    enqueue.add_argument("--wait", type=float, default=0.0, help="wait this many seconds for the result")
    enqueue.set_defaults(handler=_enqueue)

    status = sub.add_parser("status", help="recent job runs from job_runs")
    status.add_argument("--limit", type=int, default=20)
    status.add_argument("--job", help="only this job (rollup, device_health, retention, offline_sweep)")
    status.set_defaults(handler=_status)

    bench = sub.add_parser("bench", help="measure the hourly rollup against the hour it covers")
    bench.add_argument("--readings", type=int, default=10_000_000, help="readings to load (default 10M)")
    bench.add_argument("--series", type=int, default=1000, help="device×datapoint series (default 1000)")
    bench.add_argument("--hours", type=int, default=1, help="hours the readings span (default 1)")
    bench.add_argument("--target-rate", type=float, default=10_000.0, help="ingest rate to compare with")
    bench.add_argument("--schema", default="bench_jobs", help="throwaway schema (dropped before and after)")
    bench.add_argument("--connections", type=int, default=0, help="loading connections (default: CPUs)")
    bench.add_argument("--keep", action="store_true", help="keep the schema afterwards")
    bench.set_defaults(handler=_bench)

    report = commands.add_parser("report", help="compute and print a device_health report")
    report_sub = report.add_subparsers(dest="report_kind", required=True, metavar="KIND")
    device = report_sub.add_parser("device", help="one device's health over a period")
    device.add_argument("device", metavar="DEVICE", help=DEVICE_HELP)
    device.add_argument(
        "--period", default="1d", help="1d, 7d, 12h or -7d (ending now), or a UTC day 2026-11-21"
    )
    device.set_defaults(handler=_report_device)


def _run_worker(settings: Settings, args: argparse.Namespace) -> int:
    from jobs.worker import build_worker

    build_worker(settings, burst=args.burst, cron_jobs=args.cron).run()
    return ExitCode.OK


def _enqueue(settings: Settings, args: argparse.Namespace) -> int:
    from jobs.commands import enqueue_now, enqueue_request

    try:
        device = asyncio.run(device_id(settings, args.device)) if args.device is not None else None
        request = enqueue_request(settings, args.job, args.start, args.end, args.day, device, args.force)
    except UnknownDevice as exc:
        return unknown_device("jobs enqueue", exc)
    except ValueError as exc:
        print(f"iotflow jobs enqueue: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    return asyncio.run(enqueue_now(settings, request, args.wait))


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from jobs.commands import print_status

    return asyncio.run(print_status(settings, args.limit, args.job))


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    from worker.tools.bench.jobs import default_connections, run_bench

    result = asyncio.run(
        run_bench(
            settings,
            readings=args.readings,
            series=args.series,
            hours=args.hours,
            schema=args.schema,
            target_rate=args.target_rate,
            connections=args.connections or default_connections(),
            keep=args.keep,
        )
    )
    figures = result.as_dict()
    print(
        f"hourly rollup: {figures['readings']:,} readings -> {figures['hourly_rows']:,} rows in "
        f"{figures['hourly_rollup_s']} s = {figures['rollup_rate']:,} readings/s "
        f"(daily rollup {figures['daily_rollup_s']} s)"
    )
    print(
        f"one hour at {args.target_rate:,.0f} readings/s ({args.target_rate * 3600:,.0f} readings) rolls up "
        f"in ~{figures['hour_at_target_s']} s = {figures['hour_ratio']:.5f} of the hour it covers"
    )
    print(orjson.dumps(figures).decode())
    return ExitCode.OK


def _report_device(settings: Settings, args: argparse.Namespace) -> int:
    from jobs.commands import report_device

    try:
        return asyncio.run(report_device(settings, args.device, args.period))
    except UnknownDevice as exc:
        return unknown_device("report", exc)
    except ValueError as exc:
        print(f"iotflow report: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
