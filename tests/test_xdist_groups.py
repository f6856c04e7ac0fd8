"""The test command's two workers start each session server once: the tests that share one
(or a module-scoped fixture) run on one worker (tests/xdist_groups.py), proved on a small
suite of its own run as ./scripts/test runs pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from .helpers import ROOT

CONFTEST = """
import os
import pytest

def record(what):
    with open(os.environ["RECORD"], "a") as out:
        out.write(f"{what} {os.environ['PYTEST_XDIST_WORKER']}\\n")

@pytest.fixture(scope="session")
def demo_server():
    record("server-started")

@pytest.fixture(autouse=True)
def ran(request):
    record(f"test {request.node.name}")
"""
# Tests that share the server alternate with tests that share nothing, so that dealt out one
# by one they would land on both workers.
TESTS = """
import pytest

pytestmark = pytest.mark.shares("built")

@pytest.fixture(scope="module")
def built():
    from conftest import record
    record("module-built")

@pytest.mark.parametrize("n", range(4))
def test_uses_the_server(demo_server, n):
    pass

@pytest.mark.parametrize("n", range(4))
def test_alone(n):
    pass

@pytest.mark.parametrize("n", range(4))
def test_uses_the_module_fixture(built, n):
    pass
"""


def run_suite(tmp_path: Path, **env: str) -> list[tuple[str, str]]:
    """Run the small suite on two workers; (what, worker) for each record it made."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers = shares\n")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_demo.py").write_text(TESTS)
    record = tmp_path / "record.txt"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.xdist_groups", "-n", "2", "--dist", "loadgroup"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RECORD": str(record), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "12 passed" in result.stdout, result.stdout
    lines = [line.rsplit(" ", 1) for line in record.read_text().splitlines()]
    return [(what, worker) for what, worker in lines]


def test_a_session_server_and_a_module_fixture_are_each_set_up_on_one_worker(tmp_path: Path) -> None:
    env = {name: "" for name in ("IOTFLOW_TEST_MQTT_URL", "IOTFLOW_TEST_HIVEMQ_URL")}
    records = run_suite(tmp_path, **env)
    made = Counter(what for what, _ in records if not what.startswith("test "))
    assert made == {"server-started": 1, "module-built": 1}, records


def test_with_a_shared_broker_given_every_test_runs_on_one_worker(tmp_path: Path) -> None:
    records = run_suite(tmp_path, IOTFLOW_TEST_MQTT_URL="mqtt://127.0.0.1:1883")
    assert len({worker for _, worker in records}) == 1, records
