"""No traceback reaches a user: every command, as a process of its own, against a schema
never migrated, a closed port and a taken HTTP port ends in one line and its exit code."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import orjson
import pytest

from worker.cli.app import run
from worker.config import Settings
from worker.tools.embedded import ServiceUrls

from .conftest import make_settings, worker_env
from .helpers import ROOT

# Commands that read or write PostgreSQL; what they look for does not matter here.
POSTGRES_COMMANDS = {
    "rules list": ("rules", "list"),
    "alerts list": ("alerts", "list"),
    "report": ("report", "device", "1"),
    "query": ("query", "device", "1", "--from", "-1h"),
    "devices meta get": ("devices", "meta", "get", "1"),
    "jobs status": ("jobs", "status"),
    "jobs run": ("jobs", "run", "--burst", "--no-cron"),
    "simulate --register": ("simulate", "--register", "--devices", "1", "--count", "1"),
}


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port held bound but not listening: a connection to it is refused, and no other
    process can start listening on it meanwhile."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def iotflow(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """Exit `code`, no traceback anywhere, one line on stderr holding `words`; that line."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == code, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def log_records(stdout: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def unmigrated(service_urls: ServiceUrls) -> Settings:
    """Settings of a schema that does not exist: `iotflow migrate` never ran for it."""
    return make_settings(service_urls, f"never_migrated_{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("argv", POSTGRES_COMMANDS.values(), ids=POSTGRES_COMMANDS.keys())
def test_a_schema_never_migrated_is_exit_2_saying_run_migrate(
    unmigrated: Settings, argv: tuple[str, ...]
) -> None:
    result = iotflow(worker_env(unmigrated), *argv)
    assert_one_line(result, 2, unmigrated.postgres.schema, "run `iotflow migrate`")


@pytest.mark.parametrize(
    "argv", [*POSTGRES_COMMANDS.values(), ("migrate",)], ids=[*POSTGRES_COMMANDS.keys(), "migrate"]
)
def test_postgres_down_is_exit_1_naming_it_and_its_address(
    unmigrated: Settings, argv: tuple[str, ...]
) -> None:
    with closed_port() as port:
        env = {
            **worker_env(unmigrated),
            "IOTFLOW_POSTGRES_URL": f"postgresql://iotflow:s3cret@127.0.0.1:{port}/x",
        }
        result = iotflow(env, *argv)
    line = assert_one_line(
        result, 1, f"postgres at postgresql://iotflow:***@127.0.0.1:{port}/x is unreachable"
    )
    assert "s3cret" not in line


@pytest.mark.parametrize(
    "argv",
    [("rules", "set", "--global", "type=offline", "duration=15m"), ("jobs", "enqueue", "sweep")],
    ids=["rules set", "jobs enqueue"],
)
def test_redis_down_is_exit_1_naming_it_and_its_address(settings: Settings, argv: tuple[str, ...]) -> None:
    with closed_port() as port:
        result = iotflow({**worker_env(settings), "IOTFLOW_REDIS_URL": f"redis://127.0.0.1:{port}/0"}, *argv)
    assert_one_line(result, 1, f"redis at redis://127.0.0.1:{port}/0 is unreachable")


def test_simulate_with_the_broker_down_is_exit_1_naming_it(unmigrated: Settings) -> None:
    with closed_port() as port:
        env = {**worker_env(unmigrated), "IOTFLOW_MQTT_URL": f"mqtt://sim:pw@127.0.0.1:{port}"}
        result = iotflow(env, "simulate", "--devices", "1", "--count", "1")
    assert_one_line(result, 1, f"mqtt broker at mqtt://sim:***@127.0.0.1:{port} is unreachable")


def test_run_with_its_http_port_taken_exits_2_and_says_so_at_error(settings: Settings) -> None:
    """Exit 2, so that systemd's RestartPreventExitStatus=2 stops instead of looping."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **worker_env(settings),
            "IOTFLOW_HTTP_ENABLED": "true",
            "IOTFLOW_HTTP_HOST": "127.0.0.1",
            "IOTFLOW_HTTP_PORT": str(port),
        }
        result = iotflow(env, "run")
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    records = {record["event"]: record for record in log_records(result.stdout)}
    assert records["http.unavailable"]["level"] == "error" and records["http.unavailable"]["port"] == port
    assert records["daemon.stopped"]["level"] == "error" and records["daemon.stopped"]["exit_code"] == 2


def test_run_on_a_schema_never_migrated_stops_at_error_with_exit_2(unmigrated: Settings) -> None:
    result = iotflow(worker_env(unmigrated), "run")
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, result.stdout
    records = {record["event"]: record for record in log_records(result.stdout)}
    assert "run `iotflow migrate`" in str(records["schema.not_ready"]["problem"])
    assert records["daemon.stopped"]["level"] == "error" and records["daemon.stopped"]["exit_code"] == 2


def test_an_unexpected_error_is_one_line_pointing_at_debug_which_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def bug(settings: Settings, args: object) -> int:
        raise KeyError("nothing")

    monkeypatch.setattr("worker.cli.daemon._print_config", bug)  # the parser binds it when built
    monkeypatch.setattr("worker.cli.app.configure_logging", lambda *args, **kwargs: None)
    assert run(["config"]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "iotflow config: unexpected error: KeyError: 'nothing' (run with IOTFLOW_LOG_LEVEL=debug for the traceback)\n"
    )
    monkeypatch.setenv("IOTFLOW_LOG_LEVEL", "debug")
    with pytest.raises(KeyError):
        run(["config"])


def test_ctrl_c_in_a_command_is_exit_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(settings: Settings, args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("worker.cli.daemon._print_config", interrupted)
    monkeypatch.setattr("worker.cli.app.configure_logging", lambda *args, **kwargs: None)
    assert run(["config"]) == 130
    assert capsys.readouterr().err == ""
