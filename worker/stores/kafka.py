"""Kafka connections: the bridge's producer, Kafka intake's consumer, and the topics.

Only `worker.stores` (the producer, in `open_stores`), Kafka intake (its consumer),
`iotflow migrate` and `iotflow check` (the admin client) call these, and every client is
built here with the same security settings (`security`). Topics are created by
`create_topics` with the configured partitions and replication, never by a first
send: the stores refuse to open while a topic the configuration needs is missing.

aiokafka reports a bootstrap that failed for any reason, a refused login or an untrusted
certificate included, as one `KafkaConnectionError` (it logs the reason and tries the next
server). `start` tells a refusal from an outage: after such a failure it connects once
more itself and raises `SettingRefused`, naming the setting, when that is what it meets.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import aiokafka.errors as kafka_errors
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.protocol.admin import ApiVersionRequest

from worker.config import KafkaSettings
from worker.retry import Refused, SettingRefused, describe, is_transient
from worker.stores.tls import client_context, tls_refusal

log = structlog.get_logger(__name__)

TOPIC_ALREADY_EXISTS = 36


class TopicsMissing(Refused):
    """A topic the configuration needs does not exist: `iotflow migrate` creates it."""

    hint = "run `iotflow migrate`, which creates the topics"


class IdempotenceRefused(Refused):
    """`kafka.idempotence` is on, and the broker gives the producer no id (InitProducerId):
    a broker (or an ACL) without idempotent producers. Waiting will not change that."""

    hint = "set kafka.idempotence = false for this broker, or allow IdempotentWrite"


# Refusals of who we are, not of what we ask: reported as they are, whatever the idempotence.
_AUTHENTICATION_ERRORS = (
    kafka_errors.AuthenticationFailedError,
    kafka_errors.AuthenticationMethodNotSupported,
    kafka_errors.SaslAuthenticationFailed,
)


class _ReportedByUs(logging.Filter):
    """Drops aiokafka's line for each bootstrap server it could not connect to: `start` reports
    the failure once, as a refusal naming the setting or as the outage its caller waits out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != 'Unable connect to "%s:%s": %s'


_CLIENT_LOG = logging.getLogger("aiokafka")  # aiokafka.client logs under this name
if not any(isinstance(f, _ReportedByUs) for f in _CLIENT_LOG.filters):
    _CLIENT_LOG.addFilter(_ReportedByUs())


def servers(settings: KafkaSettings) -> list[str]:
    return [server.strip() for server in settings.bootstrap.split(",")]


def security(settings: KafkaSettings) -> dict[str, Any]:
    """The security arguments every client takes: protocol, TLS context, SASL login."""
    arguments: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.tls:
        arguments["ssl_context"] = client_context(
            "kafka", settings.ca_file, settings.cert_file, settings.key_file, settings.check_hostname
        )
    if settings.sasl:
        arguments.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.username,
            sasl_plain_password=settings.password,
        )
    return arguments


class _Startable(Protocol):
    async def start(self) -> None: ...


async def start(client: _Startable, settings: KafkaSettings) -> None:
    """`client.start()`; a bootstrap that failed because of our settings (a login, a
    certificate) raises `SettingRefused` instead of the connection error."""
    try:
        await client.start()
    except KafkaConnectionError as exc:
        refused = await diagnose(settings) if settings.security_protocol != "PLAINTEXT" else None
        if refused is not None:
            raise refused from exc
        raise


async def diagnose(settings: KafkaSettings) -> SettingRefused | None:
    """Connect to each bootstrap server as the clients do: the refusal one of them gives,
    or None when none refuses (unreachable ones are an outage, waited out by the caller)."""
    arguments = security(settings)
    for server in servers(settings):
        host, _, port = server.rpartition(":")
        conn = None
        try:
            conn = await create_conn(
                host,
                int(port),
                client_id=settings.client_id,
                request_timeout_ms=settings.request_timeout_ms,
                **arguments,
            )
            # Under TLS 1.3 a broker refuses our certificate (or its absence) only after the
            # handshake, with an alert that the first answer meets.
            await conn.send(ApiVersionRequest())
        except Exception as exc:
            refused = _refusal(settings, server, exc)
            if refused is not None:
                return refused
        finally:
            if conn is not None:
                conn.close()
    return None


def _refusal(settings: KafkaSettings, server: str, exc: BaseException) -> SettingRefused | None:
    refused = tls_refusal("kafka", "kafka.security_protocol", f"the broker at {server}", exc)
    if refused is not None:
        return refused
    if isinstance(exc, kafka_errors.UnsupportedSaslMechanismError):
        return SettingRefused(
            f"kafka.sasl_mechanism: the broker at {server} does not offer {settings.sasl_mechanism}"
        )
    if isinstance(exc, _AUTHENTICATION_ERRORS):
        return SettingRefused(
            f"kafka.password: the broker at {server} refused the login of user {settings.username!r} "
            f"({settings.sasl_mechanism})"
        )
    return None


def create_producer(settings: KafkaSettings) -> AIOKafkaProducer:
    """The bridge's producer: acks from every in-sync replica, idempotent, compressed.
    The bridge hands it whole record batches of up to `max_batch_bytes` (no linger: the
    writer batched already) and keeps what is not yet acknowledged under `buffer_bytes`."""
    return AIOKafkaProducer(
        bootstrap_servers=servers(settings),
        client_id=settings.client_id,
        acks="all",
        enable_idempotence=settings.idempotence,
        compression_type=None if settings.compression == "none" else settings.compression,
        max_batch_size=settings.max_batch_bytes,
        max_request_size=settings.max_request_bytes,
        request_timeout_ms=settings.request_timeout_ms,
        **security(settings),
    )


async def start_producer(producer: AIOKafkaProducer, settings: KafkaSettings) -> None:
    """Connect; an idempotent producer also fetches its id (InitProducerId). A broker that
    refuses that, with anything but a connection error or a failed login, is told apart
    from an unreachable one: `IdempotenceRefused`, naming the setting."""
    try:
        await start(producer, settings)
    except KafkaError as exc:
        if not settings.idempotence or is_transient(exc) or isinstance(exc, _AUTHENTICATION_ERRORS):
            raise
        raise IdempotenceRefused(
            f"kafka.idempotence: the broker refused an idempotent producer's id ({describe(exc)})"
        ) from exc


async def close_producer(producer: AIOKafkaProducer, timeout_s: float) -> None:
    """Stop the producer, waiting at most `timeout_s` for what it still holds to reach Kafka.

    aiokafka never expires an idempotent producer's batches (it resends them until the broker
    answers) and `stop()` flushes them first, so with Kafka away a stop would wait for Kafka's
    return: the daemon would outlive its shutdown timeout until systemd kills it. What the
    producer still holds was never acknowledged upstream (the writer acknowledges a batch only
    once the bridge has it), so it is safe to abandon: the broker redelivers those messages
    to the next run. The abandoned stop is cancelled, and the event loop's end (`asyncio.run`)
    cancels the producer's own sender task, which it offers no public way to stop."""
    stopping = asyncio.ensure_future(producer.stop())
    done, _ = await asyncio.wait([stopping], timeout=timeout_s)
    if stopping in done:
        stopping.result()
        return
    stopping.cancel()
    log.warning("kafka.unsent_abandoned", waited_s=timeout_s, why="Kafka unreachable at shutdown")


def create_consumer(settings: KafkaSettings) -> AIOKafkaConsumer:
    """Kafka intake's consumer: a member of `group`, offsets committed by hand only."""
    return AIOKafkaConsumer(
        bootstrap_servers=servers(settings),
        client_id=settings.client_id,
        group_id=settings.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=settings.max_poll_records,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        request_timeout_ms=max(settings.request_timeout_ms, settings.session_timeout_ms + 5000),
        max_partition_fetch_bytes=settings.max_request_bytes,
        **security(settings),
    )


async def existing_topics(producer: AIOKafkaProducer) -> set[str]:
    """The cluster's topics, by a metadata request for all of them (which creates none)."""
    metadata = await producer.client.fetch_all_metadata()
    return set(metadata.topics())


async def check_topics(producer: AIOKafkaProducer, topics: list[str]) -> None:
    missing = sorted(set(topics) - await existing_topics(producer))
    if missing:
        raise TopicsMissing(f"Kafka topics {', '.join(missing)} do not exist: run `iotflow migrate`")


def _admin(settings: KafkaSettings, purpose: str, request_timeout_ms: int = 0) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=servers(settings),
        client_id=f"{settings.client_id}-{purpose}",
        request_timeout_ms=request_timeout_ms or settings.request_timeout_ms,
        **security(settings),
    )


async def create_topics(settings: KafkaSettings, topics: list[str]) -> list[str]:
    """Create the missing ones of `topics` with the configured partitions and replication;
    returns those created. Existing topics are left as they are (partitions are never
    reduced, and `iotflow migrate` stays safe to repeat)."""
    admin = _admin(settings, "migrate")
    await start(admin, settings)
    try:
        response = await admin.create_topics(
            [NewTopic(topic, settings.partitions, settings.replication_factor) for topic in topics]
        )
    finally:
        await admin.close()
    created = []
    for topic, code, message in response.topic_errors:
        if code == 0:
            created.append(topic)
        elif code != TOPIC_ALREADY_EXISTS:
            raise KafkaError(f"creating topic {topic} failed: error {code}: {message}")
    return created


async def describe_cluster(settings: KafkaSettings, timeout_s: float) -> tuple[int, set[str]]:
    """The number of brokers and the topics (`iotflow check`), each request within `timeout_s`."""
    admin = _admin(settings, "check", int(timeout_s * 1000))
    try:
        await start(admin, settings)
        cluster = await admin.describe_cluster()
        topics = await admin.list_topics()
    finally:
        await admin.close()
    return len(cluster.get("brokers", ())), set(topics)
