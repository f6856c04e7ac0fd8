"""The simulator's fleet: the devices `iotflow simulate` plays, and the metadata the demo,
the bench and the tests register for them (`register_fleet`; `migrate` seeds nothing)."""

from __future__ import annotations

# The simulator's F2 controllers (docs/decoding.md).
F2_MACS = tuple(f"aa:bb:cc:dd:ee:{n:02x}" for n in range(1, 5))

# What each F2 controller carries: (sensor mode = codec name, sensor label, topic kind).
F2_SENSORS = (("climate", "room1", "tele"), ("power", "mains", "tele"), ("io", "relay", "stat"))

# Generic JSON devices (devices/{device_key}/telemetry) and what they measure.
JSON_DEVICE_KEYS = tuple(f"sim-json-{n:02d}" for n in range(1, 5))
JSON_MEASUREMENTS = (("temperature", "°C"), ("humidity", "%"), ("battery", "V"))

DEMO_USER = "demo"
SEEDED_DEVICES = len(F2_MACS) + len(JSON_DEVICE_KEYS)  # the fleet `register_fleet` adds by default


def f2_device_key(mac: str) -> str:
    return "f2-" + mac.replace(":", "")


def f2_mac(index: int) -> str:
    """MAC of the simulator's F2 controller number `index` (0-based)."""
    if index < len(F2_MACS):
        return F2_MACS[index]
    return "aa:bb:cc:{:02x}:{:02x}:{:02x}".format(*(index + 0x100).to_bytes(3, "big"))


def json_device_key(index: int) -> str:
    return JSON_DEVICE_KEYS[index] if index < len(JSON_DEVICE_KEYS) else f"sim-json-{index + 1:04d}"
