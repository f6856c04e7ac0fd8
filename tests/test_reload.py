"""SIGHUP: the running daemon reloads what can change safely and names what cannot.

`iotflow run` as a process with a settings file the test edits between signals, against
the real broker and stores; it keeps running through every reload and stops with 0.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import asyncpg
import orjson

from worker.config import Settings
from worker.decode.codecs import builtin_codec_path, load_codecs
from worker.reload import changed_settings, needs_restart

from .helpers import IotflowProcess, publish, wait_for_count, worker_process

GAUGE = """
[gauge]
length = 2
fields = [{ name = "level", offset = 0, type = "uint16be", unit = "cm" }]
"""


def _config(codecs: Path, level: str = "info", extra: str = "") -> str:
    return f'[log]\nlevel = "{level}"\n\n[pipeline]\ncodecs = "{codecs}"\n{extra}'


async def _reload(worker: IotflowProcess, nth: int, event: str = "reload.done") -> dict[str, object]:
    worker.process.send_signal(signal.SIGHUP)
    return await worker.wait_for_event(event, nth=nth)


async def test_sighup_reloads_codecs_ranges_and_log_level_and_names_what_needs_a_restart(
    settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    mac = uuid.uuid4().hex[:12]
    topic = f"tele/f2-{mac}/sensor-mode"
    codecs = tmp_path / "codecs.toml"
    codecs.write_text(builtin_codec_path().read_text())
    config = tmp_path / "iotflow.toml"
    config.write_text(_config(codecs))
    climate = load_codecs()["climate"]

    def climate_payload(temperature: float, at: float) -> bytes:
        frame = climate.encode({"temperature": temperature, "humidity": 40.0, "pressure": 1000.0})
        return orjson.dumps({"timestamp": int(at * 1000), "data": frame.hex()})

    now = time.time()
    gauge_payload = orjson.dumps({"timestamp": int(now * 1000), "data": "0042"})

    def readings(label: str, what: str = "count(*)") -> str:
        return (
            f"SELECT {what} FROM decoded_data x JOIN datapoints p ON p.id = x.datapoint_id "
            f"JOIN devices d ON d.id = x.device_id WHERE d.mac IS NOT NULL AND p.label = '{label}'"
        )

    def dead(sensor: str, reason: str) -> str:
        return (
            f"SELECT count(*) FROM dead_letters WHERE topic = '{topic}/{sensor}' AND reason LIKE '{reason}:%'"
        )

    async with worker_process(
        settings, "--config", str(config), IOTFLOW_PIPELINE_UNKNOWN_DEVICES="register"
    ) as worker:
        await worker.wait_for_event("supervisor.ready")
        # Before: no codec for the gauge, and a lab temperature of 45 °C is plausible.
        await publish(settings.mqtt.url, [(f"{topic}/gauge/sensor-tank", gauge_payload)])
        await publish(settings.mqtt.url, [(f"{topic}/climate/sensor-lab", climate_payload(45, now))])
        await wait_for_count(pg, dead("gauge/sensor-tank", "unknown_codec"), 1)
        await wait_for_count(pg, readings("lab.temperature"), 1)

        # The codec file gains the gauge; the lab's temperature datapoint a range.
        codecs.write_text(builtin_codec_path().read_text() + GAUGE)
        await pg.execute("UPDATE datapoints SET max_value = 40 WHERE label = 'lab.temperature'")
        done = await _reload(worker, 1)
        assert "gauge" in done["codecs"] and done["changed"] == []  # type: ignore[operator]
        await publish(settings.mqtt.url, [(f"{topic}/gauge/sensor-tank", gauge_payload)])
        await wait_for_count(pg, readings("tank.level"), 1)
        assert await pg.fetchval(readings("tank.level", "max(x.value)")) == 66
        await publish(settings.mqtt.url, [(f"{topic}/climate/sensor-lab", climate_payload(46, now + 1))])
        await wait_for_count(pg, dead("climate/sensor-lab", "out_of_range"), 1)

        # A setting held by what was built at start: named, not applied.
        config.write_text(_config(codecs, extra="max_payload_bytes = 4096\n"))
        await _reload(worker, 2)
        restart = await worker.wait_for_event("reload.restart_needed", nth=1)
        assert restart["settings"] == ["pipeline.max_payload_bytes"]

        # A broken file: one error line, the running settings stay, the daemon goes on.
        config.write_text(_config(codecs, level="loud"))
        failed = await _reload(worker, 1, "reload.failed")
        assert "log.level" in str(failed["error"])
        assert worker.process.returncode is None

        # The log level: the reload's own line still shows, then info lines no longer do.
        config.write_text(_config(codecs, level="warning"))
        done = await _reload(worker, 3)
        assert done["log_level"] == "warning" and done["changed"] == ["log.level"]
        config.write_text(_config(codecs, level="warning", extra="max_payload_bytes = 4096\n"))
        await _reload(worker, 2, "reload.restart_needed")
        assert worker.events().count("reload.done") == 3  # the fourth was info: filtered now

        assert await worker.terminate() == 0


def test_only_the_log_level_and_the_codec_file_reload() -> None:
    running, loaded = Settings(), Settings()
    loaded.log.level = "debug"
    loaded.pipeline.codecs = "/etc/iotflow/codecs.toml"
    loaded.pipeline.batch_size = running.pipeline.batch_size + 1
    changed = changed_settings(running, loaded)
    assert changed == ["log.level", "pipeline.batch_size", "pipeline.codecs"]
    assert needs_restart(changed) == ["pipeline.batch_size"]
