"""`iotflow simulate` logs in as the worker does: `mqtt.username` and `mqtt.password_file`
win over the URL's credentials (docker-compose gives the simulator the `device` user this
way), and a refused login is one line and exit 2, not a minute of unacknowledged sends."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from .helpers import password_mosquitto
from .test_cli_errors import assert_one_line, iotflow


def _env(port: int, password_file: Path, url_login: str = "") -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "IOTFLOW_LOG_FORMAT": "json",
        "IOTFLOW_MQTT_URL": f"mqtt://{url_login}127.0.0.1:{port}",
        "IOTFLOW_MQTT_USERNAME": "device",
        "IOTFLOW_MQTT_PASSWORD_FILE": str(password_file),
    }


def test_simulate_logs_in_with_the_username_and_password_file_settings(tmp_path: Path) -> None:
    (tmp_path / "device-password").write_text("s3cr:t/@\n")
    with password_mosquitto(tmp_path, "device", "s3cr:t/@") as port:
        result = iotflow(
            _env(port, tmp_path / "device-password"),
            "simulate",
            "--devices",
            "2",
            "--count",
            "20",
            "--rate",
            "0",
        )
    assert result.returncode == 0, result.stderr
    done = [
        record
        for line in (result.stdout + result.stderr).splitlines()
        if line.startswith("{") and (record := orjson.loads(line)).get("event") == "simulate.done"
    ]
    # Every message acknowledged by a broker that admits no one but `device`.
    assert [(d["sent"], d["confirmed"]) for d in done] == [(20, True)], result.stdout + result.stderr


def test_a_refused_login_is_exit_2_and_one_line_without_the_password(tmp_path: Path) -> None:
    (tmp_path / "device-password").write_text("wrong-one\n")
    with password_mosquitto(tmp_path, "device", "s3cr:t") as port:
        # The URL's right credentials lose to the settings, as for the worker.
        env = _env(port, tmp_path / "device-password", url_login="device:s3cr%3At@")
        result = iotflow(env, "simulate", "--devices", "1", "--count", "5", "--rate", "0")
    line = assert_one_line(result, 2, "mqtt broker at", "refused the login", "mqtt.password_file")
    assert "wrong-one" not in result.stdout + result.stderr and "s3cr" not in line, line
