"""The bench's own processes against the test broker: what the publishers send, the ceiling takes."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from worker.config import Settings
from worker.tools.bench import Publishers, _children, cpu_seconds


def test_the_ceiling_takes_and_acknowledges_every_message_two_publishers_send(settings: Settings) -> None:
    total = 600  # below a stock Mosquitto's queue of 1000, should the ceiling lag
    command = ["worker.tools.bench_ceiling", settings.mqtt.url, str(total), "60"]
    ceiling = subprocess.Popen(
        [sys.executable, "-m", *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    publishers = None
    try:
        assert ceiling.stdout is not None and ceiling.stdin is not None
        assert ceiling.stdout.readline().strip() == b"ready"
        publishers = Publishers(settings, total, 8, 2)
        started = publishers.go()
        assert publishers.wait(started) > 0  # each waited for the broker's PUBACK of all it sent
        result = orjson.loads(ceiling.stdout.readline())
        assert result["received"] == total and result["last"] > started
        assert cpu_seconds([ceiling.pid]) > 0  # read while it waits for its stdin to end
        ceiling.stdin.close()
        assert ceiling.wait(30) == 0
    finally:
        if publishers is not None:
            publishers.kill()
        if ceiling.poll() is None:
            ceiling.kill()
            ceiling.wait()


def test_the_cpu_of_a_process_tree_comes_from_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.pid in _children(os.getpid())
        assert cpu_seconds([os.getpid()]) > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
