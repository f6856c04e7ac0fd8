"""The decoder actor: raw messages in, `DecodedBatch`es of readings and dead letters out."""

from __future__ import annotations

import hashlib
from collections import Counter

from schemas.records import (
    DEAD_LETTER_REASON_CHARS,
    DEAD_LETTER_TOPIC_CHARS,
    DeadLetter,
    DecodedBatch,
    RawMessage,
    Reading,
    Reason,
    TextReading,
)
from worker.decode.codecs import Codec
from worker.decode.parse import DeviceRef, Limits, ParsedMessage, ParsedReading, Rejected, parse_message
from worker.decode.ranges import ValueRange, format_number
from worker.decode.ratelimit import RateLimiter
from worker.decode.registry import DatapointLimit, Device, DeviceRegistry
from worker.metrics import Metrics
from worker.retry import retry_transient
from worker.runtime.actor import MailboxActor
from worker.runtime.mailbox import Mailbox


class Decoder(MailboxActor[RawMessage]):
    name = "decoder"
    batch_max = 2000

    def __init__(
        self,
        mailbox: Mailbox[RawMessage],
        downstream: Mailbox[DecodedBatch],
        codecs: dict[str, Codec],
        limits: Limits,
        registry: DeviceRegistry,
        metrics: Metrics,
        rate_limiter: RateLimiter | None = None,
        keep_raw: bool = False,
    ) -> None:
        super().__init__(mailbox)
        self._keep_raw = keep_raw  # the Kafka bridge publishes the messages as received
        self._downstream = downstream
        self._codecs = codecs
        self._limits = limits
        self._registry = registry
        self._metrics = metrics
        self._rate_limiter = rate_limiter if rate_limiter is not None and rate_limiter.enabled else None

    async def handle(self, items: list[RawMessage]) -> None:
        # Device lookups may hit PostgreSQL/Redis: wait out an outage rather than crash,
        # decoding the whole batch afresh each time so nothing is half done.
        batch = await retry_transient(
            lambda: self._decode(items), "metadata", reset=self._registry.forget, holding=len(items)
        )
        self._metrics.inc("messages_decoded", len(items))
        await self._downstream.put(batch)

    async def _decode(self, items: list[RawMessage]) -> DecodedBatch:
        batch = DecodedBatch(messages=len(items), raw=list(items) if self._keep_raw else [])
        parsed: list[tuple[RawMessage, ParsedMessage]] = []
        for message in items:
            batch.acks.append(message.ack)
            if message.rejected:
                batch.dead_letters.append(_dead(message, Reason.BAD_ENVELOPE, message.rejected))
                continue
            try:
                parsed.append(
                    (
                        message,
                        parse_message(
                            message.topic,
                            message.payload,
                            message.received_at,
                            self._codecs,
                            self._limits,
                        ),
                    )
                )
            except Rejected as exc:
                batch.dead_letters.append(_dead(message, exc.reason, exc.detail))
        if parsed:
            await self._resolve(parsed, batch)
        return batch

    async def _resolve(self, parsed: list[tuple[RawMessage, ParsedMessage]], batch: DecodedBatch) -> None:
        devices = await self._registry.resolve({p.device for _, p in parsed})
        allowance = await self._allowance(parsed, devices)
        for message, result in parsed:
            device = devices.get(result.device)
            if device is None:
                batch.dead_letters.append(
                    _dead(
                        message,
                        Reason.UNKNOWN_DEVICE,
                        f"{result.device.kind} {result.device.value} is not in devices",
                    )
                )
                continue
            if device.status == "disabled":
                batch.dead_letters.append(_dead(message, Reason.DEVICE_DISABLED, f"device {device.id}"))
                continue
            if allowance is not None:
                if allowance[device.id] <= 0:
                    batch.dead_letters.append(
                        _dead(message, Reason.RATE_LIMITED, self._over_limit(device.id))
                    )
                    self._metrics.inc("rate_limited")
                    continue
                allowance[device.id] -= 1
            known = device.datapoints
            if all(r.label in known for r in result.readings):
                ids = known  # the common case: no await, no dict built
            else:
                try:
                    ids = await self._registry.datapoints(device, {r.label: r.unit for r in result.readings})
                except DatapointLimit as exc:
                    batch.dead_letters.append(
                        _dead(message, Reason.DATAPOINT_LIMIT, f"{exc} on device {device.id}")
                    )
                    continue
            unknown = [r.label for r in result.readings if r.label not in ids]
            if unknown:
                # All or nothing per message, so a redelivery never half-succeeds differently.
                batch.dead_letters.append(
                    _dead(message, Reason.UNKNOWN_DATAPOINT, f"{', '.join(unknown)} on device {device.id}")
                )
                continue
            implausible = _out_of_range(result.readings, device.ranges)
            if implausible:
                # Also the whole message: a sensor this broken spoils the frame it is in.
                batch.dead_letters.append(
                    _dead(message, Reason.OUT_OF_RANGE, f"{implausible} on device {device.id}")
                )
                continue
            batch.device_users[device.id] = device.user_id
            batch.readings.extend(
                Reading(r.timestamp, device.id, ids[r.label], r.value, r.label)
                for r in result.readings
                if r.text is None
            )
            if self._limits.keep_text:
                batch.texts.extend(
                    TextReading(r.timestamp, device.id, ids[r.label], text, r.label)
                    for r in result.readings
                    if (text := r.text) is not None
                )
            if result.skipped:
                batch.dead_letters.append(_dead(message, Reason.SKIPPED_FIELDS, "; ".join(result.skipped)))

    async def _allowance(
        self, parsed: list[tuple[RawMessage, ParsedMessage]], devices: dict[DeviceRef, Device]
    ) -> dict[int, int] | None:
        """Messages each known device may still send in this batch; None when unlimited."""
        if self._rate_limiter is None:
            return None
        counts: Counter[int] = Counter()
        for _, result in parsed:
            device = devices.get(result.device)
            if device is not None and device.status != "disabled":
                counts[device.id] += 1
        return await self._rate_limiter.admit(dict(counts)) if counts else {}

    def _over_limit(self, device_id: int) -> str:
        assert self._rate_limiter is not None
        return f"device {device_id} is over {self._rate_limiter.describe()}"


def _out_of_range(readings: list[ParsedReading], ranges: dict[str, ValueRange]) -> str:
    """What lies outside its datapoint's range, as `label=value outside [min, max]`; "" if nothing."""
    if not ranges:
        return ""  # most devices: no ranges, no loop
    return "; ".join(
        f"{r.label}={format_number(r.value)} outside {ranges[r.label]}"
        for r in readings
        if r.label in ranges and r.text is None and not ranges[r.label].contains(r.value)
    )


def _dead(message: RawMessage, reason: Reason, detail: str) -> DeadLetter:
    """A dead letter with its topic and reason capped (a fuzzer's 60,000-character topic
    must not be stored twice in full) and NUL escaped: a dead letter must never fail to store."""
    topic = message.topic.replace("\x00", "\\x00")
    reason_size = len(reason) + 2 + len(detail)
    detail_cap = DEAD_LETTER_REASON_CHARS - len(reason) - 2
    return DeadLetter(
        topic=topic[:DEAD_LETTER_TOPIC_CHARS],
        payload=message.payload,
        reason=reason,
        detail=detail[:detail_cap].replace("\x00", "\\x00"),
        received_at=message.received_at,
        fingerprint=hashlib.sha256(topic.encode("utf-8", "surrogatepass") + b"\0" + message.payload).digest(),
        topic_size=len(topic),
        reason_size=reason_size,
    )
