"""Settings come from TOML and IOTFLOW_* variables; bad ones say which, what and an example."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from worker.config import ConfigError, Settings, describe_settings, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "iotflow.toml"
    path.write_text(text)
    return path


def test_defaults_follow_the_spec() -> None:
    settings = load_settings(None, environ={})
    assert settings.mqtt.topics == ["tele/+/+/+/+", "stat/+/+/+/+", "devices/+/telemetry"]
    assert settings.pipeline.unknown_devices == "reject"
    assert settings.pipeline.max_new_datapoints_per_hour == 20


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nurl = "mqtt://file:1883"\nclient_id = "from-file"\n')
    settings = load_settings(path, environ={"IOTFLOW_MQTT_URL": "mqtts://env:8883"})
    assert settings.mqtt.url == "mqtts://env:8883"
    assert settings.mqtt.client_id == "from-file"


def test_environment_values_are_typed() -> None:
    settings = load_settings(
        None,
        environ={
            "IOTFLOW_PIPELINE_BATCH_SIZE": "250",
            "IOTFLOW_HTTP_ENABLED": "no",
            "IOTFLOW_MQTT_TOPICS": "a/+, b/#",
            "IOTFLOW_RUNTIME_SHUTDOWN_TIMEOUT_S": "2.5",
            "IOTFLOW_PIPELINE_MAX_NEW_DATAPOINTS_PER_HOUR": "5",
        },
    )
    assert settings.pipeline.max_new_datapoints_per_hour == 5
    assert settings.pipeline.batch_size == 250
    assert settings.http.enabled is False
    assert settings.mqtt.topics == ["a/+", "b/#"]
    assert settings.runtime.shutdown_timeout_s == 2.5


@pytest.mark.parametrize(
    ("environ", "setting", "problem"),
    [
        ({"IOTFLOW_MQTT_URL": "http://x"}, "mqtt.url (IOTFLOW_MQTT_URL)", "scheme mqtt or mqtts"),
        ({"IOTFLOW_PIPELINE_BATCH_SIZE": "lots"}, "pipeline.batch_size", "not an integer"),
        ({"IOTFLOW_PIPELINE_BATCH_SIZE": "0"}, "pipeline.batch_size", "greater than 0"),
        ({"IOTFLOW_PIPELINE_UNKNOWN_DEVICES": "maybe"}, "pipeline.unknown_devices", "reject, register"),
        ({"IOTFLOW_POSTGRES_SCHEMA": "Bad-Name"}, "postgres.schema", "SQL identifier"),
        ({"IOTFLOW_HTTP_ENABLED": "perhaps"}, "http.enabled", "not a boolean"),
        ({"IOTFLOW_MQTT_CA_FILE": "/nonexistent.pem"}, "mqtt.ca_file", "does not exist"),
        ({"IOTFLOW_MQTT_CERT_FILE": "/etc/hostname"}, "mqtt.cert_file", "given together"),
        ({"IOTFLOW_MQTT_SESSION_EXPIRY_S": "0"}, "mqtt.session_expiry_s", "between 1 and"),
        ({"IOTFLOW_MQTT_CLIENT_ID": ""}, "mqtt.client_id", "must not be empty"),
        ({"IOTFLOW_MQTT_KEEPALIVE_S": "70000"}, "mqtt.keepalive_s", "between 1 and 65535"),
        ({"IOTFLOW_MQTT_RECEIVE_MAXIMUM": "70000"}, "mqtt.receive_maximum", "between 1 and 65535"),
        ({"IOTFLOW_MQTT_TOPICS": "devices/#/x"}, "mqtt.topics", "whole last level"),
        ({"IOTFLOW_MQTT_TOPICS": "a/b+"}, "mqtt.topics", "whole level"),
        ({"IOTFLOW_MQTT_SHARED_GROUP": "a/b"}, "mqtt.shared_group", "must not contain"),
        (
            {"IOTFLOW_PIPELINE_MAX_NEW_DATAPOINTS_PER_HOUR": "0"},
            "pipeline.max_new_datapoints_per_hour",
            "than 0",
        ),
    ],
)
def test_bad_values_name_the_setting_and_give_an_example(
    environ: dict[str, str], setting: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ=environ)
    assert caught.value.setting.startswith(setting.split(" ")[0])
    assert problem in caught.value.problem
    assert caught.value.example


def test_unknown_keys_in_the_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mqtt.urll: unknown setting"):
        load_settings(write(tmp_path, '[mqtt]\nurll = "mqtt://x"\n'), environ={})
    with pytest.raises(ConfigError, match="unknown section"):
        load_settings(write(tmp_path, "[mqqt]\n"), environ={})


def test_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[mqtt\n"), environ={})


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_cli_exits_2_with_the_message_on_a_bad_setting() -> None:
    result = run_cli("run", env={"IOTFLOW_PIPELINE_FLUSH_INTERVAL_MS": "-5"})
    assert result.returncode == 2
    assert "pipeline.flush_interval_ms (IOTFLOW_PIPELINE_FLUSH_INTERVAL_MS)" in result.stderr
    assert "example: 100" in result.stderr


def test_cli_exits_2_on_a_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("--config", str(tmp_path / "absent.toml"), "run")
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_cli_exits_2_on_a_broken_codec_file(tmp_path: Path) -> None:
    codecs = tmp_path / "codecs.toml"
    codecs.write_text('[climate]\nlength = 2\nfields = [{ name = "t", offset = 1, type = "int16be" }]\n')
    result = run_cli("run", env={"IOTFLOW_PIPELINE_CODECS": str(codecs)})
    assert result.returncode == 2
    assert "codec 'climate' field 't'" in result.stderr


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda tmp: tmp, "is not a file"),
        (lambda tmp: _written(tmp / "latin1.toml", b'[mqtt]\nclient_id = "caf\xe9"\n'), "not UTF-8"),
        (lambda tmp: _written(tmp / "nul.toml", b"[mqtt]\x00\n"), "not valid TOML"),
    ],
    ids=["directory", "not-utf8", "not-toml"],
)
def test_cli_exits_2_naming_the_file_whatever_makes_it_unusable(
    tmp_path: Path, make: Callable[[Path], Path], problem: str
) -> None:
    path = make(tmp_path)
    result = run_cli("--config", str(path), "run")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and problem in lines[0], lines


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_example_file_is_exactly_the_defaults() -> None:
    example = Path(__file__).parent.parent / "deploy" / "iotflow.example.toml"
    assert dataclasses.asdict(load_settings(example, environ={})) == dataclasses.asdict(Settings())


def test_the_reference_table_and_the_example_file_list_every_setting() -> None:
    """docs/configuration.md's table is generated from describe_settings(): keep it so."""
    root = Path(__file__).parent.parent
    table = (root / "docs" / "configuration.md").read_text(encoding="utf-8")
    example = tomllib.loads((root / "deploy" / "iotflow.example.toml").read_text(encoding="utf-8"))
    for setting, variable, default, _ in describe_settings():
        assert f"| `{setting}` | `{variable}` | `{default}` |" in table, setting
        section, key = setting.split(".")
        assert repr(example[section][key]) == default, f"example file: {setting}"


def test_notification_channels_come_from_tables_or_a_json_list(tmp_path: Path) -> None:
    secret = tmp_path / "hook-secret"
    secret.write_text("from-a-file\n")
    path = write(
        tmp_path,
        '[notify]\nalertmanager_urls = ["http://am-1:9093", "http://am-2:9093"]\n'
        f'[[notify.webhooks]]\nurl = "https://hooks.example.com/a"\nsecret_file = "{secret}"\n'
        'users = [7]\nrules = ["global/offline"]\n',
    )
    notify = load_settings(path, environ={}).notify
    assert notify.alertmanager_urls == ["http://am-1:9093", "http://am-2:9093"]
    (hook,) = notify.webhooks
    assert (hook.secret, hook.users, hook.rules) == ("from-a-file", [7], ["global/offline"])
    assert hook.channel == "webhook https://hooks.example.com/a"
    env = {"IOTFLOW_NOTIFY_WEBHOOKS": '[{"url": "http://h/x", "name": "ops", "secret": "k"}]'}
    (hook,) = load_settings(path, environ=env).notify.webhooks
    assert (hook.channel, hook.secret) == ("webhook ops", "k")


@pytest.mark.parametrize(
    ("table", "setting", "problem"),
    [
        ('url = "https://h/x"', "notify.webhooks[0].secret", "is required (or secret_file)"),
        ('secret = "k"', "notify.webhooks[0].url", "is required"),
        ('url = "ftp://h/x"\nsecret = "k"', "notify.webhooks[0].url", "must be a URL with scheme"),
        ('url = "https://h/x"\nsecret = "k"\nusers = ["bob"]', "notify.webhooks[0].users", "not an integer"),
        ('url = "https://h/x"\nsecret = "k"\nheaders = 1', "notify.webhooks[0].headers", "unknown setting"),
    ],
)
def test_a_bad_webhook_names_its_setting(tmp_path: Path, table: str, setting: str, problem: str) -> None:
    path = write(tmp_path, f"[[notify.webhooks]]\n{table}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert caught.value.setting == setting and problem in caught.value.problem


def test_an_alertmanager_url_must_be_http(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={"IOTFLOW_NOTIFY_ALERTMANAGER_URLS": "am-1:9093"})
    assert caught.value.setting.startswith("notify.alertmanager_urls")
