"""`python -m worker.tools.bench.documents`: how fast the MongoDB backend stores alert documents.

Writes N documents the way the alert sink does (worker/sinks/alerts.py): per batch of
alert events, one unordered bulk insert of their `event_logs` entries and one of their
`alerts` documents, through `MongoDocumentStore.insert_many`, one batch after the other,
into collections with the indexes `iotflow migrate` makes.
Against the server at `--url`, or a FerretDB 1.24 of the bench's own (worker.tools.servers)
in a temporary directory. Prints documents/s and the CPU-seconds per 100,000 documents of
this process and, when its pid is known, of the server (from /proc: `utime + stime`), the
figure docs/storage.md compares with 200 inserts/s, the figure an earlier MongoDB design claimed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.mongo import mongo_indexes
from schemas.records import AlertEvent
from worker.config import DocumentSettings
from worker.logging import configure_logging
from worker.rules.events import alert_document, alert_id, event_log_document
from worker.stores.documents import MongoDocumentStore
from worker.tools.bench.support import cpu_seconds


@dataclass(frozen=True)
class DocumentsBench:
    documents: int
    seconds: float
    client_cpu_s: float
    server_cpu_s: float | None

    def line(self) -> str:
        per = 100_000 / self.documents
        server = "unknown" if self.server_cpu_s is None else f"{self.server_cpu_s * per:.1f}"
        return (
            f"documents={self.documents} seconds={self.seconds:.2f} "
            f"inserts_per_s={self.documents / self.seconds:.0f} "
            f"client_cpu_s_per_100k={self.client_cpu_s * per:.1f} server_cpu_s_per_100k={server}"
        )


def alert_events(count: int, start: datetime) -> list[AlertEvent]:
    """`count` fired threshold alerts over 100 devices, a second apart (distinct keys)."""
    events = []
    for n in range(count):
        at = start + timedelta(seconds=n)
        device = n % 100 + 1
        events.append(
            AlertEvent(
                "fired",
                alert_id(f"device:{device}/high-temp", device, at),
                f"device:{device}/high-temp",
                device,
                None,
                "threshold",
                "high",
                "temperature above 30",
                at,
                at,
                {"measurement": "temperature", "value": 31.5 + n % 7, "threshold": 30},
            )
        )
    return events


async def run(url: str, documents: int, batch: int, server_pid: int | None) -> DocumentsBench:
    settings = DocumentSettings(
        backend="mongodb", mongodb_url=url, mongodb_database=f"iotflow_bench_{uuid.uuid4().hex[:8]}"
    )
    store = MongoDocumentStore(settings)
    events = alert_events(documents // 2, datetime(2026, 11, 20, tzinfo=UTC))
    try:
        await store.ping()
        # The indexes `iotflow migrate` makes (90-day retention): each insert maintains them.
        await store.apply_indexes(mongo_indexes(90, 90), ())
        me = [os.getpid()]
        client, server = cpu_seconds(me), cpu_seconds([server_pid]) if server_pid else None
        started = time.perf_counter()
        stored = 0  # the keys the server said were new: a refused write is not counted
        for first in range(0, len(events), batch):
            chunk = events[first : first + batch]
            logs = {e.event_key: event_log_document(e) for e in chunk}
            stored += len(await store.insert_many("event_logs", logs))
            stored += len(await store.insert_many("alerts", {e.alert_id: alert_document(e) for e in chunk}))
        seconds = time.perf_counter() - started
        server_cpu = None if server is None or server_pid is None else cpu_seconds([server_pid]) - server
        return DocumentsBench(stored, seconds, cpu_seconds(me) - client, server_cpu)
    finally:
        await store.drop_database()
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.tools.bench.documents", description=__doc__)
    parser.add_argument(
        "--url", default="", help="a MongoDB-protocol server (default: a FerretDB of its own)"
    )
    parser.add_argument("--server-pid", type=int, default=None, help="the --url server's pid, for its CPU")
    parser.add_argument("--documents", type=int, default=20_000, help="alerts + event logs (default 20000)")
    parser.add_argument("--batch", type=int, default=500, help="alert events per bulk insert (default 500)")
    args = parser.parse_args(argv)
    configure_logging("error", "console")  # not migrate's lines about refused indexes
    if args.url:
        print(asyncio.run(run(args.url, args.documents, args.batch, args.server_pid)).line())
        return 0
    from worker.tools.servers import FerretDBServer

    with (
        tempfile.TemporaryDirectory(prefix="iotflow-documents-bench-") as directory,
        FerretDBServer(Path(directory)) as server,
    ):
        result = asyncio.run(run(server.url, args.documents, args.batch, server.pid))
    print(f"server=FerretDB {result.line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
