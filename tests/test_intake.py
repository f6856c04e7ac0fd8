"""Intake details that the end-to-end tests do not isolate."""

from __future__ import annotations

import struct

from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion

import worker.intake.mqtt  # noqa: F401 - installs the shared property tables
from worker.config import MqttSettings
from worker.intake.mqtt import subscription_filters


def test_publish_properties_still_decode_with_shared_tables() -> None:
    topic = b"devices/d1/telemetry"
    # properties: Message Expiry Interval (2) = 60, User Property (38) = ("k", "v")
    props = (
        bytes([2])
        + struct.pack(">I", 60)
        + bytes([38])
        + struct.pack(">H", 1)
        + b"k"
        + struct.pack(">H", 1)
        + b"v"
    )
    body = struct.pack(">H", len(topic)) + topic + struct.pack(">H", 7) + bytes([len(props)]) + props + b"{}"
    first = _packet.decode_publish(0x32, body, MQTTProtocolVersion.MQTTv5)
    second = _packet.decode_publish(0x32, body, MQTTProtocolVersion.MQTTv5)
    assert first.mid == 7 and first.payload == b"{}" and first.topic == topic
    assert first.properties is not None and first.properties.MessageExpiryInterval == 60
    assert first.properties.UserProperty == [("k", "v")]
    assert second.properties is not None and not hasattr(second.properties, "ResponseTopic")
    assert type(first.properties).__name__ == "_SharedTableProperties"


def test_shared_group_prefixes_every_filter() -> None:
    settings = MqttSettings(topics=["a/+", "b/#"], shared_group="grp")
    assert subscription_filters(settings) == ["$share/grp/a/+", "$share/grp/b/#"]
    assert subscription_filters(MqttSettings(topics=["a/+"])) == ["a/+"]
