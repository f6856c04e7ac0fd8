"""IoTFlow worker: MQTT intake → decoding → storage writers, at least once."""

__version__ = "0.1.0"
