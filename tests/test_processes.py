"""`iotflow run --processes N`: N children in one shared group under one parent, as real processes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import asyncpg
import pytest

from worker.config import Settings, load_settings
from worker.runtime.processes import child_env, group_problem, left_behind, process_count, usable_cores

from .conftest import worker_env
from .helpers import IotflowProcess, iotflow_process, notify_socket, simulator, wait_for_count, worker_process
from .test_process import RATE, expected_readings


def _group(settings: Settings, **extra: str) -> dict[str, str]:
    """Two processes in a group of this test's own, restarting quickly."""
    return {
        "IOTFLOW_RUNTIME_PROCESSES": "2",
        "IOTFLOW_MQTT_SHARED_GROUP": f"g{settings.mqtt.client_id.rsplit('-', 1)[-1]}",
        "IOTFLOW_RUNTIME_RESTART_BACKOFF_S": "0.1",
        **extra,
    }


def _children_records(worker: IotflowProcess, event: str) -> dict[int, list[dict[str, object]]]:
    found: dict[int, list[dict[str, object]]] = {}
    for record in worker.records():
        if record.get("event") == event:
            child = record.get("child", record.get("process"))
            found.setdefault(int(str(child)), []).append(record)
    return found


async def test_two_processes_split_the_stream_and_stop_together_on_sigterm(
    settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    total = 600
    async with notify_socket(tmp_path / "notify.sock") as notify:
        env = _group(settings, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="200000")
        async with worker_process(settings, **env) as worker:
            await worker.wait_for_event("processes.ready")  # both subscribed: nothing published is lost
            async with simulator(settings.mqtt.url, 8, 1000, total) as sim:
                assert await sim.sent() == total
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", expected_readings(total))
            assert await worker.terminate() == 0
        states = notify.read()
    events = worker.events()
    # One READY, after both children's; one STOPPING; the watchdog pinged meanwhile.
    assert states.count("READY=1") == 1 and states.count("STOPPING=1") == 1, states
    assert states.index("READY=1") < states.index("STOPPING=1"), states
    assert set(states) == {"READY=1", "WATCHDOG=1", "STOPPING=1"}, states
    assert events.count("processes.child_ready") == 2
    assert events.index("processes.ready") > max(
        i for i, e in enumerate(events) if e == "processes.child_ready"
    )
    # Each child had its share, under its own client id; both drained and exited 0.
    stopped = _children_records(worker, "daemon.stopped")
    assert sorted(stopped) == [0, 1] and all(r[-1]["exit_code"] == 0 for r in stopped.values())
    shares = [int(str(stopped[i][-1]["committed"])) for i in (0, 1)]
    assert sum(shares) == total and min(shares) > 0, shares
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == expected_readings(total)


async def test_a_child_killed_with_9_is_started_again_and_nothing_is_lost(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with worker_process(settings, **_group(settings)) as worker:
        await worker.wait_for_event("processes.ready")
        async with simulator(settings.mqtt.url, 8, RATE, None) as sim:
            await wait_for_count(pg, "SELECT count(*) FROM decoded_data", 300)
            victim = _children_records(worker, "processes.child_started")[0][0]
            os.kill(int(str(victim["pid"])), signal.SIGKILL)  # no drain, no flush, no goodbye
            restarted = await worker.wait_for_event("processes.restarting")
            assert restarted["child"] == 0
            await worker.wait_for_event("processes.child_ready", nth=2, child=0)  # ready again
            sent = await sim.stop()
        expected = expected_readings(sent)
        await wait_for_count(pg, "SELECT count(*) FROM decoded_data", expected, timeout=40)
        assert await worker.terminate() == 0
    assert await pg.fetchval("SELECT count(*) FROM decoded_data") == expected
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0
    exited = _children_records(worker, "processes.child_exited")
    assert list(exited) == [0] and exited[0][0]["exit_code"] == -signal.SIGKILL


async def test_the_watchdog_is_withheld_while_a_ready_child_is_silent(
    settings: Settings, tmp_path: Path
) -> None:
    async with notify_socket(tmp_path / "notify.sock") as notify:
        # Pings every second, silent after two: wide enough that a busy machine does not
        # make a running child look silent.
        env = _group(settings, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000")
        async with worker_process(settings, **env) as worker:
            await worker.wait_for_event("processes.ready")
            await notify.wait_for_state("WATCHDOG=1")
            pid = int(str(_children_records(worker, "processes.child_started")[1][0]["pid"]))
            os.kill(pid, signal.SIGSTOP)  # alive, but its event loop no longer pings
            try:
                await worker.wait_for_event("processes.watchdog_withheld", child=1)
            finally:
                os.kill(pid, signal.SIGCONT)
            await worker.wait_for_event("processes.watchdog_resumed", child=1)
            assert await worker.terminate() == 0
    assert "processes.restarting" not in worker.events()  # silent is not dead: systemd's call


async def test_a_stop_signal_that_reaches_a_child_first_stops_the_group_without_restart(
    settings: Settings,
) -> None:
    """As Ctrl-C (the whole process group) or KillMode=control-group (the whole cgroup) do."""
    async with worker_process(settings, **_group(settings)) as worker:
        await worker.wait_for_event("processes.ready")
        child = _children_records(worker, "processes.child_started")[1][0]
        os.kill(int(str(child["pid"])), signal.SIGTERM)
        assert await worker.wait(60) == 0
    events = worker.events()
    assert "processes.child_stopped" in events and "processes.restarting" not in events
    assert events.count("processes.child_started") == 2 and events.count("daemon.stopped") == 2


async def test_a_child_configuration_error_ends_the_group_with_2_without_restarts(settings: Settings) -> None:
    env = _group(settings, IOTFLOW_POSTGRES_SCHEMA="never_migrated")
    async with worker_process(settings, **env) as worker:
        assert await worker.wait(60) == 2
    events = worker.events()
    assert "schema.not_ready" in events and "processes.config_error" in events
    assert "processes.restarting" not in events and "processes.ready" not in events


async def test_several_processes_without_a_shared_group_are_refused(settings: Settings) -> None:
    env = {**worker_env(settings), "IOTFLOW_MQTT_SHARED_GROUP": ""}
    async with iotflow_process(env, "run", "--processes", "2") as worker:
        assert await worker.wait(30) == 2
    assert "configuration error: runtime.processes: 2 processes need mqtt.shared_group" in worker.output
    assert "processes.child_started" not in worker.output


async def test_children_drain_and_exit_when_the_parent_is_killed(settings: Settings) -> None:
    async with worker_process(settings, **_group(settings)) as worker:
        await worker.wait_for_event("processes.ready")
        await worker.kill()
        # The children share the parent's stdout: it ends once both have exited.
        assert await worker.wait(60) == -signal.SIGKILL
    stopped = _children_records(worker, "daemon.stopped")
    assert sorted(stopped) == [0, 1] and all(r[-1]["exit_code"] == 0 for r in stopped.values())


def test_auto_is_one_process_per_usable_core() -> None:
    assert process_count("auto") == usable_cores() == len(os.sched_getaffinity(0))
    assert process_count(3) == 3
    assert load_settings(None, {"IOTFLOW_RUNTIME_PROCESSES": "auto"}).runtime.processes == "auto"
    assert load_settings(None, {"IOTFLOW_RUNTIME_PROCESSES": "4"}).runtime.processes == 4


@pytest.mark.parametrize("value", ["0", "many", "-1"])
def test_a_bad_process_count_names_the_setting(value: str) -> None:
    from worker.config import ConfigError

    with pytest.raises(ConfigError, match=r"runtime\.processes \(IOTFLOW_RUNTIME_PROCESSES\)"):
        load_settings(None, {"IOTFLOW_RUNTIME_PROCESSES": value})


def test_each_child_gets_its_own_client_id_port_and_notify_socket(settings: Settings) -> None:
    settings.http.port = 9100
    env = child_env(settings, 2, "@sock")
    assert env["IOTFLOW_MQTT_CLIENT_ID"] == f"{settings.mqtt.client_id}-2"
    assert env["IOTFLOW_HTTP_PORT"] == "9102" and env["NOTIFY_SOCKET"] == "@sock"
    assert env["IOTFLOW_RUNTIME_PROCESSES"] == "1" and "WATCHDOG_PID" not in env
    settings.http.port = 0
    assert child_env(settings, 1, "@sock")["IOTFLOW_HTTP_PORT"] == "0"
    assert group_problem(settings, 1) is None and group_problem(settings, 2) is not None
    settings.mqtt.shared_group = "iotflow"
    assert group_problem(settings, 2) is None


def test_each_child_has_a_data_dir_of_its_own_and_journals_left_behind_are_named(tmp_path: Path) -> None:
    """Both mode's journal takes a lock (one writer per file), so children must not share
    storage.data_dir; a journal a run with another process count wrote is not replayed
    by this one, and is named at start."""
    settings = load_settings(environ={"IOTFLOW_STORAGE_DATA_DIR": str(tmp_path)})
    assert child_env(settings, 0, "@n")["IOTFLOW_STORAGE_DATA_DIR"] == str(tmp_path / "process-0")
    assert child_env(settings, 1, "@n")["IOTFLOW_STORAGE_DATA_DIR"] == str(tmp_path / "process-1")

    single = tmp_path / "outbox-postgres.journal"
    third = tmp_path / "process-2" / "outbox-postgres.journal"
    first = tmp_path / "process-0" / "outbox-postgres.journal"
    for journal in (single, third, first):
        journal.parent.mkdir(exist_ok=True)
        journal.write_bytes(b"x")
    (tmp_path / "process-1").mkdir()
    (tmp_path / "process-1" / "outbox-postgres.journal").write_bytes(b"")  # drained: nothing left
    assert left_behind(settings, 2) == [single, third]
    assert left_behind(settings, 3) == [single]
    assert left_behind(settings, 1) == [first, third]


async def test_a_sighup_to_the_parent_reloads_every_child_and_the_group_runs_on(settings: Settings) -> None:
    async with worker_process(settings, **_group(settings)) as worker:
        await worker.wait_for_event("processes.ready")
        worker.process.send_signal(signal.SIGHUP)
        await worker.wait_for_event("reload.done", process=0)
        await worker.wait_for_event("reload.done", process=1)
        assert await worker.terminate() == 0
    assert "processes.child_exited" not in worker.events()
