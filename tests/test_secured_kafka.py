"""Kafka over SASL_SSL (and SSL with a client certificate) on the suite's real Kafka: its
secured listeners beside the plain one, certificates from `iotflow certs`, SCRAM users from
Kafka's own storage tool. The bridge, Kafka intake, `migrate` and `check` connect with the
same settings; a wrong password, an untrusted CA or a refused client certificate is exit 2
and one line naming the setting; the password is in no log line, metric or /readyz body."""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.conftest import KAFKA_PASSWORD, KAFKA_USER, worker_env
from worker.config import ConfigError, Settings, load_settings
from worker.ops.certs import CertStore
from worker.tools.embedded import free_port
from worker.tools.servers import KafkaServer

from .helpers import iotflow_process, publish, wait_for_count, wait_ready, worker_process
from .kafka import kafka_settings, produce, read_topic
from .test_end_to_end import simulated_messages
from .test_kafka_intake import envelopes, expected_rows, kafka_env

TIMEOUT_S = 60  # generous: the verdict is the exit code or the rows, not how fast they came


def secured_env(
    kafka: KafkaServer, certs: CertStore, mechanism: str = "SCRAM-SHA-512", **env: str
) -> dict[str, str]:
    """The environment of a worker on the SASL_SSL listener, the password given directly."""
    return {
        "IOTFLOW_KAFKA_BOOTSTRAP": kafka.sasl_ssl_bootstrap,
        "IOTFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "IOTFLOW_KAFKA_SASL_MECHANISM": mechanism,
        "IOTFLOW_KAFKA_USERNAME": KAFKA_USER,
        "IOTFLOW_KAFKA_PASSWORD": KAFKA_PASSWORD,
        "IOTFLOW_KAFKA_CA_FILE": str(certs.cert_path("ca")),
        **env,
    }


def topics_env(settings: Settings) -> dict[str, str]:
    return {
        "IOTFLOW_KAFKA_RAW_TOPIC": settings.kafka.raw_topic,
        "IOTFLOW_KAFKA_PROCESSED_TOPIC": settings.kafka.processed_topic,
        "IOTFLOW_KAFKA_GROUP": settings.kafka.group,
        "IOTFLOW_KAFKA_REQUEST_TIMEOUT_MS": "5000",
    }


def password_file(directory: Path, text: str) -> str:
    path = directory / "kafka-password"
    path.write_text(text + "\n")
    return str(path)


async def test_secured_kafka_bridge_moves_data_over_sasl_ssl_and_the_password_shows_nowhere(
    settings: Settings,
    pg: asyncpg.Connection,
    kafka_server: KafkaServer,
    store_certs: CertStore,
    tmp_path: Path,
) -> None:
    """The bridge as a process, its password from `password_file`: the messages reach Kafka
    (read back on the plain listener), and neither its output, /metrics nor /readyz holds it."""
    settings = await kafka_settings(settings, kafka_server.bootstrap, bridge=True)
    port = free_port()
    env = secured_env(
        kafka_server,
        store_certs,
        "SCRAM-SHA-256",
        IOTFLOW_KAFKA_BRIDGE="true",
        IOTFLOW_KAFKA_PASSWORD="",
        IOTFLOW_KAFKA_PASSWORD_FILE=password_file(tmp_path, KAFKA_PASSWORD),
        IOTFLOW_HTTP_ENABLED="true",
        IOTFLOW_HTTP_HOST="127.0.0.1",
        IOTFLOW_HTTP_PORT=str(port),
        IOTFLOW_LOG_LEVEL="debug",
        **topics_env(settings),
    )
    messages = simulated_messages(40)
    bodies: list[str] = []
    async with worker_process(settings, **env) as worker, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(http, base, bodies, TIMEOUT_S)
        await publish(settings.mqtt.url, messages)
        await wait_for_count(
            pg, "SELECT count(*) FROM decoded_data", expected_rows(messages), timeout=TIMEOUT_S
        )
        async with http.get(f"{base}/metrics") as response:
            bodies.append(await response.text())
        assert await worker.terminate() == 0
        output = worker.output
    raw = await read_topic(kafka_server.bootstrap, settings.kafka.raw_topic)
    assert len(raw) == len(messages)
    assert '"kafka":true' in bodies[-2].replace(" ", ""), bodies[-2]
    for text in (output, *bodies):
        assert KAFKA_PASSWORD not in text


async def test_secured_kafka_intake_reads_over_sasl_ssl_with_plain_login(
    settings: Settings, pg: asyncpg.Connection, kafka_server: KafkaServer, store_certs: CertStore
) -> None:
    """Kafka intake's consumer (in the daemon's process) with SASL PLAIN over TLS."""
    from .helpers import running_daemon

    settings = await kafka_settings(settings, kafka_server.bootstrap)
    messages = simulated_messages(60)
    await produce(kafka_server.bootstrap, settings.kafka.raw_topic, envelopes(messages))
    settings.intake = replace(settings.intake, source="kafka")
    settings.kafka = replace(
        settings.kafka,
        bootstrap=kafka_server.sasl_ssl_bootstrap,
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        username=KAFKA_USER,
        password=KAFKA_PASSWORD,
        ca_file=str(store_certs.cert_path("ca")),
    )
    async with running_daemon(settings):
        await wait_for_count(
            pg, "SELECT count(*) FROM decoded_data", expected_rows(messages), timeout=TIMEOUT_S
        )


async def test_secured_kafka_migrate_and_check_use_the_same_settings(
    settings: Settings, kafka_server: KafkaServer, store_certs: CertStore
) -> None:
    """`iotflow check` says the topics are missing, `iotflow migrate` creates them, both over
    SASL_SSL with SCRAM-SHA-512; neither prints the password."""
    tag = uuid.uuid4().hex[:8]
    env = {
        **worker_env(settings),
        **secured_env(kafka_server, store_certs),
        "IOTFLOW_KAFKA_BRIDGE": "true",
        "IOTFLOW_KAFKA_RAW_TOPIC": f"raw-secured-{tag}",
        "IOTFLOW_KAFKA_PROCESSED_TOPIC": f"processed-secured-{tag}",
    }
    outputs = []
    for command, expected_code, expected in (
        ("check", 1, "not migrated"),
        ("migrate", 0, ""),
        ("check", 0, f"migrated (topics raw-secured-{tag}"),
    ):
        async with iotflow_process(env, command) as process:
            code = await process.wait(timeout=120)
            outputs.append(process.output)
        assert code == expected_code, process.output[-3000:]
        if command == "check":
            (line,) = [line for line in process.output.splitlines() if line.startswith("kafka ")]
            assert line.split()[1] == "reachable" and expected in line, line
    assert not any(KAFKA_PASSWORD in output for output in outputs)


def _untrusted_ca(directory: Path) -> str:
    other = CertStore(directory / "other-ca")
    other.init(common_name="Not the Kafka CA")
    return str(other.cert_path("ca"))


@pytest.mark.parametrize(
    ("case", "setting"),
    [
        ("wrong-password", "kafka.password"),
        ("untrusted-ca", "kafka.ca_file"),
        ("no-client-certificate", "kafka.cert_file"),
        ("intake-wrong-password", "kafka.password"),
    ],
)
async def test_secured_kafka_refusals_exit_2_with_one_line_naming_the_setting(
    settings: Settings,
    kafka_server: KafkaServer,
    store_certs: CertStore,
    tmp_path: Path,
    case: str,
    setting: str,
) -> None:
    settings = await kafka_settings(settings, kafka_server.bootstrap, bridge=True)
    wrong = f"wrong-{uuid.uuid4().hex}"
    secured = secured_env(kafka_server, store_certs)
    env = {**topics_env(settings), **secured, "IOTFLOW_KAFKA_BRIDGE": "true"}
    if case == "wrong-password":
        env["IOTFLOW_KAFKA_PASSWORD"] = wrong
    elif case == "untrusted-ca":
        env["IOTFLOW_KAFKA_CA_FILE"] = _untrusted_ca(tmp_path)
    elif case == "no-client-certificate":  # the MTLS listener wants one from the CA
        env = {
            **topics_env(settings),
            "IOTFLOW_KAFKA_BRIDGE": "true",
            "IOTFLOW_KAFKA_BOOTSTRAP": kafka_server.mtls_bootstrap,
            "IOTFLOW_KAFKA_SECURITY_PROTOCOL": "SSL",
            "IOTFLOW_KAFKA_CA_FILE": str(store_certs.cert_path("ca")),
        }
    elif case == "intake-wrong-password":  # the consumer's refusal, in the intake actor
        env = {**kafka_env(settings), **secured, "IOTFLOW_KAFKA_PASSWORD": wrong}
    async with worker_process(settings, **env) as worker:
        code = await worker.wait(TIMEOUT_S)
        lines = worker.records()
        output = worker.output
    assert code == 2, output[-3000:]
    errors = [line for line in lines if line.get("level") == "error"]
    assert [e["event"] for e in errors][-1] == "daemon.stopped", errors
    (refused,) = errors[:-1]
    assert refused["event"] in ("stores.refused", "supervisor.refused"), errors
    assert str(refused["error"]).startswith(setting) or f": {setting}:" in str(refused["error"]), refused
    assert not any(line.get("event") in ("stores.waiting", "supervisor.restarting") for line in lines)
    assert KAFKA_PASSWORD not in output and wrong not in output


async def test_secured_kafka_migrate_with_a_wrong_password_is_one_line_and_exit_2(
    settings: Settings, kafka_server: KafkaServer, store_certs: CertStore
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    env = {
        **worker_env(settings),
        **secured_env(kafka_server, store_certs, IOTFLOW_KAFKA_PASSWORD=wrong, IOTFLOW_KAFKA_BRIDGE="true"),
        "IOTFLOW_LOG_LEVEL": "warning",
    }
    async with iotflow_process(env, "migrate") as process:
        code = await process.wait(timeout=120)
    assert code == 2, process.output[-3000:]
    (line,) = process.output.strip().splitlines()
    assert line.startswith("iotflow migrate: kafka.password: ") and KAFKA_USER in line, line
    assert wrong not in process.output and "Traceback" not in process.output


async def test_secured_kafka_mtls_client_certificate_is_accepted(
    kafka_server: KafkaServer, store_certs: CertStore
) -> None:
    from worker.stores.kafka import describe_cluster

    settings = load_settings(
        environ={
            "IOTFLOW_KAFKA_BOOTSTRAP": kafka_server.mtls_bootstrap,
            "IOTFLOW_KAFKA_SECURITY_PROTOCOL": "SSL",
            "IOTFLOW_KAFKA_CA_FILE": str(store_certs.cert_path("ca")),
            "IOTFLOW_KAFKA_CERT_FILE": str(store_certs.cert_path("iotflow-worker")),
            "IOTFLOW_KAFKA_KEY_FILE": str(store_certs.key_path("iotflow-worker")),
        }
    )
    brokers, _ = await describe_cluster(settings.kafka, 10)
    assert brokers == 1


# --- the settings, checked when loaded --------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "setting"),
    [
        ({"IOTFLOW_KAFKA_SECURITY_PROTOCOL": "TLS"}, "kafka.security_protocol"),
        ({"IOTFLOW_KAFKA_SASL_MECHANISM": "OAUTHBEARER"}, "kafka.sasl_mechanism"),
        ({"IOTFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "kafka.username"),
        ({"IOTFLOW_KAFKA_USERNAME": "iotflow", "IOTFLOW_KAFKA_PASSWORD": "x"}, "kafka.security_protocol"),
        ({"IOTFLOW_KAFKA_CA_FILE": "/etc/hostname"}, "kafka.security_protocol"),
        ({"IOTFLOW_KAFKA_SECURITY_PROTOCOL": "SSL", "IOTFLOW_KAFKA_CERT_FILE": "/etc/hostname"}, "kafka.cert_file"),
        ({"IOTFLOW_KAFKA_SECURITY_PROTOCOL": "SSL", "IOTFLOW_KAFKA_CA_FILE": "/nonexistent/ca.pem"}, "kafka.ca_file"),
        (
            {"IOTFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "IOTFLOW_KAFKA_USERNAME": "iotflow",
             "IOTFLOW_KAFKA_PASSWORD_FILE": "/nonexistent/kafka-password"},
            "kafka.password_file",
        ),
    ],
)  # fmt: skip
def test_secured_kafka_settings_refuse_what_cannot_work(environ: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ=environ)
    assert raised.value.setting.startswith(setting), raised.value
    assert "\n" not in str(raised.value)


def test_secured_kafka_password_file_is_read_once_its_newline_stripped(tmp_path: Path) -> None:
    settings = load_settings(
        environ={
            "IOTFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "IOTFLOW_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "IOTFLOW_KAFKA_USERNAME": "iotflow",
            "IOTFLOW_KAFKA_PASSWORD_FILE": password_file(tmp_path, "s3cret"),
        }
    )
    assert settings.kafka.password == "s3cret"
    assert "s3cret" not in repr(settings.kafka)


@pytest.mark.parametrize("extra", [[], ["--kafka", "--kafka-bootstrap", "127.0.0.1:9092"]])
def test_secured_kafka_bench_tls_needs_the_bench_s_own_kafka(extra: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "bench", "--kafka-tls", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "iotflow bench: --kafka-tls needs --kafka and the bench's own Kafka (no --kafka-bootstrap)"
    )
