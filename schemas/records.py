"""Record types that flow between the actors of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(slots=True, frozen=True)
class AckToken:
    """Identifies one received message to the intake that must acknowledge it."""

    generation: int  # which broker connection delivered it; stale tokens are not acked
    mid: int  # MQTT packet id, 0 for QoS 0


@dataclass(slots=True)
class RawMessage:
    topic: str
    payload: bytes
    received_at: float  # epoch seconds
    ack: AckToken


@dataclass(slots=True)
class Reading:
    """One value of one datapoint: a row of `decoded_data`."""

    timestamp: datetime
    device_id: int
    datapoint_id: int
    value: float
    label: str  # the datapoint label, for hot state and rules


@dataclass(slots=True)
class DeadLetter:
    topic: str
    payload: bytes
    reason: str
    received_at: float


@dataclass(slots=True)
class DecodedBatch:
    """What the decoder hands on: readings, rejects, and the messages they came from."""

    readings: list[Reading] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    acks: list[AckToken] = field(default_factory=list)
    messages: int = 0
    device_users: dict[int, int | None] = field(default_factory=dict)
    alerts: list[Any] = field(default_factory=list)  # alert events the rules actor raised

    def extend(self, other: DecodedBatch) -> None:
        self.readings.extend(other.readings)
        self.dead_letters.extend(other.dead_letters)
        self.acks.extend(other.acks)
        self.messages += other.messages
        self.device_users.update(other.device_users)
        self.alerts.extend(other.alerts)
