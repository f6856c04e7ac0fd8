"""Kafka connections: the bridge's producer, Kafka intake's consumer, and the topics.

Only `worker.stores` (the producer, in `open_stores`), Kafka intake (its consumer)
and `iotflow migrate` (the admin client) call these. Topics are created by
`create_topics` with the configured partitions and replication, never by a first
send: the stores refuse to open while a topic the configuration needs is missing.
"""

from __future__ import annotations

import asyncio

import aiokafka.errors as kafka_errors
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from worker.config import KafkaSettings
from worker.retry import Refused, describe, is_transient

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


def servers(settings: KafkaSettings) -> list[str]:
    return [server.strip() for server in settings.bootstrap.split(",")]


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
    )


async def start_producer(producer: AIOKafkaProducer, settings: KafkaSettings) -> None:
    """Connect; an idempotent producer also fetches its id (InitProducerId). A broker that
    refuses that, with anything but a connection error or a failed login, is told apart
    from an unreachable one: `IdempotenceRefused`, naming the setting."""
    try:
        await producer.start()
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
    )


async def create_topics(settings: KafkaSettings, topics: list[str]) -> list[str]:
    """Create the missing ones of `topics` with the configured partitions and replication;
    returns those created. Existing topics are left as they are (partitions are never
    reduced, and `iotflow migrate` stays safe to repeat)."""
    admin = _admin(settings, "migrate")
    await admin.start()
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
        await admin.start()
        cluster = await admin.describe_cluster()
        topics = await admin.list_topics()
    finally:
        await admin.close()
    return len(cluster.get("brokers", ())), set(topics)
