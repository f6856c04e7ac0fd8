"""The layers of docs/architecture.md hold: the daemon does not load the jobs, nor the jobs the tools."""

from __future__ import annotations

import subprocess
import sys


def _modules_after_import(*modules: str) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(result.stdout.split())


def test_the_daemon_imports_neither_jobs_nor_tools_nor_the_cli() -> None:
    loaded = _modules_after_import("worker.pipeline")
    assert not {m for m in loaded if m == "jobs" or m.startswith(("jobs.", "worker.tools", "worker.cli"))}


def test_the_jobs_import_neither_the_pipeline_nor_tools_nor_the_cli() -> None:
    loaded = _modules_after_import("jobs.worker", "jobs.commands", "jobs.arq_settings")
    forbidden = (
        "worker.pipeline",
        "worker.tools",
        "worker.cli",
        "worker.intake",
        "worker.decode",
        "worker.sinks",
    )
    assert not {m for m in loaded if m.startswith(forbidden)}


def test_a_command_loads_only_its_own_group() -> None:
    loaded = _modules_after_import("worker.cli")
    assert not {
        m
        for m in loaded
        if m == "jobs"
        or m.startswith(("jobs.", "worker.pipeline", "worker.tools", "worker.ops", "cryptography"))
    }


def test_the_rules_decide_and_import_no_sink() -> None:
    """Rules judge; a sink the pipeline wires stores and delivers what they decide."""
    loaded = _modules_after_import("worker.rules.actor", "worker.rules.alert_admin")
    assert not {m for m in loaded if m.startswith("worker.sinks")}
