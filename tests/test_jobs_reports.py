"""device_health reports: uptime from a crafted gap pattern, counts, averages, alerts."""

from __future__ import annotations

import statistics
from datetime import datetime, timedelta

import asyncpg
import orjson
import pytest

from jobs import reports, tasks
from jobs.commands import report_device
from jobs.context import JobResources
from jobs.periods import parse_report_period
from jobs.reports import report_key
from worker.config import Settings
from worker.stores.devices import UnknownDevice

from .test_jobs_support import Clock, add_device, clock, ctx_of, insert_readings, res, utc

__all__ = ["clock", "res"]

DAY = "2026-03-09"


def every(first: str, last: str, minutes: int) -> list[datetime]:
    moments, moment = [], utc(first)
    while moment <= utc(last):
        moments.append(moment)
        moment += timedelta(minutes=minutes)
    return moments


# Allowed silence 10 min. Up: [00:00, 06:10) thanks to a reading at 23:55 the day before
# and then one every 5 min until 06:00; down until 08:00; readings 10 min apart (exactly the
# allowance) from 08:00 to 12:00, up until 12:10; one reading at 18:00, up 10 min; readings
# each minute from 23:55, up until the end of the day. 370 + 250 + 10 + 5 = 635 min of 1440.
GAPPY = [
    utc("2026-03-08 23:55"),
    *every("2026-03-09 00:00", "2026-03-09 06:00", 5),
    *every("2026-03-09 08:00", "2026-03-09 12:00", 10),
    utc("2026-03-09 18:00"),
    *every("2026-03-09 23:55", "2026-03-09 23:59", 1),
]
GAPPY_UPTIME = round(100 * 635 / 1440, 2)


@pytest.fixture
async def fleet(settings: Settings, pg: asyncpg.Connection) -> dict[str, int]:
    """Three devices: a gappy one, a silent one, and a steady one on the default silence."""
    created = utc("2026-03-01 00:00")
    gappy, gappy_points = await add_device(
        pg, "gappy", max_silence_s=600, labels=("room1.temperature", "humidity"), created_at=created
    )
    silent, _ = await add_device(pg, "silent", labels=("temperature",), created_at=created)
    steady, steady_points = await add_device(pg, "steady", labels=("temperature",), created_at=created)
    await add_device(pg, "newcomer", created_at=utc("2026-03-10 00:00"))  # no report for the 9th
    readings = []
    for n, moment in enumerate(GAPPY):
        readings.append((moment, gappy, gappy_points["room1.temperature"], 20.0 + n % 7))
        if n % 3 == 0:  # humidity in every third message only, same timestamp as temperature
            readings.append((moment, gappy, gappy_points["humidity"], 40.0 + n % 5))
    # Default silence 300 s and a reading every 5 min all day: up the whole day.
    steady_times = every("2026-03-09 00:00", "2026-03-09 23:55", 5)
    readings += [(m, steady, steady_points["temperature"], 1.5) for m in steady_times]
    await insert_readings(pg, settings, readings)
    return {"gappy": gappy, "silent": silent, "steady": steady}


async def add_alerts(res: JobResources, device_id: int, other_id: int) -> None:
    def alert(device: int, created_at: datetime | str, status: str = "open") -> dict[str, object]:
        return {
            "device_id": device,
            "user_id": 1,
            "alert_type": "threshold",
            "severity": "warning",
            "message": "temperature above 30",
            "details": {"measurement": "temperature", "value": 31.0, "threshold": 30, "unit": "°C"},
            "status": status,
            "acknowledged": False,
            "created_at": created_at,
            "resolved_at": None,
        }

    alerts = {
        "in-1": alert(device_id, utc("2026-03-09 00:00")),  # the period's first instant: in
        "in-2": alert(device_id, utc("2026-03-09 13:00"), status="resolved"),
        "in-3": alert(device_id, "2026-03-09T23:59:59Z"),  # written with a Z: in
        "before": alert(device_id, utc("2026-03-08 23:59:59")),
        "after": alert(device_id, utc("2026-03-10 00:00")),  # the period's end: out
        "other": alert(other_id, utc("2026-03-09 10:00")),
    }
    for key, doc in alerts.items():
        assert await res.docs.insert("alerts", key, doc)
    await res.docs.insert(
        "event_logs",
        "maintenance-1",
        {"event_type": "device.maintenance", "device_id": device_id, "timestamp": utc("2026-03-09 07:00")},
    )


async def test_daily_report_figures_follow_the_gaps_and_alerts(
    pg: asyncpg.Connection, res: JobResources, clock: Clock, fleet: dict[str, int]
) -> None:
    await add_alerts(res, fleet["gappy"], fleet["steady"])
    clock.now = utc("2026-03-10 01:20")
    result = await tasks.device_health(ctx_of(res), period=DAY)
    assert result["status"] == "done"

    start = utc("2026-03-09 00:00")
    gappy = await res.docs.get("analytics", report_key(fleet["gappy"], start, start + timedelta(days=1)))
    assert gappy is not None
    temperatures = [20.0 + n % 7 for n, m in enumerate(GAPPY) if m >= start]
    humidities = [40.0 + n % 5 for n, m in enumerate(GAPPY) if m >= start and n % 3 == 0]
    assert gappy["report_type"] == "device_health"
    assert gappy["period"] == {"start": "2026-03-09T00:00:00+00:00", "end": "2026-03-10T00:00:00+00:00"}
    assert gappy["metrics"] == {
        "uptime_percentage": GAPPY_UPTIME,
        "total_data_points": len(temperatures) + len(humidities),
        "average_room1_temperature": pytest.approx(statistics.mean(temperatures)),
        "average_humidity": pytest.approx(statistics.mean(humidities)),
        "alerts_triggered": 3,
        "maintenance_events": 1,
    }
    assert gappy["user_id"] is not None

    steady = await res.docs.get("analytics", report_key(fleet["steady"], start, start + timedelta(days=1)))
    assert steady is not None
    assert steady["metrics"]["uptime_percentage"] == 100.0
    assert steady["metrics"]["total_data_points"] == 288
    assert steady["metrics"]["alerts_triggered"] == 1

    silent = await res.docs.get("analytics", report_key(fleet["silent"], start, start + timedelta(days=1)))
    assert silent is not None
    assert silent["metrics"] == {
        "uptime_percentage": 0.0,
        "total_data_points": 0,
        "alerts_triggered": 0,
        "maintenance_events": 0,
    }
    # Only these three: the newcomer and the seeded fleet were created after the period.
    assert result["devices"] == 3
    assert await pg.fetchval("SELECT count(*) FROM documents WHERE collection = 'analytics'") == 3


async def test_report_command_prints_and_stores_a_calendar_day(
    settings: Settings, res: JobResources, fleet: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    assert await report_device(settings, str(fleet["gappy"]), DAY) == 0
    printed = orjson.loads(capsys.readouterr().out)
    assert printed["device_id"] == fleet["gappy"]
    assert printed["metrics"]["uptime_percentage"] == GAPPY_UPTIME
    start = utc("2026-03-09 00:00")
    stored = await res.docs.get("analytics", report_key(fleet["gappy"], start, start + timedelta(days=1)))
    assert stored is not None and stored["metrics"] == printed["metrics"]

    with pytest.raises(UnknownDevice):
        await report_device(settings, "999999", DAY)


def test_report_periods_parse_as_spans_ending_now_or_utc_days() -> None:
    now = utc("2026-03-10 12:34")
    assert parse_report_period("1d", now) == (utc("2026-03-09 12:34"), now)
    assert parse_report_period("7d", now) == (utc("2026-03-03 12:34"), now)
    assert parse_report_period("12h", now) == (utc("2026-03-10 00:34"), now)
    assert parse_report_period("2026-11-21", now) == (utc("2026-11-21 00:00"), utc("2026-11-22 00:00"))
    with pytest.raises(ValueError):
        parse_report_period("yesterday", now)


async def test_a_period_reaching_into_the_future_is_measured_up_to_now(
    res: JobResources, clock: Clock, fleet: dict[str, int]
) -> None:
    # At 06:05 on the 9th the gappy device has been up all along: 100 %, not 6 h / 24 h.
    clock.now = utc("2026-03-09 06:05")
    result = await tasks.device_health(ctx_of(res), period=DAY, device_id=fleet["gappy"])
    assert result["devices"] == 1
    start = utc("2026-03-09 00:00")
    report = await res.docs.get("analytics", report_key(fleet["gappy"], start, start + timedelta(days=1)))
    assert report is not None and report["metrics"]["uptime_percentage"] == 100.0


@pytest.mark.parametrize(
    ("first", "last"),
    [("2026-03-09 00:00", "2026-03-10 00:00"), ("2026-03-09 05:00", "2026-03-09 18:05")],
)
async def test_the_read_through_figures_equal_postgres_own(
    res: JobResources, fleet: dict[str, int], first: str, last: str
) -> None:
    """The path the reports take on Cassandra (range reads through worker/stores/timeseries.py,
    aggregated in Python), run here against PostgreSQL's rows: the same figures as the SQL."""
    silences = {fleet["gappy"]: 600, fleet["silent"]: 300, fleet["steady"]: 300}
    start, end = utc(first), utc(last)
    by_sql = await reports.figures_from_sql(res, silences, start, end)
    by_reads = await reports.figures_from_reads(res, "postgres", silences, start, end)
    assert by_reads.up_s == {**{d: 0.0 for d in silences}, **by_sql.up_s}
    assert by_reads.up_s[fleet["gappy"]] > 0 and by_reads.up_s[fleet["silent"]] == 0.0

    def approx(figures: reports.Figures) -> dict[int, object]:
        return {
            d: sorted((label, n, pytest.approx(mean)) for label, n, mean in rows)
            for d, rows in figures.series.items()
        }

    assert approx(by_reads) == approx(by_sql) and by_sql.series


async def test_the_read_through_pages_and_counts_readings_without_values(
    res: JobResources, pg: asyncpg.Connection, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, points = await add_device(pg, "paged", max_silence_s=60, labels=("t",), created_at=utc(DAY))
    moments = every("2026-03-09 01:00", "2026-03-09 01:30", 1)
    await insert_readings(
        pg,
        settings,
        [(m, device, points["t"], None if n % 4 == 0 else float(n)) for n, m in enumerate(moments)],
    )
    monkeypatch.setattr(reports, "READ_PAGE", 7)  # several pages
    start, end = utc("2026-03-09 00:00"), utc("2026-03-10 00:00")
    by_reads = await reports.figures_from_reads(res, "postgres", {device: 60}, start, end)
    by_sql = await reports.figures_from_sql(res, {device: 60}, start, end)
    assert by_reads.up_s == by_sql.up_s == {device: 31 * 60.0}
    assert by_reads.series == by_sql.series
    assert by_reads.series[device][0][1] == len(moments)  # readings without a value count too


def test_uptime_follows_the_allowed_silence_and_the_period() -> None:
    allowed, start, end = timedelta(minutes=10), utc("2026-03-09 00:00"), utc("2026-03-09 01:00")
    times = [
        utc("2026-03-08 23:55"),
        utc("2026-03-09 00:20"),
        utc("2026-03-09 00:25"),
        utc("2026-03-09 00:58"),
    ]
    # 00:00–00:05 (from 23:55), 00:20–00:25, 00:25–00:35, 00:58–01:00 (the end)
    assert reports.uptime_s(times, allowed, start, end) == (5 + 5 + 10 + 2) * 60.0
    assert reports.uptime_s([], allowed, start, end) == 0.0


async def test_a_report_says_which_store_answered(
    res: JobResources, clock: Clock, fleet: dict[str, int]
) -> None:
    clock.now = utc("2026-03-10 01:20")
    built = await reports.build_reports(
        res, utc("2026-03-09 00:00"), utc("2026-03-10 00:00"), [fleet["gappy"]]
    )
    assert [r["store"] for r in built] == ["postgres"]
