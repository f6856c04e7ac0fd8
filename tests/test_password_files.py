"""`postgres.password_file`, `redis.password_file`, `mqtt.password_file`: passwords from files (systemd credentials)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import ConfigError, load_settings


def _secret(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_files_replace_the_url_passwords_keeping_the_user(tmp_path: Path) -> None:
    settings = load_settings(
        environ={
            "IOTFLOW_POSTGRES_URL": "postgresql://iotflow:old@db:5432/iotflow?sslmode=require",
            "IOTFLOW_POSTGRES_PASSWORD_FILE": _secret(tmp_path, "pg", "s3cr:t/@%\n"),
            "IOTFLOW_REDIS_URL": "redis://cache:6379/2",
            "IOTFLOW_REDIS_PASSWORD_FILE": _secret(tmp_path, "redis", "r3dis"),
        }
    )
    assert settings.postgres.url == "postgresql://iotflow:s3cr%3At%2F%40%25@db:5432/iotflow?sslmode=require"
    assert settings.redis.url == "redis://:r3dis@cache:6379/2"


def test_an_empty_file_or_none_changes_nothing(tmp_path: Path) -> None:
    url = "postgresql://iotflow:kept@db/iotflow"
    settings = load_settings(
        environ={"IOTFLOW_POSTGRES_URL": url, "IOTFLOW_POSTGRES_PASSWORD_FILE": _secret(tmp_path, "pg", "\n")}
    )
    assert settings.postgres.url == url
    assert load_settings(environ={"IOTFLOW_POSTGRES_URL": url}).postgres.url == url


def test_a_missing_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"IOTFLOW_REDIS_PASSWORD_FILE": str(tmp_path / "nothing")})
    assert caught.value.setting == "redis.password_file"
    assert "does not exist" in caught.value.problem


def test_the_mqtt_file_becomes_the_password_setting_and_a_missing_one_names_it(tmp_path: Path) -> None:
    settings = load_settings(environ={"IOTFLOW_MQTT_PASSWORD_FILE": _secret(tmp_path, "mqtt", "s3cr:t\n")})
    assert settings.mqtt.password == "s3cr:t" and settings.mqtt.url == "mqtt://127.0.0.1:1883"
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"IOTFLOW_MQTT_PASSWORD_FILE": str(tmp_path / "nothing")})
    assert caught.value.setting == "mqtt.password_file"
