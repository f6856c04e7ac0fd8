"""The Kafka record formats (docs/kafka.md): the raw envelope of `raw-iot-data` and the
reading of `processed-iot-data`. Version 1 of the envelope:

    {"v": 1, "topic": "devices/d1/telemetry", "received_at": 1767225600.125,
     "encoding": "text", "payload": "{\"temperature\": 21.5}"}

`encoding` is "text" when the payload is UTF-8, else "base64". A reader must reject a
`v` it does not know; fields may be added within a version, never removed or changed.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from schemas.records import RawMessage, Reading

ENVELOPE_VERSION = 1


def device_key(topic: str) -> str:
    """The device as the topic names it (`f2-{mac}` of `tele/f2-{mac}/…`, `{key}` of
    `devices/{key}/telemetry`): the record key, so one device stays in one partition."""
    levels = topic.split("/")
    return levels[1] if len(levels) > 1 and levels[1] else topic


def raw_envelope(message: RawMessage) -> bytes:
    """`{"v": 1, "topic", "received_at", "encoding": "text"|"base64", "payload"}`."""
    try:
        text = message.payload.decode("utf-8")
        encoding = "text"
    except UnicodeDecodeError:
        text = base64.b64encode(message.payload).decode("ascii")
        encoding = "base64"
    return orjson.dumps(
        {
            "v": ENVELOPE_VERSION,
            "topic": message.topic,
            "received_at": message.received_at,
            "encoding": encoding,
            "payload": text,
        }
    )


class BadEnvelope(ValueError):
    """A `raw_topic` record that is not a version-1 envelope."""


def read_envelope(value: bytes | None) -> tuple[str, bytes, float]:
    """(topic, payload, received_at) of a raw envelope; raises BadEnvelope."""
    if value is None:
        raise BadEnvelope("empty record")
    try:
        envelope: Any = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadEnvelope(f"not JSON: {exc}") from None
    if not isinstance(envelope, dict):
        raise BadEnvelope("not a JSON object")
    if envelope.get("v") != ENVELOPE_VERSION:
        raise BadEnvelope(f"unknown envelope version {envelope.get('v')!r}")
    topic, payload, received_at = envelope.get("topic"), envelope.get("payload"), envelope.get("received_at")
    encoding = envelope.get("encoding", "text")
    if not isinstance(topic, str) or not isinstance(payload, str):
        raise BadEnvelope("topic and payload must be strings")
    if not isinstance(received_at, int | float) or isinstance(received_at, bool):
        raise BadEnvelope("received_at must be epoch seconds")
    if encoding == "text":
        return topic, payload.encode("utf-8", "surrogatepass"), float(received_at)
    if encoding == "base64":
        try:
            return topic, base64.b64decode(payload, validate=True), float(received_at)
        except ValueError:
            raise BadEnvelope("payload is not base64") from None
    raise BadEnvelope(f"unknown encoding {encoding!r}")


def processed_record(reading: Reading) -> bytes:
    return orjson.dumps(
        {
            "device_id": reading.device_id,
            "datapoint_id": reading.datapoint_id,
            "value": reading.value,
            "timestamp": reading.timestamp,
        },
        option=orjson.OPT_UTC_Z,
    )
