"""Record types that flow between the actors of the pipeline."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, NamedTuple


class AckToken(NamedTuple):
    """Identifies one received message to the intake that must acknowledge it.

    MQTT intake: the connection and the packet id. Kafka intake: the partition
    assignment (`generation`), the partition (`partition`) and the offset (`mid`).
    A NamedTuple, immutable and hashable like the frozen dataclass it was, at half the
    cost to build (one per message: ~0.5 µs saved, measured).
    """

    generation: int  # which connection or assignment delivered it; stale tokens are not acked
    mid: int  # MQTT packet id (0 for QoS 0); Kafka: the record's offset
    partition: int = -1  # Kafka: the partition of raw_topic; -1 for MQTT; HTTP_PARTITION


# AckToken.partition of a message posted over HTTP (worker/intake/http.py), whose request
# is answered with how many readings it stored (DecodedBatch.answered).
HTTP_PARTITION = -2


@dataclass(slots=True)
class RawMessage:
    topic: str
    payload: bytes
    received_at: float  # epoch seconds
    ack: AckToken
    rejected: str = ""  # Kafka intake: why the record is no raw envelope (a dead letter then)


@dataclass(slots=True)
class Reading:
    """One value of one datapoint: a row of `decoded_data`."""

    timestamp: datetime
    device_id: int
    datapoint_id: int
    value: float
    label: str  # the datapoint label, for hot state and rules


@dataclass(slots=True)
class TextReading:
    """A string or boolean value (booleans as `true`/`false`): kept only where the time-series
    store has a column for text, Cassandra's `text_value`; PostgreSQL has none."""

    timestamp: datetime
    device_id: int
    datapoint_id: int
    text: str
    label: str


class Reason(StrEnum):
    """Why a message became a dead letter (docs/decoding.md has each one)."""

    BAD_ENVELOPE = "bad_envelope"
    UNSUPPORTED_TOPIC = "unsupported_topic"
    BAD_TOPIC = "bad_topic"
    TOO_LARGE = "too_large"
    UNKNOWN_CODEC = "unknown_codec"
    BAD_JSON = "bad_json"
    BAD_PAYLOAD = "bad_payload"
    BAD_HEX = "bad_hex"
    BAD_FRAME = "bad_frame"
    BAD_TIMESTAMP = "bad_timestamp"
    TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
    NO_NUMERIC_VALUES = "no_numeric_values"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_DISABLED = "device_disabled"
    UNKNOWN_DATAPOINT = "unknown_datapoint"
    OUT_OF_RANGE = "out_of_range"
    DATAPOINT_LIMIT = "datapoint_limit"
    RATE_LIMITED = "rate_limited"
    SKIPPED_FIELDS = "skipped_fields"


# Dead letters keep at most this much of a topic and of a reason (characters); the
# payload's cap is a setting. MQTT allows 65,535-byte topics, no real device uses 1,024.
DEAD_LETTER_TOPIC_CHARS = 1024
DEAD_LETTER_REASON_CHARS = 1024


@dataclass(slots=True)
class DeadLetter:
    topic: str  # capped at DEAD_LETTER_TOPIC_CHARS
    payload: bytes
    reason: Reason
    detail: str  # capped so that `description` fits DEAD_LETTER_REASON_CHARS
    received_at: float
    fingerprint: bytes  # sha256(full topic \0 payload): a redelivery finds its row
    topic_size: int  # the full topic's length, in characters
    reason_size: int  # the full description's length, in characters

    @property
    def description(self) -> str:
        """What `dead_letters.reason` holds: `code: detail`."""
        return f"{self.reason}: {self.detail}"

    @property
    def truncated(self) -> bool:
        return self.topic_size > len(self.topic) or self.reason_size > len(self.description)


EventKind = Literal["fired", "resolved", "acknowledged"]


@dataclass(slots=True, frozen=True)
class AlertEvent:
    kind: EventKind
    alert_id: str
    rule_id: str  # the rule's uid: `{scope}/{id}`
    device_id: int
    user_id: int | None
    alert_type: str  # threshold | range | rate | offline
    severity: str
    message: str
    at: datetime  # event time: the triggering reading's timestamp, or the acknowledgement time
    raised_at: datetime  # wall clock when the event was raised
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def event_key(self) -> str:
        """The `event_logs` key: one entry per alert and kind, whatever the redeliveries."""
        return f"{self.alert_id}:{self.kind}"


@dataclass(slots=True)
class DecodedBatch:
    """What the decoder hands on: readings, rejects, and the messages they came from."""

    readings: list[Reading] = field(default_factory=list)
    texts: list[TextReading] = field(default_factory=list)  # only with a store that keeps text
    dead_letters: list[DeadLetter] = field(default_factory=list)
    acks: list[AckToken] = field(default_factory=list)
    messages: int = 0
    device_users: dict[int, int | None] = field(default_factory=dict)
    alerts: list[AlertEvent] = field(default_factory=list)  # raised by the rules actor
    raw: list[RawMessage] = field(default_factory=list)  # the messages themselves, for the Kafka bridge
    # Readings of each HTTP_PARTITION message that became readings: its request's answer,
    # counted by the decoder so that the body is parsed once.
    answered: dict[AckToken, int] = field(default_factory=dict)
    # When decoding began (monotonic): the writer's flush deadline counts from its oldest
    # batch's, so time spent queued behind the previous commit counts as waiting.
    created: float = field(default_factory=time.monotonic)

    def extend(self, other: DecodedBatch) -> None:
        self.readings.extend(other.readings)
        self.texts.extend(other.texts)
        self.dead_letters.extend(other.dead_letters)
        self.acks.extend(other.acks)
        self.messages += other.messages
        self.device_users.update(other.device_users)
        self.alerts.extend(other.alerts)
        self.raw.extend(other.raw)
        self.answered.update(other.answered)
