"""A stop signal however early ends the daemon cleanly: exit 0 and its `daemon.stopped` line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from worker.config import Settings

from .conftest import worker_env
from .helpers import IotflowProcess


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for `sig` (the SigCgt mask of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) & (1 << (sig - 1)))


# SIGTERM lands after the handlers are held but before the loop exists: the earliest a
# signal can be survived, made deterministic by sending it to ourselves right there.
EARLY_SIGTERM = """
import os, signal, sys
from worker.runtime.signals import hold_stop_signals
hold_stop_signals()
os.kill(os.getpid(), signal.SIGTERM)
from worker.cli import main
sys.exit(main(["run"]))
"""


async def test_a_sigterm_before_the_event_loop_exists_still_stops_cleanly(settings: Settings) -> None:
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EARLY_SIGTERM, env=worker_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(worker.communicate(), 60)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    assert worker.returncode == 0, output.decode()[-2000:]
    lines = [orjson.loads(line) for line in output.splitlines() if line.startswith(b"{")]
    events = [line.get("event") for line in lines]
    assert "supervisor.signal" in events and "supervisor.ready" not in events
    stopped = [line for line in lines if line.get("event") == "daemon.stopped"]
    assert len(stopped) == 1 and stopped[0]["exit_code"] == 0


def test_importing_the_command_is_light_so_signals_are_held_first() -> None:
    """`main` holds the signals before it imports the parser, the daemon or any driver."""
    code = (
        "import sys, worker.cli; print(sorted(m for m in sys.modules if m.startswith(('worker', 'asyncpg'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['worker', 'worker.cli']"


async def test_other_commands_still_die_of_sigterm(settings: Settings) -> None:
    """Holding signals is for the daemon: `iotflow simulate` stopped by SIGTERM stops at once."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "simulate", "--rate", "1", "--count", "1000000",
        env={**os.environ, "IOTFLOW_MQTT_URL": settings.mqtt.url},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not _catches(process.pid, signal.SIGTERM):
            assert process.returncode is None and time.monotonic() < deadline
            await asyncio.sleep(0.001)
        # Held until the command is known, then released: SIGTERM is fatal again.
        while _catches(process.pid, signal.SIGTERM) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == -signal.SIGTERM


EARLY_SIGHUP = EARLY_SIGTERM.replace("signal.SIGTERM", "signal.SIGHUP")


async def test_a_sighup_before_the_event_loop_exists_is_a_reload_not_a_death(settings: Settings) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EARLY_SIGHUP, env=worker_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    worker = IotflowProcess(process)
    try:
        await worker.wait_for_event("reload.done")
        await worker.wait_for_event("supervisor.ready")
        assert await worker.terminate() == 0
    finally:
        await worker.close()
