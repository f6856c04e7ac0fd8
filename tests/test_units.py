"""The systemd units: `systemd-analyze verify` accepts them and `systemd-analyze security`
rates each at most 1.0 (docs/operations.md has the scores)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "systemd"
EXEC = "/usr/local/bin/iotflow"
# The template is checked as an instance, the way systemd runs it.
NAMES = ["iotflow-worker.service", "iotflow-jobs.service", "iotflow-worker@8081.service"]
MAX_EXPOSURE = 1.0

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)


def test_every_unit_file_is_checked() -> None:
    files = sorted(p.name for p in UNITS.glob("*.service"))
    assert files == sorted(re.sub(r"@\w+\.", "@.", name) for name in NAMES)


@pytest.fixture(scope="module")
def unit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units with ExecStart pointing at a stub (verify wants an executable there)."""
    directory = tmp_path_factory.mktemp("units")
    stub = directory / "iotflow"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        assert EXEC in text, f"{unit.name}: ExecStart is not {EXEC}"
        (directory / unit.name).write_text(text.replace(EXEC, str(stub)))
    return directory


def _analyze(unit_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], cwd=unit_dir, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("name", NAMES)
def test_systemd_analyze_verify_accepts_the_unit(unit_dir: Path, name: str) -> None:
    result = _analyze(unit_dir, "verify", "--man=no", name)
    # verify exits 0 on unknown keys but warns: any output is a finding.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize("name", NAMES)
def test_the_exposure_is_at_most_1(unit_dir: Path, name: str) -> None:
    result = _analyze(unit_dir, "security", "--offline=yes", "--no-pager", name)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
