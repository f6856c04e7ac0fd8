"""`iotflow query device DEVICE --from T [--to T] [--measurement M]`: a device's readings over a
time range, from the time-series store configured (docs/storage.md). DEVICE is a device
id, device_key or MAC; T is `now`, `-24h` or ISO-8601 (worker/cli/times.py).

Rows go to stdout as JSON lines, newest first; the last line on stderr says which store
answered, how many rows, how long it took and, when there are more, the `--page` token
of the next page. Exit codes: 0 done, 1 the store is unreachable, 2 bad arguments or an
unknown device.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson

from worker.cli.device_ref import DEVICE_HELP
from worker.cli.times import EXAMPLES, time_argument
from worker.config import Settings
from worker.exit_codes import ExitCode


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    query = commands.add_parser("query", help="read stored readings")
    kinds = query.add_subparsers(dest="query_kind", required=True, metavar="KIND")
    device = kinds.add_parser("device", help="one device's readings over a time range, newest first")
    device.add_argument("device", metavar="DEVICE", help=DEVICE_HELP)
    device.add_argument(
        "--from", dest="start", required=True, type=time_argument, help=f"inclusive: {EXAMPLES}"
    )
    device.add_argument("--to", dest="end", default="now", type=time_argument, help="exclusive (default now)")
    device.add_argument("--measurement", help="one measurement (datapoint label) only")
    device.add_argument("--page-size", type=_page_size, default=100, help="rows per page (default 100)")
    device.add_argument("--page", help="the token printed with the previous page")
    device.add_argument(
        "--store", choices=("postgres", "cassandra"), help="ask this store (default: timeseries.backend)"
    )
    device.set_defaults(handler=_query_device)


def _page_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10000:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 to 10000")
    return int(text)


def _query_device(settings: Settings, args: argparse.Namespace) -> int:
    from worker.cli.app import config_error
    from worker.cli.device_ref import unknown_device
    from worker.stores import open_stores
    from worker.stores.devices import UnknownDevice, find_device_id
    from worker.stores.timeseries import BadPageToken, NoCassandra, read_device

    if args.end <= args.start:
        return config_error("query: --to must be later than --from")

    async def run() -> int:
        async with open_stores(settings, application_name="iotflow-query", pool_size=1) as stores:
            device_id = await find_device_id(stores.postgres, args.device)
            started = time.perf_counter()
            page = await read_device(
                stores,
                device_id,
                args.start,
                args.end,
                measurement=args.measurement,
                page_size=args.page_size,
                page=args.page,
                store=args.store,
            )
            elapsed_ms = (time.perf_counter() - started) * 1000
        out = sys.stdout
        for row in page.rows:
            record: dict[str, Any] = {
                "timestamp": row.timestamp.isoformat(),
                "measurement": row.measurement,
                "value": row.value,
            }
            if row.text is not None:
                record["text"] = row.text
            out.write(orjson.dumps(record).decode() + "\n")
        out.flush()
        summary = f"store={page.store} rows={len(page.rows)} elapsed_ms={elapsed_ms:.1f}"
        print(summary + (f" next={page.next}" if page.next else ""), file=sys.stderr)
        return ExitCode.OK

    try:
        return asyncio.run(run())
    except (BadPageToken, NoCassandra) as exc:
        return config_error(f"query: {exc}")
    except UnknownDevice as exc:
        return unknown_device("query", exc)
