"""The command line's habits: `--config` anywhere and `IOTFLOW_CONFIG`, `--version`, relative
times, and a reader that closes the pipe early."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest

from jobs.periods import parse_report_period
from worker.cli.app import build_parser
from worker.cli.times import parse_time
from worker.config import Settings

from .conftest import worker_env
from .helpers import ROOT
from .test_jobs_support import add_device, insert_readings

NOW = datetime(2026, 11, 21, 12, 30, tzinfo=UTC)


def iotflow(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *argv],
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    path = tmp_path / "iotflow.toml"
    path.write_text("[pipeline]\nbatch_size = 1234\n")
    return path


def batch_size(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, result.stderr
    return int(orjson.loads(result.stdout)["pipeline"]["batch_size"])


def test_config_may_come_before_or_after_the_sub_command(settings_file: Path) -> None:
    assert batch_size(iotflow("--config", str(settings_file), "config")) == 1234
    assert batch_size(iotflow("config", "--config", str(settings_file))) == 1234


def test_every_sub_command_takes_config_and_the_last_one_given_wins() -> None:
    parser = build_parser()
    assert parser.parse_args(["rules", "list", "--config", "a.toml"]).config == Path("a.toml")
    assert parser.parse_args(["devices", "meta", "get", "7", "--config", "a.toml"]).config == Path("a.toml")
    assert parser.parse_args(["--config", "a.toml", "jobs", "status"]).config == Path("a.toml")
    assert parser.parse_args(
        ["--config", "a.toml", "query", "device", "1", "--from", "now", "--config", "b.toml"]
    ).config == Path("b.toml")
    assert parser.parse_args(["run"]).config is None


def test_iotflow_config_names_the_file_and_config_wins_over_it(settings_file: Path, tmp_path: Path) -> None:
    assert batch_size(iotflow("config", env={"IOTFLOW_CONFIG": str(settings_file)})) == 1234
    other = tmp_path / "other.toml"
    other.write_text("[pipeline]\nbatch_size = 99\n")
    assert (
        batch_size(iotflow("config", "--config", str(other), env={"IOTFLOW_CONFIG": str(settings_file)}))
        == 99
    )
    missing = iotflow("config", env={"IOTFLOW_CONFIG": str(tmp_path / "absent.toml")})
    assert missing.returncode == 2
    assert missing.stderr.startswith("iotflow: configuration error: IOTFLOW_CONFIG: file ")


def test_version_is_the_installed_package_version() -> None:
    result = iotflow("--version")
    assert result.returncode == 0
    assert result.stdout == f"iotflow {importlib.metadata.version('iotflow-worker')}\n"


def test_a_reader_that_closes_the_pipe_early_ends_it_quietly_with_exit_0() -> None:
    """`iotflow config | head -1`, made certain: the pipe is closed before the first write."""
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "config"],
        env={"PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    err = process.stderr.read()
    process.stderr.close()
    assert process.wait(60) == 0, err
    assert err == b""


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("now", NOW),
        ("NOW", NOW),
        ("-30s", NOW - timedelta(seconds=30)),
        ("-15m", NOW - timedelta(minutes=15)),
        ("-24h", NOW - timedelta(hours=24)),
        ("-7d", NOW - timedelta(days=7)),
        ("-2w", NOW - timedelta(weeks=2)),
        ("2026-11-20", datetime(2026, 11, 20, tzinfo=UTC)),
        ("2026-11-20T10:00Z", datetime(2026, 11, 20, 10, tzinfo=UTC)),
        ("2026-11-20T10:00", datetime(2026, 11, 20, 10, tzinfo=UTC)),
        ("2026-11-20T12:00+02:00", datetime(2026, 11, 20, 10, tzinfo=UTC)),
    ],
)
def test_times_are_now_relative_or_iso(text: str, moment: datetime) -> None:
    parsed = parse_time(text, NOW)
    assert parsed == moment and parsed.tzinfo == UTC


@pytest.mark.parametrize("text", ["", "yesterday", "-1y", "24h", "-h", "- 1h", "2026-13-01"])
def test_a_bad_time_names_the_forms_that_work(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a time \(use now, -24h"):
        parse_time(text, NOW)


def test_relative_times_parse_where_times_are_taken() -> None:
    parser = build_parser()
    query = parser.parse_args(["query", "device", "1", "--from", "-1h"])
    assert timedelta(minutes=59) < query.end - query.start < timedelta(minutes=61)
    enqueue = parser.parse_args(["jobs", "enqueue", "rollup", "--from", "-3h", "--to", "-1h"])
    assert timedelta(minutes=119) < enqueue.end - enqueue.start < timedelta(minutes=121)
    assert parser.parse_args(["jobs", "enqueue", "report", "--day", "-1d"]).day < datetime.now(UTC)
    assert parse_report_period("-7d", NOW) == parse_report_period("7d", NOW) == (NOW - timedelta(days=7), NOW)


async def test_query_from_an_hour_ago(settings: Settings, pg: asyncpg.Connection) -> None:
    device_id, points = await add_device(pg, "relative-times", labels=["temperature"])
    now = datetime.now(UTC)
    await insert_readings(
        pg,
        settings,
        [(now - timedelta(minutes=30), device_id, points["temperature"], 21.5),
         (now - timedelta(hours=3), device_id, points["temperature"], 18.0)],
    )  # fmt: skip
    env = worker_env(settings)
    result = iotflow("query", "device", str(device_id), "--from", "-1h", env=env)
    assert result.returncode == 0, result.stderr
    assert [orjson.loads(line)["value"] for line in result.stdout.splitlines()] == [21.5]
    result = iotflow("query", "device", str(device_id), "--from", "-4h", "--to", "-2h", env=env)
    assert [orjson.loads(line)["value"] for line in result.stdout.splitlines()] == [18.0]
