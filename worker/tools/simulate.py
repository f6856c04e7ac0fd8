"""`iotflow simulate`: F2 controllers and JSON devices publishing realistic telemetry.

Frames are built with the same codec definitions the decoder reads. Values walk
randomly inside plausible ranges; timestamps are the publish time, strictly
increasing per device, so every message is a distinct row downstream.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote, urlparse

import orjson
import paho.mqtt.client as paho
import structlog
from paho.mqtt.reasoncodes import ReasonCode

from worker.config import PostgresSettings, redact_url
from worker.decode.codecs import Codec, load_codecs
from worker.retry import Refused, Unreachable, describe
from worker.stores.devices import DatapointSpec, DeviceSpec, add_devices
from worker.stores.postgres import connect
from worker.tools import fleet

log = structlog.get_logger("worker.tools.simulate")

# Plausible centre and step of each simulated quantity's random walk.
_WALK = {
    "temperature": (21.0, 0.05), "humidity": (48.0, 0.2), "pressure": (1013.0, 0.1),
    "voltage": (230.0, 0.5), "current": (4.0, 0.05), "energy": (1200.0, 0.001),
    "power_factor": (0.95, 0.002), "rssi": (-67.0, 1.0), "battery": (3.6, 0.001),
}  # fmt: skip


@dataclass
class SimDevice:
    kind: str  # "f2" or "json"
    ref: str  # MAC for F2, device key for JSON
    rng: random.Random
    values: dict[str, float] = field(default_factory=dict)
    last_us: int = 0
    step: int = 0

    def next_timestamp_us(self) -> int:
        self.last_us = max(time.time_ns() // 1000, self.last_us + 1000)
        return self.last_us

    def walk(self, name: str) -> float:
        centre, step = _WALK.get(name, (10.0, 0.1))
        value = self.values.get(name, centre) + self.rng.uniform(-step, step)
        value += (centre - value) * 0.01  # drift back towards the centre
        self.values[name] = value
        return value


def build_fleet(devices: int, profile: str = "mixed", seed: int = 1, first: int = 0) -> list[SimDevice]:
    """`mixed`: the seeded four F2 controllers, four JSON devices, then alternating.
    `climate`: F2 controllers only (three readings per message, the bench's shape).
    `first` skips that many devices, so several publishers can share one fleet."""
    rng = random.Random(seed)
    result = []
    f2_count = json_count = 0
    for index in range(first + devices):
        use_f2 = profile == "climate" or index < 4 or (index >= 8 and index % 2 == 0)
        if use_f2:
            result.append(SimDevice("f2", fleet.f2_mac(f2_count), random.Random(rng.random())))
            f2_count += 1
        else:
            result.append(SimDevice("json", fleet.json_device_key(json_count), random.Random(rng.random())))
            json_count += 1
    return result[first:]


def message_stream(
    devices: list[SimDevice], codecs: dict[str, Codec], profile: str = "mixed"
) -> Iterator[tuple[str, bytes]]:
    """Endless (topic, payload) pairs, round robin over the fleet."""
    sensors = [s for s in fleet.F2_SENSORS if profile != "climate" or s[0] == "climate"]
    while True:
        for device in devices:
            device.step += 1
            if device.kind == "f2":
                mode, label, prefix = sensors[device.step % len(sensors)]
                yield _f2_message(device, codecs[mode], label, prefix)
            else:
                yield _json_message(device)


def _f2_message(device: SimDevice, codec: Codec, label: str, prefix: str) -> tuple[str, bytes]:
    values = {name: device.walk(name) for name in codec.units()}
    if codec.name == "io":
        values = {"relay1": device.step % 7 == 0, "relay2": device.step % 3 == 0,
                  "door_open": device.step % 11 == 0, "rssi": device.walk("rssi")}  # fmt: skip
    stamp = datetime.fromtimestamp(device.next_timestamp_us() / 1e6, UTC)
    topic = f"{prefix}/f2-{device.ref.replace(':', '')}/sensor-mode/{codec.name}/sensor-{label}"
    payload = orjson.dumps({"timestamp": stamp.isoformat(), "data": codec.encode(values).hex()})
    return topic, payload


def _json_message(device: SimDevice) -> tuple[str, bytes]:
    values = {name: round(device.walk(name), 3) for name, _ in fleet.JSON_MEASUREMENTS}
    ts_ms = device.next_timestamp_us() // 1000
    form = device.step % 3
    body: object
    if form == 0:
        body = {"ts": ts_ms, "values": values}
    elif form == 1:
        # A gateway's batched upload: two samples a millisecond apart.
        earlier = {k: round(v - 0.01, 3) for k, v in values.items()}
        device.last_us += 1000
        body = [{"ts": ts_ms, "values": earlier}, {"ts": ts_ms + 1, "values": values}]
    else:
        body = {"ts": ts_ms, "values": values}
    return f"devices/{device.ref}/telemetry", orjson.dumps(body)


def readings_per_message(topic: str, payload: bytes, codecs: dict[str, Codec]) -> int:
    """How many rows one simulated message becomes (bench and tests count with it)."""
    if topic.startswith("devices/"):
        body = orjson.loads(payload)
        entries = body if isinstance(body, list) else [body]
        return sum(len(entry["values"]) for entry in entries)
    return len(codecs[topic.split("/")[3]].units())


async def register_fleet(settings: PostgresSettings, devices: list[SimDevice] | None = None) -> None:
    """The demo user and the simulated `devices` (default: the seeded eight), with their
    datapoints: the metadata the demo, the bench and the tests run on. Idempotent, and added
    the way `iotflow devices add` adds a device (a conflict raises DeviceConflict)."""
    codecs = load_codecs()
    f2_points = tuple(
        DatapointSpec(f"{label}.{n}", u)
        for mode, label, _ in fleet.F2_SENSORS
        for n, u in codecs[mode].units().items()
    )
    json_points = tuple(DatapointSpec(label, unit) for label, unit in fleet.JSON_MEASUREMENTS)
    if devices is None:
        devices = build_fleet(fleet.SEEDED_DEVICES)
    specs = [
        DeviceSpec(fleet.f2_device_key(d.ref), d.ref, user=fleet.DEMO_USER, datapoints=f2_points)
        if d.kind == "f2"
        else DeviceSpec(d.ref, user=fleet.DEMO_USER, datapoints=json_points)
        for d in devices
    ]
    conn = await connect(settings)
    try:
        await conn.execute(
            "INSERT INTO users (username, email) VALUES ($1, $2) ON CONFLICT (username) "
            "DO UPDATE SET email = excluded.email",
            fleet.DEMO_USER,
            "demo@example.invalid",
        )
        await add_devices(conn, specs)
    finally:
        await conn.close()


class LoginRefused(Refused):
    """The broker answered the simulator's CONNECT with a failure: its credentials (or an
    ACL), which waiting will not fix."""


class Publisher:
    """A paho client on its own network thread: publish() queues, the thread sends.
    `username` and `password` win over the URL's, as `mqtt.username` and `mqtt.password`
    (or its file) do for the worker."""

    def __init__(
        self, url: str, client_id: str, qos: int = 1, *, username: str = "", password: str = ""
    ) -> None:
        parsed = urlparse(url)
        self.qos = qos
        self.refused: LoginRefused | None = None
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        username = username or unquote(parsed.username or "")
        password = password or unquote(parsed.password or "")
        if username:
            self.client.username_pw_set(username, password or None)
        self.client.on_connect = self._on_connect
        if parsed.scheme == "mqtts":
            self.client.tls_set()
        self.client.max_inflight_messages_set(2000)
        self.client.max_queued_messages_set(0)
        self._acked = 0
        self._lock = threading.Lock()
        self.client.on_publish = self._on_publish
        try:
            self.client.connect(parsed.hostname or "127.0.0.1", parsed.port or 1883, keepalive=30)
        except OSError as exc:  # refused, unknown host, unreachable: one line naming the broker
            raise Unreachable("mqtt broker", redact_url(url), describe(exc)) from exc
        self.client.loop_start()

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, properties: object
    ) -> None:
        if reason.is_failure and self.refused is None:
            self.refused = LoginRefused(
                f"CONNACK {reason.value} ({reason}): check mqtt.username and mqtt.password_file"
            )

    def _on_publish(self, *args: object) -> None:
        with self._lock:
            self._acked += 1

    @property
    def acked(self) -> int:
        return self._acked

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=self.qos)

    def close(self, expected: int, timeout: float = 60.0) -> bool:
        """Wait until the broker acknowledged `expected` messages; True when it did."""
        deadline = time.monotonic() + timeout
        while self.qos and self._acked < expected and time.monotonic() < deadline and not self.refused:
            time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()
        return self.qos == 0 or self._acked >= expected


def simulate(
    url: str,
    devices: int,
    rate: float,
    count: int | None,
    profile: str = "mixed",
    client_id: str = "",
    first: int = 0,
    stop: threading.Event | None = None,
    *,
    username: str = "",
    password: str = "",
) -> int:
    """Publish at `rate` messages/s (0: as fast as possible) until `count`, or until `stop`
    is set (checked between chunks of 100); return messages sent. LoginRefused when the
    broker refuses the login (`username`/`password` win over the URL's)."""
    codecs = load_codecs()
    fleet_devices = build_fleet(devices, profile, first=first)
    stream = message_stream(fleet_devices, codecs, profile)
    publisher = Publisher(
        url, client_id or f"iotflow-sim-{time.time_ns()}", username=username, password=password
    )
    sent = 0
    started = time.monotonic()
    last_report = started
    try:
        while (
            (count is None or sent < count)
            and not (stop is not None and stop.is_set())
            and not publisher.refused
        ):
            chunk = 100 if count is None else min(100, count - sent)
            for _ in range(chunk):
                publisher.publish(*next(stream))
            sent += chunk
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0 and stop is not None:
                    stop.wait(ahead)
                elif ahead > 0:
                    time.sleep(ahead)
            # Keep what waits unacknowledged bounded: never more than a few thousand ahead.
            while sent - publisher.acked > 5000 and not publisher.refused:
                time.sleep(0.001)
            now = time.monotonic()
            if now - last_report >= 5:
                log.info("simulate.progress", sent=sent, rate=round(sent / (now - started), 1))
                last_report = now
    except KeyboardInterrupt:
        pass
    confirmed = publisher.close(sent)
    if publisher.refused:
        raise publisher.refused
    elapsed = time.monotonic() - started
    log.info("simulate.done", sent=sent, confirmed=confirmed, seconds=round(elapsed, 2),
             rate=round(sent / elapsed, 1) if elapsed else None)  # fmt: skip
    return sent
