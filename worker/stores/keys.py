"""Redis key and channel names (docs/decoding.md, "Rows and hot state"), behind the prefix."""

from __future__ import annotations

from collections.abc import Callable

# Lifetimes of the hot-state keys.
LATEST_TTL_S = 600  # device:latest:{id}
STATUS_TTL_S = 300  # device:status:{id}
RECENT_ALERTS_TTL_S = 86400  # alerts:{device_id}
API_KEY_TTL_S = 3600  # device:apikey:{sha256}: a revocation another host missed lasts at most this


_MARK = 918273645546372819  # a device id no prefix or name contains


class RedisKeys:
    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    @staticmethod
    def around_device_id(key_of: Callable[[int], str]) -> tuple[str, str]:
        """(head, tail) with `key_of(id) == head + str(id) + tail`: for a script that builds
        the keys of many devices itself, with the names still made here."""
        head, _, tail = key_of(_MARK).partition(str(_MARK))
        return head, tail

    def device_latest(self, device_id: int) -> str:
        return f"{self.prefix}device:latest:{device_id}"

    def device_latest_times(self, device_id: int) -> str:
        """When each value of `device_latest` was measured (epoch s)."""
        return f"{self.prefix}device:latest_ts:{device_id}"

    def device_status(self, device_id: int) -> str:
        return f"{self.prefix}device:status:{device_id}"

    def devices_online(self) -> str:
        return f"{self.prefix}devices:online"

    def alerts(self, device_id: int) -> str:
        return f"{self.prefix}alerts:{device_id}"

    def device_ref(self, kind: str, value: str) -> str:
        """Metadata cache of a device by `mac` or device `key`: one JSON string with its id,
        user, status, datapoints and ranges (docs/decoding.md)."""
        return f"{self.prefix}device:{kind}:{value}"

    def device_api_key(self, key_sha256: str) -> str:
        """The owner of a device API key, by the hex SHA-256 of the key (never the key itself)."""
        return f"{self.prefix}device:apikey:{key_sha256}"

    def rate_limit(self, device_id: int, window: int) -> str:
        """Messages of a device in one rate-limit window (`window` = epoch s // window length)."""
        return f"{self.prefix}ratelimit:device:{device_id}:{window}"

    def telemetry_channel(self, device_id: int) -> str:
        return f"{self.prefix}channel:device:{device_id}:telemetry"

    def user_notifications_channel(self, user_id: int) -> str:
        return f"{self.prefix}channel:user:{user_id}:notifications"

    def system_alerts_channel(self) -> str:
        return f"{self.prefix}channel:system:alerts"
