"""Passwords from files (systemd credentials): `postgres.password_file`, `redis.password_file`,
`documents.mongodb_password_file`, `mqtt.password_file`, and the `$CREDENTIALS_DIRECTORY` rule."""

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


def test_a_relative_file_is_a_credential_in_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd's LoadCredential= puts the files in $CREDENTIALS_DIRECTORY: a relative name finds them."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    _secret(tmp_path, "postgres-password", "from-systemd\n")
    _secret(tmp_path, "mqtt-password", "broker\n")
    settings = load_settings(
        environ={
            "IOTFLOW_POSTGRES_PASSWORD_FILE": "postgres-password",
            "IOTFLOW_MQTT_PASSWORD_FILE": "mqtt-password",
        }
    )
    assert settings.postgres.url == "postgresql://postgres:from-systemd@127.0.0.1:5432/postgres"
    assert settings.mqtt.password == "broker"
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"IOTFLOW_REDIS_PASSWORD_FILE": "redis-password"})
    assert caught.value.setting == "redis.password_file"
    assert f"{tmp_path / 'redis-password'} ($CREDENTIALS_DIRECTORY/redis-password) does not exist" in str(
        caught.value
    )


def test_the_mongodb_file_replaces_the_url_password(tmp_path: Path) -> None:
    url = "mongodb://iotflow:old@mongo-1:27017,mongo-2:27017/?tls=true&tlsCAFile=/etc/iotflow/ca.crt"
    settings = load_settings(
        environ={
            "IOTFLOW_DOCUMENTS_MONGODB_URL": url,
            "IOTFLOW_DOCUMENTS_MONGODB_PASSWORD_FILE": _secret(tmp_path, "mongo", "n3w@pw\n"),
        }
    )
    assert settings.documents.mongodb_url == url.replace(":old@", ":n3w%40pw@")


def test_an_unreadable_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"IOTFLOW_DOCUMENTS_MONGODB_PASSWORD_FILE": str(tmp_path)})  # a directory
    assert caught.value.setting == "documents.mongodb_password_file"
    assert "cannot be read" in caught.value.problem
