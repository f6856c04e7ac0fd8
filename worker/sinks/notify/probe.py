"""`iotflow alerts test`: one test notification through every configured channel, directly
(not through the outbox), so that the answer is each receiver's own."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from worker.config import NotifySettings
from worker.sinks.notify.channels import (
    AlertmanagerChannel,
    DeliveryFailed,
    build_channels,
    http_client,
)

TEST_ALERT_S = 300  # how long Alertmanager shows the test alert


async def send_test(settings: NotifySettings) -> list[tuple[str, str | None]]:
    """(channel, None when it took the test, else why not), in configuration order."""
    now = datetime.now(UTC)
    key = f"test:{uuid.uuid4().hex}"
    message = "test notification from iotflow (iotflow alerts test)"
    results: list[tuple[str, str | None]] = []
    async with http_client(settings) as client:
        for name, channel in build_channels(settings, client).items():
            try:
                if isinstance(channel, AlertmanagerChannel):
                    alert = {
                        "labels": {"alertname": "IoTFlowTest", "severity": "info", "source": "iotflow"},
                        "annotations": {"message": message},
                        "startsAt": now.isoformat(),
                        "endsAt": (now + timedelta(seconds=TEST_ALERT_S)).isoformat(),
                    }
                    await channel.post([alert])
                else:
                    body = {"event": "test", "event_key": key, "message": message, "at": now.isoformat()}
                    await channel.post(body, key)
            except DeliveryFailed as exc:
                results.append((name, exc.error))
            else:
                results.append((name, None))
    return results
