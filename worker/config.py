"""Settings: one typed tree, read from an optional TOML file and `IOTFLOW_*` variables.

Every setting lives in a section dataclass below. A setting `section.key` is read
from the TOML table `[section]` and from the variable `IOTFLOW_SECTION_KEY`; the
environment wins. Values are checked when loaded: a bad one raises `ConfigError`
naming the setting, what was wrong and an example, and the CLI exits 2 on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlparse, urlsplit, urlunsplit

from worker import extras

ENV_PREFIX = "IOTFLOW_"
CONFIG_ENV = "IOTFLOW_CONFIG"  # the settings file, when `--config` does not name one

SPEC_TOPICS = ("tele/+/+/+/+", "stat/+/+/+/+", "devices/+/telemetry")


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range."""

    def __init__(self, setting: str, problem: str, example: str) -> None:
        self.setting = setting
        self.problem = problem
        self.example = example
        super().__init__(f"{setting}: {problem} (example: {example})")


class ExtraMissing(ConfigError):
    """A setting asks for a backend whose extra is not installed (worker/extras.py)."""

    def __init__(self, setting: str, value: str, extra: str) -> None:
        super().__init__(setting, f"{value} {extras.needs(extra)}", extras.pip_line(extra))
        # One line that ends in what to run, rather than an "example".
        self.args = (f"{setting} = {self.problem}",)


def _meta(example: str, check: Callable[[Any], str | None] | None = None, doc: str = "") -> Any:
    return {"example": example, "check": check, "doc": doc}


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _url(*schemes: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        parsed = urlparse(value)
        if parsed.scheme not in schemes or not parsed.hostname:
            return f"must be a URL with scheme {' or '.join(schemes)} and a host"
        return None

    return check


def _between(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}"

    return check


def _non_empty(value: Any) -> str | None:
    return None if value.strip() else "must not be empty"


def _topic_filters(value: Any) -> str | None:
    for topic in value:
        levels = topic.split("/")
        if not topic or "\x00" in topic or len(topic.encode()) > 65535:
            return f"{topic!r} is not a topic filter"
        for index, level in enumerate(levels):
            if ("#" in level and (level != "#" or index != len(levels) - 1)) or (
                "+" in level and level != "+"
            ):
                return f"{topic!r}: '+' must be a whole level and '#' the whole last level"
    return None


def _processes(value: Any) -> str | None:
    return None if value == "auto" or value >= 1 else "must be 1 or more, or auto"


def _share_name(value: Any) -> str | None:
    return None if not set(value) & set("/+#") else "must not contain '/', '+' or '#'"


def _identifier(value: Any) -> str | None:
    return None if value.isidentifier() and value.islower() else "must be a lower-case SQL identifier"


@dataclass
class MqttSettings:
    url: str = field(
        default="mqtt://127.0.0.1:1883",
        metadata=_meta("mqtts://user:secret@broker:8883", _url("mqtt", "mqtts"), "broker URL"),
    )
    topics: list[str] = field(
        default_factory=lambda: list(SPEC_TOPICS),
        metadata=_meta('["tele/+/+/+/+", "devices/+/telemetry"]', _topic_filters, doc="topic filters"),
    )
    client_id: str = field(
        default="iotflow-worker",
        metadata=_meta("iotflow-gw-1", _non_empty, doc="stable id: the broker keeps the session under it"),
    )
    shared_group: str = field(
        default="",
        metadata=_meta(
            "iotflow", _share_name, doc="subscribe as $share/{group}/… so workers split one stream"
        ),
    )
    session_expiry_s: int = field(
        default=86400,
        # 0 would let the broker drop the session, and the messages waiting in it, at every disconnect.
        metadata=_meta("86400", _between(1, 2**32 - 1), doc="how long the broker keeps the session"),
    )
    receive_maximum: int = field(
        # 5000: what the process holds under a flood keeps 20,000 devices with 200,000 rules
        # under 150 MB; 10000 saves about 6% CPU (docs/performance.md, "Memory").
        default=5000,
        metadata=_meta("5000", _between(1, 65535), doc="unacknowledged messages the broker may send"),
    )
    keepalive_s: int = field(default=30, metadata=_meta("30", _between(1, 65535)))
    connect_timeout_s: float = field(
        default=10.0, metadata=_meta("10", _positive, doc="how long to wait for TCP, TLS and the CONNACK")
    )
    username: str = field(
        default="", metadata=_meta("iotflow-worker", doc="CONNECT's user name (over the URL's)")
    )
    password: str = field(
        default="",
        repr=False,  # never in a log line or a traceback
        metadata=_meta("secret", doc="CONNECT's password (over the URL's); better: password_file"),
    )
    password_file: str = field(
        default="",
        metadata=_meta(
            "/run/credentials/iotflow-worker.service/mqtt-password",
            doc="a file whose content is mqtt.password (empty file: no change)",
        ),
    )
    ca_file: str = field(default="", metadata=_meta("/etc/iotflow/ca.pem", doc="TLS CA"))
    cert_file: str = field(default="", metadata=_meta("/etc/iotflow/client.pem"))
    key_file: str = field(default="", metadata=_meta("/etc/iotflow/client.key"))
    reconnect_min_s: float = field(default=0.5, metadata=_meta("0.5", _positive))
    reconnect_max_s: float = field(default=30.0, metadata=_meta("30", _positive))


@dataclass
class PostgresSettings:
    url: str = field(
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        metadata=_meta("postgresql://iotflow:secret@db:5432/iotflow", _url("postgresql", "postgres")),
    )
    schema: str = field(default="iotflow", metadata=_meta("iot_schema", _identifier))
    timescale: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata=_meta(
            "auto",
            doc="decoded_data as a hypertable: auto (when installed and preloaded), on (migrate exits 2 "
            "when it cannot), off",
        ),
    )
    partition_days: int = field(
        default=1, metadata=_meta("1", _positive, doc="range partition width without TimescaleDB")
    )
    command_timeout_s: float = field(
        default=30.0,
        metadata=_meta(
            "30",
            _positive,
            doc="a statement unanswered this long is abandoned and retried (jobs: job_timeout_s)",
        ),
    )
    password_file: str = field(
        default="",
        metadata=_meta(
            "/run/credentials/iotflow-worker.service/postgres-password",
            doc="a file whose content replaces the password in postgres.url (empty file: no change)",
        ),
    )


@dataclass
class RedisSettings:
    url: str = field(
        default="redis://127.0.0.1:6379/0",
        metadata=_meta("redis://cache:6379/0", _url("redis", "rediss")),
    )
    key_prefix: str = field(default="", metadata=_meta("site1:", doc="prefix of every key and channel"))
    password_file: str = field(
        default="",
        metadata=_meta(
            "/run/credentials/iotflow-worker.service/redis-password",
            doc="a file whose content replaces the password in redis.url (empty file: no change)",
        ),
    )


@dataclass
class DocumentSettings:
    backend: Literal["postgres", "mongodb"] = field(
        default="postgres", metadata=_meta("mongodb", doc="where the documents live (docs/storage.md)")
    )
    mongodb_url: str = field(
        default="mongodb://127.0.0.1:27017", metadata=_meta("mongodb://mongo:27017", _url("mongodb"))
    )
    mongodb_database: str = field(default="iotflow", metadata=_meta("iotflow"))
    mongodb_password_file: str = field(
        default="",
        metadata=_meta(
            "mongodb-password",
            doc="a file whose content replaces the password in documents.mongodb_url (empty file: no change)",
        ),
    )


def _replication(value: Any) -> str | None:
    """A SimpleStrategy factor (`3`) or NetworkTopologyStrategy factors per DC (`dc1:3,dc2:3`)."""
    if value.isdigit():
        return None if int(value) > 0 else "must be greater than 0"
    for item in value.split(","):
        dc, _, factor = item.strip().rpartition(":")
        if not dc or not factor.isdigit() or int(factor) <= 0:
            return "must be a factor (3) or data centres with factors (dc1:3,dc2:3)"
    return None


def _hostnames(value: Any) -> str | None:
    bad = [host for host in value if not host or any(c in host for c in " /:") or host != host.strip()]
    return f"{bad[0]!r} is not a host name or address (the port is cassandra.port)" if bad else None


@dataclass
class TimeseriesSettings:
    """Which store holds the readings (docs/storage.md)."""

    backend: Literal["postgres", "cassandra", "both"] = field(
        default="postgres",
        metadata=_meta(
            "cassandra",
            doc="postgres: decoded_data; cassandra: keyspace cassandra.keyspace; both: each batch to both",
        ),
    )

    @property
    def uses_cassandra(self) -> bool:
        return self.backend in ("cassandra", "both")

    @property
    def uses_postgres(self) -> bool:
        return self.backend in ("postgres", "both")


@dataclass
class CassandraSettings:
    """The Cassandra time-series store, when timeseries.backend is cassandra or both."""

    hosts: list[str] = field(
        default_factory=lambda: ["127.0.0.1"],
        metadata=_meta("cass-1,cass-2,cass-3", _hostnames, doc="contact points"),
    )
    port: int = field(default=9042, metadata=_meta("9042", _between(1, 65535), doc="native protocol port"))
    keyspace: str = field(default="telemetry", metadata=_meta("telemetry", _identifier))
    replication: str = field(
        default="1",
        metadata=_meta(
            "dc1:3,dc2:3",
            _replication,
            doc="keyspace replication `iotflow migrate` creates: a SimpleStrategy factor, or "
            "NetworkTopologyStrategy factors per data centre",
        ),
    )
    local_dc: str = field(
        default="datacenter1",
        metadata=_meta("dc1", _non_empty, doc="the data centre queried first (DC-aware, token-aware)"),
    )
    consistency: Literal[
        "one", "two", "three", "quorum", "all", "local_quorum", "each_quorum", "local_one"
    ] = field(default="local_quorum", metadata=_meta("local_quorum", doc="consistency of reads and writes"))
    concurrency: int = field(
        default=64, metadata=_meta("64", _positive, doc="requests in flight at once, per process")
    )
    batch_rows: int = field(
        default=50,
        metadata=_meta("50", _between(1, 1000), doc="rows per unlogged batch (always one partition)"),
    )
    request_timeout_s: float = field(
        default=10.0,
        metadata=_meta("10", _positive, doc="a request unanswered this long fails and is retried"),
    )
    connect_timeout_s: float = field(default=5.0, metadata=_meta("5", _positive))
    default_ttl_s: int = field(
        default=90 * 86400,
        metadata=_meta(
            "7776000", _non_negative, doc="default TTL of device_data and user_data (migrate); 0: none"
        ),
    )
    username: str = field(
        default="", metadata=_meta("iotflow", doc="login (PasswordAuthenticator); empty: none")
    )
    password: str = field(
        default="",
        repr=False,  # never in a log line or a traceback
        metadata=_meta("secret", doc="the login's password; better: password_file"),
    )
    password_file: str = field(
        default="",
        metadata=_meta(
            "/run/credentials/iotflow-worker.service/cassandra-password",
            doc="a file whose content is cassandra.password (empty file: no change)",
        ),
    )
    tls: bool = field(default=False, metadata=_meta("true", doc="client encryption: TLS to every node"))
    ca_file: str = field(
        default="",
        metadata=_meta(
            "/etc/iotflow/cassandra-ca.pem",
            doc="CA the nodes' certificates are checked against (TLS; empty: the system's)",
        ),
    )
    cert_file: str = field(
        default="",
        metadata=_meta("/etc/iotflow/cassandra-client.pem", doc="client certificate (TLS, optional)"),
    )
    key_file: str = field(
        default="", metadata=_meta("/etc/iotflow/cassandra-client.key", doc="the client certificate's key")
    )
    check_hostname: bool = field(
        default=True,
        metadata=_meta("false", doc="the node's certificate must name the contact point (TLS)"),
    )


@dataclass
class PipelineSettings:
    batch_size: int = field(
        default=5000,
        metadata=_meta(
            "5000", _positive, doc="readings that start a database commit (a backlog commits all that waits)"
        ),
    )
    flush_interval_ms: int = field(
        default=100,
        # 100: p99 publish→commit within 250 ms at moderate rates; a flood fills batches first.
        metadata=_meta("100", _positive, doc="longest wait before a partial batch commits"),
    )
    slow_write_s: float = field(
        default=5.0,
        metadata=_meta(
            "5", _positive, doc="a store write pending this long logs `sink.slow`, again each period"
        ),
    )
    rate_limit_messages: int = field(
        default=0,
        metadata=_meta(
            "600", _non_negative, doc="messages per device per window, the rest dead-lettered; 0: off"
        ),
    )
    rate_limit_window_s: int = field(
        default=60, metadata=_meta("60", _positive, doc="the rate limit's window, shared by all workers")
    )
    mailbox_size: int = field(
        default=20000, metadata=_meta("20000", _positive, doc="messages waiting for decoding")
    )
    unknown_devices: Literal["reject", "register"] = field(
        default="reject",
        metadata=_meta("register", doc="what to do with a device not in `devices`"),
    )
    max_new_datapoints_per_hour: int = field(
        default=20,
        # With `register`, every typo in a JSON key would otherwise become a datapoint.
        metadata=_meta(
            "20",
            _positive,
            doc="datapoints one device may register per hour, per worker process (`register`)",
        ),
    )
    device_cache_size: int = field(
        default=100_000,
        metadata=_meta(
            "100000",
            _positive,
            doc="devices (and as many topics) each worker process keeps in memory, least recently used out",
        ),
    )
    codecs: str = field(
        default="", metadata=_meta("/etc/iotflow/codecs.toml", doc="F2 codec file; empty: built-in")
    )
    max_future_s: int = field(
        default=300, metadata=_meta("300", _non_negative, doc="accepted clock skew ahead of now")
    )
    max_age_s: int = field(
        default=30 * 86400, metadata=_meta("2592000", _positive, doc="oldest reading accepted")
    )
    max_payload_bytes: int = field(
        default=65536, metadata=_meta("65536", _positive, doc="larger messages are dead-lettered")
    )
    dead_letter_payload_bytes: int = field(
        default=4096,
        metadata=_meta("4096", _non_negative, doc="payload bytes kept per dead letter"),
    )


@dataclass
class DecodeSettings:
    """Topic and JSON mappings beside the built-in layouts (docs/decoding.md, "Mappings")."""

    profiles: list[str] = field(
        default_factory=list,
        metadata=_meta(
            '["tasmota", "zigbee2mqtt"]', doc="shipped mappings to use: tasmota, zigbee2mqtt, shelly, esphome"
        ),
    )
    mappings: list[str] = field(
        default_factory=list,
        metadata=_meta('["/etc/iotflow/mappings/plugs.toml"]', doc="mapping files of your own"),
    )


@dataclass
class StorageSettings:
    """What the stores share: the local data directory and the outage rules (docs/storage.md)."""

    data_dir: str = field(
        default="/var/lib/iotflow",
        metadata=_meta(
            "/var/lib/iotflow",
            _non_empty,
            doc="local state: the outbox journal of a readings store that is down (both mode)",
        ),
    )
    write_timeout_s: float = field(
        default=5.0,
        metadata=_meta(
            "5",
            _positive,
            doc="a write to a store that may be skipped (one of two readings stores, hot state) "
            "taking longer counts as the store being down",
        ),
    )


def _bootstrap(value: Any) -> str | None:
    servers = [item.strip() for item in value.split(",")]
    for server in servers:
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"{server!r} is not host:port (several: comma-separated)"
    return None


def _kafka_topic(value: Any) -> str | None:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    if not value or len(value) > 249 or set(value) - allowed or value in {".", ".."}:
        return "must be 1 to 249 of a-z, A-Z, 0-9, '.', '_', '-'"
    return None


@dataclass
class IntakeSettings:
    """Where the worker reads its messages from (docs/kafka.md)."""

    source: Literal["mqtt", "kafka"] = field(
        default="mqtt",
        metadata=_meta("kafka", doc="mqtt: the broker's topics; kafka: kafka.raw_topic in kafka.group"),
    )


@dataclass
class KafkaSettings:
    """The bridge to Kafka (a sink) and Kafka intake (docs/kafka.md)."""

    bootstrap: str = field(
        default="127.0.0.1:9092",
        metadata=_meta("kafka-1:9092,kafka-2:9092", _bootstrap, doc="brokers, host:port comma-separated"),
    )
    bridge: bool = field(
        default=False,
        metadata=_meta(
            "true", doc="write raw messages to raw_topic (MQTT intake) and readings to processed_topic"
        ),
    )
    group: str = field(
        default="iotflow",
        metadata=_meta("iotflow-processors", _non_empty, doc="consumer group of Kafka intake"),
    )
    client_id: str = field(
        default="iotflow-worker", metadata=_meta("iotflow-gw-1", _non_empty, doc="Kafka client id")
    )
    raw_topic: str = field(
        default="raw-iot-data", metadata=_meta("raw-iot-data", _kafka_topic, doc="raw message envelopes")
    )
    processed_topic: str = field(
        default="processed-iot-data",
        metadata=_meta("processed-iot-data", _kafka_topic, doc="decoded readings"),
    )
    partitions: int = field(
        default=6,
        metadata=_meta("12", _positive, doc="partitions `iotflow migrate` creates each topic with"),
    )
    replication_factor: int = field(
        default=1, metadata=_meta("3", _positive, doc="replicas `iotflow migrate` creates each topic with")
    )
    compression: Literal["zstd", "lz4", "gzip", "none"] = field(
        default="zstd", metadata=_meta("lz4", doc="producer batch compression")
    )
    max_batch_bytes: int = field(
        default=262144, metadata=_meta("262144", _positive, doc="largest record batch (one partition's)")
    )
    buffer_bytes: int = field(
        default=4194304,
        metadata=_meta(
            "4194304", _positive, doc="record batches handed to the producer and not yet acknowledged"
        ),
    )
    max_request_bytes: int = field(
        default=1048576,
        metadata=_meta("1048576", _positive, doc="largest produce request (and record)"),
    )
    idempotence: bool = field(
        default=True,
        metadata=_meta(
            "true", doc="idempotent producer (acks=all always); off only for brokers without InitProducerId"
        ),
    )
    request_timeout_ms: int = field(
        default=30000,
        metadata=_meta(
            "30000", _positive, doc="a produce or fetch unanswered this long fails and is retried"
        ),
    )
    session_timeout_ms: int = field(
        default=10000,
        metadata=_meta("10000", _positive, doc="a consumer silent this long leaves the group"),
    )
    heartbeat_interval_ms: int = field(
        default=3000, metadata=_meta("3000", _positive, doc="consumer heartbeat")
    )
    max_poll_records: int = field(
        default=2000, metadata=_meta("2000", _positive, doc="records Kafka intake takes per fetch")
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = field(
        default="PLAINTEXT",
        metadata=_meta("SASL_SSL", doc="PLAINTEXT, SSL (TLS), SASL_PLAINTEXT (a login), SASL_SSL (both)"),
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = field(
        default="PLAIN", metadata=_meta("SCRAM-SHA-512", doc="how the login is proven (SASL_*)")
    )
    username: str = field(default="", metadata=_meta("iotflow", doc="SASL user name (SASL_*)"))
    password: str = field(
        default="",
        repr=False,  # never in a log line or a traceback
        metadata=_meta("secret", doc="SASL password (SASL_*); better: password_file"),
    )
    password_file: str = field(
        default="",
        metadata=_meta(
            "/run/credentials/iotflow-worker.service/kafka-password",
            doc="a file whose content is kafka.password (empty file: no change)",
        ),
    )
    ca_file: str = field(
        default="",
        metadata=_meta(
            "/etc/iotflow/kafka-ca.pem",
            doc="CA the brokers' certificates are checked against (SSL, SASL_SSL; empty: the system's)",
        ),
    )
    cert_file: str = field(
        default="",
        metadata=_meta("/etc/iotflow/kafka-client.pem", doc="client certificate (SSL, SASL_SSL; optional)"),
    )
    key_file: str = field(
        default="", metadata=_meta("/etc/iotflow/kafka-client.key", doc="the client certificate's key")
    )
    check_hostname: bool = field(
        default=True,
        metadata=_meta(
            "false", doc="the broker's certificate must name the host it is reached at (SSL, SASL_SSL)"
        ),
    )

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


@dataclass
class RulesSettings:
    """Alert-rule evaluation (the rules actor)."""

    enabled: bool = field(default=True, metadata=_meta("true", doc="evaluate alert rules"))
    refresh_s: float = field(
        default=5.0,
        metadata=_meta(
            "5", _positive, doc="rule reload period; changes made through `iotflow rules` apply at once"
        ),
    )
    offline_check_s: float = field(
        default=1.0, metadata=_meta("1", _positive, doc="how often silent devices are checked")
    )
    recent_alerts: int = field(
        default=100, metadata=_meta("100", _positive, doc="length cap of the Redis list alerts:{device_id}")
    )
    restore_resolved: int = field(
        default=10000,
        metadata=_meta(
            "10000", _non_negative, doc="recently resolved alerts read at start, so redelivery cannot refire"
        ),
    )


def _http_urls(value: Any) -> str | None:
    check = _url("http", "https")
    return next((f"{url!r}: {problem}" for url in value if (problem := check(url))), None)


@dataclass
class WebhookSettings:
    """One webhook endpoint of `notify.webhooks` (a TOML array of tables, or a JSON list in the
    environment): where to POST, how to sign, which alerts it wants."""

    url: str = field(default="", metadata=_meta("https://hooks.example.com/iotflow", _url("http", "https")))
    name: str = field(default="", metadata=_meta("ops", doc="the channel's name; empty: the URL"))
    secret: str = field(default="", metadata=_meta("s3cr3t", doc="HMAC-SHA256 key of X-IoTFlow-Signature"))
    secret_file: str = field(default="", metadata=_meta("/run/credentials/iotflow-worker.service/hook"))
    rules: list[str] = field(default_factory=list, metadata=_meta('["global/hot"]', doc="only these rules"))
    users: list[int] = field(default_factory=list, metadata=_meta("[7]", doc="only these users' devices"))

    @property
    def channel(self) -> str:
        return f"webhook {self.name or self.url}"


@dataclass
class NotifySettings:
    """Alert notifications (docs/rules.md): Alertmanager and signed webhooks, from an outbox."""

    alertmanager_urls: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "http://am-1:9093,http://am-2:9093",
            _http_urls,
            doc="Alertmanagers that get every alert (an HA pair: all of them)",
        ),
    )
    webhooks: list[WebhookSettings] = field(
        default_factory=list,
        metadata=_meta(
            '[{url = "https://hooks.example.com/iotflow", secret = "…"}]', doc="webhook endpoints"
        ),
    )
    timeout_s: float = field(default=10.0, metadata=_meta("10", _positive, doc="per HTTP request"))
    retry_first_s: float = field(
        default=1.0, metadata=_meta("1", _positive, doc="first wait after a failed delivery; doubles")
    )
    retry_max_s: float = field(default=300.0, metadata=_meta("300", _positive, doc="longest wait"))
    batch_size: int = field(
        default=500,
        metadata=_meta("500", _positive, doc="alerts per Alertmanager POST, rows claimed at once"),
    )
    poll_s: float = field(
        default=1.0, metadata=_meta("1", _positive, doc="how often the outbox is read for due rows")
    )
    refresh_s: float = field(
        default=60.0,
        metadata=_meta("60", _positive, doc="active alerts re-sent to Alertmanager; valid 4× as long"),
    )
    link_url: str = field(
        default="",
        metadata=_meta(
            "https://iot.example.com/alerts/{alert_id}", doc="link annotation and generatorURL; {alert_id}"
        ),
    )

    @property
    def enabled(self) -> bool:
        return bool(self.alertmanager_urls or self.webhooks)


@dataclass
class JobsSettings:
    """arq jobs: rollups, reports, retention, sweeps."""

    queue_name: str = field(
        default="",
        metadata=_meta(
            "site1:iotflow:jobs",
            doc="arq queue, also the prefix of every job id; empty: `{redis.key_prefix}iotflow:jobs`",
        ),
    )
    rollups_enabled: bool = field(default=True, metadata=_meta("true", doc="schedule the hourly rollup"))
    rollup_minute: int = field(
        default=5,
        metadata=_meta(
            "5", lambda v: None if 0 <= v <= 59 else "must be 0 to 59", "minute past each hour it runs"
        ),
    )
    late_window_s: int = field(
        default=7200,
        metadata=_meta("7200", _non_negative, doc="each rollup recomputes the buckets this far back"),
    )
    reports_enabled: bool = field(
        default=True, metadata=_meta("true", doc="schedule the daily device_health reports")
    )
    report_hour: int = field(
        default=1,
        metadata=_meta("1", lambda v: None if 0 <= v <= 23 else "must be 0 to 23", "UTC hour, previous day"),
    )
    report_minute: int = field(
        default=15,
        metadata=_meta(
            "15", lambda v: None if 0 <= v <= 59 else "must be 0 to 59", "minute of jobs.report_hour"
        ),
    )
    retention_enabled: bool = field(default=True, metadata=_meta("true", doc="schedule the daily retention"))
    retention_hour: int = field(
        default=3, metadata=_meta("3", lambda v: None if 0 <= v <= 23 else "must be 0 to 23", "UTC hour")
    )
    retention_minute: int = field(
        default=30,
        metadata=_meta(
            "30", lambda v: None if 0 <= v <= 59 else "must be 0 to 59", "minute of jobs.retention_hour"
        ),
    )
    sweep_enabled: bool = field(default=True, metadata=_meta("true", doc="schedule the offline sweep"))
    sweep_every_min: int = field(
        default=1,
        metadata=_meta(
            "1", lambda v: None if 1 <= v <= 60 else "must be 1 to 60", "minutes between offline sweeps"
        ),
    )
    default_max_silence_s: int = field(
        default=300,
        metadata=_meta("300", _positive, doc="allowed silence of a device without devices.max_silence_s"),
    )
    retention_raw_days: int = field(
        default=90, metadata=_meta("90", _non_negative, doc="raw readings kept; 0 keeps them forever")
    )
    retention_rollups_hourly_days: int = field(
        default=365, metadata=_meta("365", _non_negative, doc="hourly rollups kept; 0: forever")
    )
    retention_rollups_daily_days: int = field(
        default=1825, metadata=_meta("1825", _non_negative, doc="daily rollups kept; 0: forever")
    )
    retention_dead_letters_days: int = field(
        default=30, metadata=_meta("30", _non_negative, doc="dead letters kept; 0: forever")
    )
    retention_resolved_alerts_days: int = field(
        default=90, metadata=_meta("90", _non_negative, doc="resolved alerts kept; 0: forever")
    )
    retention_event_logs_days: int = field(
        default=90, metadata=_meta("90", _non_negative, doc="event_logs documents kept; 0: forever")
    )
    retention_job_runs_days: int = field(
        default=30, metadata=_meta("30", _non_negative, doc="finished job_runs records kept; 0: forever")
    )
    max_tries: int = field(
        default=5, metadata=_meta("5", _positive, doc="tries of a job on store errors before it fails")
    )
    retry_backoff_s: float = field(
        default=5.0, metadata=_meta("5", _positive, doc="first retry delay; doubles on each try")
    )
    retry_backoff_max_s: float = field(default=300.0, metadata=_meta("300", _positive))
    lock_timeout_s: float = field(
        default=30.0,
        metadata=_meta("30", _positive, doc="longest wait for a table lock before a try gives up"),
    )
    job_timeout_s: int = field(
        default=3600, metadata=_meta("3600", _positive, doc="a try running longer is cancelled")
    )
    keep_result_s: int = field(
        default=2 * 86400,
        metadata=_meta(
            "172800", _positive, doc="arq keeps results (and so refuses the same job id) this long"
        ),
    )
    max_jobs: int = field(default=4, metadata=_meta("4", _positive, doc="jobs one worker runs at once"))


@dataclass
class RuntimeSettings:
    shutdown_timeout_s: float = field(default=30.0, metadata=_meta("30", _positive))
    restart_limit: int = field(
        default=5, metadata=_meta("5", _non_negative, doc="restarts allowed per window")
    )
    restart_window_s: float = field(default=300.0, metadata=_meta("300", _positive))
    restart_backoff_s: float = field(default=1.0, metadata=_meta("1", _positive))
    report_interval_s: float = field(
        default=10.0, metadata=_meta("10", _positive, doc="one progress log line per interval")
    )
    processes: int | Literal["auto"] = field(
        default=1,
        metadata=_meta(
            "auto", _processes, doc="worker processes under one supervisor; auto: one per usable core"
        ),
    )


@dataclass
class HttpSettings:
    enabled: bool = field(default=True, metadata=_meta("true"))
    host: str = field(default="127.0.0.1", metadata=_meta("0.0.0.0"))
    port: int = field(default=8081, metadata=_meta("8081", _non_negative))
    api: bool = field(
        default=False, metadata=_meta("true", doc="serve the device API under /api/v1 (docs/api.md)")
    )
    admin_tokens: list[str] = field(
        default_factory=list,
        metadata=_meta("tok-ops-1,tok-ops-2", doc="the API's admin tokens (Authorization: Bearer …)"),
    )
    admin_tokens_file: str = field(
        default="",
        metadata=_meta(
            "/run/credentials/iotflow-worker.service/admin-tokens",
            doc="a file of admin tokens, one a line, added to http.admin_tokens",
        ),
    )
    ca_dir: str = field(
        default="",
        metadata=_meta(
            "/etc/iotflow/certs",
            doc="the `iotflow certs` directory whose CA signs device certificates for the API; '': none",
        ),
    )


@dataclass
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata=_meta("info"))
    format: Literal["auto", "json", "console"] = field(
        default="auto", metadata=_meta("json", doc="auto: console on a TTY, JSON otherwise")
    )


@dataclass
class Settings:
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    postgres: PostgresSettings = field(default_factory=PostgresSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    documents: DocumentSettings = field(default_factory=DocumentSettings)
    timeseries: TimeseriesSettings = field(default_factory=TimeseriesSettings)
    cassandra: CassandraSettings = field(default_factory=CassandraSettings)
    intake: IntakeSettings = field(default_factory=IntakeSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    rules: RulesSettings = field(default_factory=RulesSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    jobs: JobsSettings = field(default_factory=JobsSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    log: LogSettings = field(default_factory=LogSettings)

    @property
    def jobs_queue(self) -> str:
        """The arq queue: `jobs.queue_name`, or one under the Redis key prefix, so that
        deployments sharing a Redis never refuse each other's job ids."""
        return self.jobs.queue_name or f"{self.redis.key_prefix}iotflow:jobs"

    @property
    def kafka_topics(self) -> list[str]:
        """The Kafka topics this worker reads or writes: raw in for Kafka intake, raw out from
        the bridge behind MQTT intake, processed out from the bridge; none without Kafka."""
        topics = []
        if self.intake.source == "kafka" or self.kafka.bridge:
            topics.append(self.kafka.raw_topic)
        if self.kafka.bridge:
            topics.append(self.kafka.processed_topic)
        return topics


def load_settings(config_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from defaults, then the TOML file, then the environment.

    The file is `config_file` (the CLI's `--config`), else the one `IOTFLOW_CONFIG` names:
    every process that loads settings, the CLI, the jobs under plain `arq` and the
    children of `--processes`, finds its file the same way."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if config_file is not None:
        raw = _read_toml(config_file, "--config")
    elif environ.get(CONFIG_ENV):
        raw = _read_toml(Path(environ[CONFIG_ENV]), CONFIG_ENV)
    settings = Settings()
    known = {f.name for f in dataclasses.fields(Settings)}
    for name in raw:
        if name not in known:
            raise ConfigError(name, "unknown section in the config file", "[mqtt]")
    for section_field in dataclasses.fields(Settings):
        section = getattr(settings, section_field.name)
        table = raw.get(section_field.name, {})
        if not isinstance(table, dict):
            raise ConfigError(section_field.name, "must be a TOML table", f"[{section_field.name}]")
        _load_section(section_field.name, section, table, environ)
    _check_cross_field(settings)
    _apply_password_files(settings)
    _apply_store_security(settings)
    _apply_webhook_secrets(settings.notify)
    _apply_admin_tokens_file(settings.http)
    return settings


def redact_url(url: str) -> str:
    """`url` with its password masked, for a log line or a message naming a server."""
    parsed = urlsplit(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


def describe_settings() -> list[tuple[str, str, str, str]]:
    """(setting, environment variable, default, description) for the reference docs."""
    rows = []
    for section_field in dataclasses.fields(Settings):
        section = getattr(Settings(), section_field.name)
        for f in dataclasses.fields(section):
            rows.append(
                (
                    f"{section_field.name}.{f.name}",
                    env_name(section_field.name, f.name),
                    repr(getattr(section, f.name)),
                    f.metadata.get("doc", ""),
                )
            )
    return rows


def _read_toml(path: Path, source: str) -> dict[str, Any]:
    """The file's tables; every way it can be unusable is a ConfigError naming it (exit 2).
    `source`: where the name came from, `--config` or `IOTFLOW_CONFIG`."""
    example = f"{source}{' ' if source.startswith('-') else '='}/etc/iotflow/iotflow.toml"
    try:
        text = path.read_bytes().decode("utf-8")
        return tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(source, f"file {path} does not exist", example) from None
    except IsADirectoryError:
        raise ConfigError(source, f"{path} is not a file", example) from None
    except PermissionError:
        raise ConfigError(source, f"{path} cannot be read (permission denied)", example) from None
    except OSError as exc:
        raise ConfigError(source, f"{path} cannot be read: {exc.strerror or exc}", example) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, f"{path} is not UTF-8 text (byte {exc.start})", example) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"{path} is not valid TOML: {exc}", '[mqtt] url = "mqtt://…"') from None


def _load_section(name: str, section: Any, table: dict[str, Any], environ: Mapping[str, str]) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    for key in table:
        if key not in fields:
            raise ConfigError(f"{name}.{key}", "unknown setting", f"one of {', '.join(fields)}")
    hints = typing.get_type_hints(type(section))
    for key, f in fields.items():
        setting = f"{name}.{key}"
        variable = env_name(name, key)
        if variable in environ:
            value = _from_env(environ[variable], hints[key], setting, f.metadata["example"])
            setting = f"{setting} ({variable})"
        elif key in table:
            value = table[key]
        else:
            continue
        value = _coerce(value, hints[key], setting, f.metadata["example"])
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(setting, f"{value!r} {problem}", f.metadata["example"])
        setattr(section, key, value)


def _from_env(text: str, hint: Any, setting: str, example: str) -> Any:
    if typing.get_origin(hint) is list:
        text = text.strip()
        if text.startswith("["):
            import orjson

            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                raise ConfigError(setting, f"{text!r} is not a JSON list", example) from None
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _coerce(value: Any, hint: Any, setting: str, example: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # the first alternative that takes the value
        for alternative in typing.get_args(hint):
            with contextlib.suppress(ConfigError):
                return _coerce(value, alternative, setting, example)
        raise ConfigError(setting, f"{value!r} is not {_describe_union(hint)}", example)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(setting, f"{value!r} is not one of {', '.join(choices)}", example)
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):  # an array of tables, each checked like a section
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(setting, f"{value!r} is not a list of tables", example)
            tables = []
            for index, table in enumerate(value):
                entry = typing.cast(Any, item)()
                _load_section(f"{setting}[{index}]", entry, table, {})
                tables.append(entry)
            return tables
        if item is int:
            if not isinstance(value, list):
                raise ConfigError(setting, f"{value!r} is not a list of integers", example)
            return [_coerce(v, int, setting, example) for v in value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(setting, f"{value!r} is not a list of strings", example)
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(setting, f"{value!r} is not a boolean", example)
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(setting, f"{value!r} is not a number", example)
        try:
            return hint(value)
        except (TypeError, ValueError):
            kind = "an integer" if hint is int else "a number"
            raise ConfigError(setting, f"{value!r} is not {kind}", example) from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(setting, f"{value!r} is not a string", example)
        return value
    raise TypeError(f"unsupported setting type {hint!r}")  # a bug in this module, not user input


def _describe_union(hint: Any) -> str:
    names = []
    for alternative in typing.get_args(hint):
        if typing.get_origin(alternative) is Literal:
            names += [repr(choice) for choice in typing.get_args(alternative)]
        else:
            names.append({int: "an integer", float: "a number"}.get(alternative, alternative.__name__))
    return " or ".join(names)


def _check_cross_field(settings: Settings) -> None:
    mqtt = settings.mqtt
    if not mqtt.topics:
        raise ConfigError("mqtt.topics", "needs at least one topic filter", repr(list(SPEC_TOPICS)))
    if bool(mqtt.cert_file) != bool(mqtt.key_file):
        raise ConfigError(
            "mqtt.cert_file",
            "client certificate and key must be given together",
            "/etc/iotflow/client.pem",
        )
    for path_setting in ("ca_file", "cert_file", "key_file"):
        path = getattr(mqtt, path_setting)
        if path and not Path(path).is_file():
            raise ConfigError(f"mqtt.{path_setting}", f"file {path} does not exist", "/etc/iotflow/ca.pem")
    if settings.pipeline.codecs and not Path(settings.pipeline.codecs).is_file():
        raise ConfigError(
            "pipeline.codecs",
            f"file {settings.pipeline.codecs} does not exist",
            "/etc/iotflow/codecs.toml",
        )
    for index, path in enumerate(settings.decode.mappings):
        if not Path(path).is_file():
            raise ConfigError(
                f"decode.mappings[{index}]", f"file {path} does not exist", "/etc/iotflow/mappings/plugs.toml"
            )
    if settings.http.api and not settings.http.enabled:
        raise ConfigError(
            "http.api", "needs http.enabled = true (the API is served by the HTTP server)", "true"
        )
    kafka = settings.kafka
    if kafka.raw_topic == kafka.processed_topic:
        raise ConfigError("kafka.processed_topic", "must differ from kafka.raw_topic", "processed-iot-data")
    if kafka.heartbeat_interval_ms >= kafka.session_timeout_ms:
        raise ConfigError("kafka.heartbeat_interval_ms", "must be below kafka.session_timeout_ms", "3000")
    if mqtt.reconnect_min_s > mqtt.reconnect_max_s:
        raise ConfigError("mqtt.reconnect_min_s", "is larger than mqtt.reconnect_max_s", "0.5")
    if settings.timeseries.uses_cassandra and not settings.cassandra.hosts:
        raise ConfigError("cassandra.hosts", "needs at least one contact point", "cass-1,cass-2")
    _check_extras(settings)


def _check_extras(settings: Settings) -> None:
    """A configured backend's extra must be installed: the backends are imported only when used,
    so without this check the first use would end in an ImportError's traceback."""
    timeseries = settings.timeseries
    needs = (
        ("timeseries.backend", repr(timeseries.backend), "cassandra", timeseries.uses_cassandra),
        ("documents.backend", "'mongodb'", "mongo", settings.documents.backend == "mongodb"),
        ("intake.source", "'kafka'", "kafka", settings.intake.source == "kafka"),
        ("kafka.bridge", "true", "kafka", settings.kafka.bridge),
    )
    for setting, value, extra, used in needs:
        if used and not extras.installed(extra):
            raise ExtraMissing(setting, value, extra)


def _apply_password_files(settings: Settings) -> None:
    """`postgres.password_file`, `redis.password_file`, `documents.mongodb_password_file`: the
    password goes into the URL, so every user of the URL (the daemon, the jobs, the commands)
    gets it; `mqtt.password_file` becomes `mqtt.password`. Meant for systemd's LoadCredential=
    (see `_read_secret_file`); an empty file changes nothing."""
    mqtt = settings.mqtt
    if mqtt.password_file:
        mqtt.password = _read_password_file("mqtt.password_file", mqtt.password_file, "mqtt") or mqtt.password
    urls: tuple[tuple[str, Any, str, str], ...] = (
        ("postgres.password_file", settings.postgres, "url", "postgres"),
        ("redis.password_file", settings.redis, "url", "redis"),
        ("documents.mongodb_password_file", settings.documents, "mongodb_url", "mongodb"),
    )
    for setting, section, url_field, name in urls:
        path = getattr(section, setting.rpartition(".")[2])
        password = _read_password_file(setting, path, name) if path else ""
        if password:
            setattr(section, url_field, url_with_password(getattr(section, url_field), password))


def _apply_store_security(settings: Settings) -> None:
    """Kafka's and Cassandra's logins and TLS files: `password_file` becomes `password` (as
    `mqtt.password_file` does), then what cannot work together is refused here, at start,
    rather than by the server later."""
    kafka, cassandra = settings.kafka, settings.cassandra
    for name, section in (("kafka", kafka), ("cassandra", cassandra)):
        if section.password_file:
            password = _read_password_file(f"{name}.password_file", section.password_file, name)
            if password:
                section.password = password
    if kafka.sasl and not (kafka.username and kafka.password):
        raise ConfigError(
            "kafka.username",
            f"security_protocol {kafka.security_protocol} needs kafka.username and kafka.password "
            "(or kafka.password_file)",
            "iotflow",
        )
    if not kafka.sasl and (kafka.username or kafka.password):
        raise ConfigError(
            "kafka.security_protocol",
            f"{kafka.security_protocol} sends no login: kafka.username/password need a SASL_ protocol",
            "SASL_SSL",
        )
    if not kafka.tls and (kafka.ca_file or kafka.cert_file):
        raise ConfigError(
            "kafka.security_protocol",
            f"{kafka.security_protocol} is not TLS: kafka.ca_file/cert_file need SSL or SASL_SSL",
            "SASL_SSL",
        )
    if bool(cassandra.username) != bool(cassandra.password):
        raise ConfigError(
            "cassandra.username",
            "cassandra.username and cassandra.password (or password_file) must be given together",
            "iotflow",
        )
    if not cassandra.tls and (cassandra.ca_file or cassandra.cert_file):
        raise ConfigError("cassandra.tls", "cassandra.ca_file/cert_file need cassandra.tls = true", "true")
    for name, section in (("kafka", kafka), ("cassandra", cassandra)):
        if bool(section.cert_file) != bool(section.key_file):
            raise ConfigError(
                f"{name}.cert_file",
                "client certificate and key must be given together",
                "/etc/iotflow/client.pem",
            )
        for path_setting in ("ca_file", "cert_file", "key_file"):
            path = getattr(section, path_setting)
            if path and not Path(path).is_file():
                raise ConfigError(
                    f"{name}.{path_setting}", f"file {path} does not exist", "/etc/iotflow/ca.pem"
                )


def _read_password_file(setting: str, path: str, name: str) -> str:
    return _read_secret_file(setting, path, f"{name}-password")


CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"  # where systemd's LoadCredential= puts a unit's secrets


def secret_path(path: str) -> Path:
    """Where a `…_file` setting points: a relative path is a credential's name inside
    `$CREDENTIALS_DIRECTORY` when systemd set one (LoadCredential=), else relative to the
    working directory; an absolute path is itself."""
    directory = os.environ.get(CREDENTIALS_ENV)
    resolved = Path(path)
    return Path(directory) / resolved if directory and not resolved.is_absolute() else resolved


def _read_secret_file(setting: str, path: str, example: str) -> str:
    """A secret kept in a file (`secret_path`): read once at start, its trailing newline
    stripped. The one reader of every `…_file` secret, so each follows the same rule."""
    where = secret_path(path)
    shown = str(where) if str(where) == path else f"{where} (${CREDENTIALS_ENV}/{path})"
    try:
        return where.read_text("utf-8").rstrip("\r\n")
    except FileNotFoundError:
        raise ConfigError(setting, f"file {shown} does not exist", example) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(setting, f"{shown} cannot be read: {reason}", example) from None


def _apply_webhook_secrets(notify: NotifySettings) -> None:
    """`secret_file` of each webhook, read as `password_file` is; a webhook needs a secret."""
    for index, hook in enumerate(notify.webhooks):
        setting = f"notify.webhooks[{index}]"
        if not hook.url:
            raise ConfigError(f"{setting}.url", "is required", "https://hooks.example.com/iotflow")
        if hook.secret_file:
            hook.secret = _read_secret_file(f"{setting}.secret_file", hook.secret_file, "/run/…/hook")
        if not hook.secret:
            raise ConfigError(f"{setting}.secret", "is required (or secret_file)", "a long random string")
    names = [hook.channel for hook in notify.webhooks]
    if len(set(names)) != len(names):
        raise ConfigError("notify.webhooks", "two webhooks have the same name (or URL)", 'name = "ops"')


def _apply_admin_tokens_file(http: HttpSettings) -> None:
    """`http.admin_tokens_file` (systemd's LoadCredential=, like the password files): its
    non-blank lines join `http.admin_tokens`. A token is never put in a message."""
    if not http.admin_tokens_file:
        return
    example = "/run/credentials/iotflow-worker.service/admin-tokens"
    text = _read_secret_file("http.admin_tokens_file", http.admin_tokens_file, example)
    http.admin_tokens = [*http.admin_tokens, *(line.strip() for line in text.splitlines() if line.strip())]


def url_with_password(url: str, password: str) -> str:
    """`url` with its password replaced by `password` (percent-encoded), the user kept."""
    parts = urlsplit(url)
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{hostinfo}"))
