"""IoTFlow worker: MQTT intake → decoding → storage writers, at least once."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("iotflow-worker")  # pyproject.toml's, the one place it is written
except PackageNotFoundError:  # a checkout run without being installed
    __version__ = "0+unknown"
