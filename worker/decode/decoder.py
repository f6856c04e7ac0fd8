"""The decoder actor: raw messages in, `DecodedBatch`es of readings and dead letters out."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from itertools import repeat
from pathlib import Path

from schemas.records import (
    DEAD_LETTER_REASON_CHARS,
    DEAD_LETTER_TOPIC_CHARS,
    HTTP_PARTITION,
    DeadLetter,
    DecodedBatch,
    RawMessage,
    Reading,
    Reason,
    TextReading,
)
from worker.config import Settings
from worker.decode.codecs import Codec, load_codecs
from worker.decode.mappings import MappingSet, load_mappings
from worker.decode.parse import (
    TOPIC_CACHE_MAX,
    DeviceRef,
    Ignored,
    Limits,
    MessageParser,
    ParsedMessage,
    Rejected,
)
from worker.decode.ranges import ValueRange, format_number
from worker.decode.ratelimit import RateLimiter
from worker.decode.registry import Device, DeviceRegistry
from worker.metrics import Metrics
from worker.retry import retry_transient
from worker.runtime.actor import MailboxActor
from worker.runtime.mailbox import Mailbox


def decode_limits(settings: Settings) -> Limits:
    """What the settings allow of a message (the daemon and a dead-letter replay alike)."""
    pipeline = settings.pipeline
    return Limits(
        max_payload_bytes=pipeline.max_payload_bytes,
        max_future_s=pipeline.max_future_s,
        max_age_s=pipeline.max_age_s,
        keep_text=settings.timeseries.uses_cassandra,  # text_value (docs/storage.md)
    )


def configured_codecs(settings: Settings) -> dict[str, Codec]:
    """The codec file of `pipeline.codecs`, or the built-in one; CodecConfigError if malformed."""
    return load_codecs(Path(settings.pipeline.codecs) if settings.pipeline.codecs else None)


def configured_mappings(settings: Settings) -> MappingSet:
    """The profiles of `decode.profiles` and the files of `decode.mappings`;
    MappingConfigError (a CodecConfigError) if one is malformed."""
    return load_mappings(settings.decode.profiles, settings.decode.mappings)


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
        topic_cache_size: int = TOPIC_CACHE_MAX,
        mappings: MappingSet | None = None,
    ) -> None:
        super().__init__(mailbox)
        self._keep_raw = keep_raw  # the Kafka bridge publishes the messages as received
        self._downstream = downstream
        self._limits = limits
        self._topic_cache_size = topic_cache_size
        self._parser = MessageParser(codecs, limits, topic_cache_size, mappings)
        self._registry = registry
        self._metrics = metrics
        self._rate_limiter = rate_limiter if rate_limiter is not None and rate_limiter.enabled else None

    @property
    def registry(self) -> DeviceRegistry:
        return self._registry

    def use_codecs(self, codecs: dict[str, Codec], mappings: MappingSet | None = None) -> None:
        """Decode with these codecs and mappings from the next message on (a reload); the
        topics the parser remembered name the old ones, so it starts afresh."""
        self._parser = MessageParser(codecs, self._limits, self._topic_cache_size, mappings)

    async def handle(self, items: list[RawMessage]) -> None:
        # Device lookups may hit PostgreSQL/Redis: wait out an outage rather than crash,
        # decoding the whole batch afresh each time so nothing is half done.
        batch = await retry_transient(
            lambda: self.decode(items), "metadata", reset=self._registry.forget, holding=len(items)
        )
        self._metrics.inc("messages_decoded", len(items))
        await self._downstream.put(batch)

    async def decode(self, items: list[RawMessage]) -> DecodedBatch:
        """One batch's readings and dead letters, its devices resolved (and registered) at once."""
        batch = DecodedBatch(messages=len(items), raw=list(items) if self._keep_raw else [])
        parse = self._parser.parse
        acks = batch.acks
        parsed: list[tuple[RawMessage, ParsedMessage]] = []
        for message in items:
            acks.append(message.ack)
            if message.rejected:
                batch.dead_letters.append(_dead(message, Reason.BAD_ENVELOPE, message.rejected))
                continue
            try:
                parsed.append((message, parse(message.topic, message.payload, message.received_at)))
            except Rejected as exc:
                batch.dead_letters.append(_dead(message, exc.reason, exc.detail))
            except Ignored:
                pass  # acknowledged with the batch, nothing to store
        if parsed:
            await self._resolve(parsed, batch)
        return batch

    async def _resolve(self, parsed: list[tuple[RawMessage, ParsedMessage]], batch: DecodedBatch) -> None:
        """Devices are resolved once for the batch, and every datapoint it lacks is looked up
        (or registered) in one go; then each message becomes readings or a dead letter."""
        devices = await self._registry.resolve({p.device for _, p in parsed})
        allowance = await self._allowance(parsed, devices)
        accepted: list[tuple[RawMessage, ParsedMessage, Device, list[int] | None]] = []
        requests: list[tuple[Device, dict[str, str | None]]] = []
        for message, result in parsed:
            device = devices.get(result.device)
            if device is None:
                detail = f"{result.device.kind} {result.device.value} is not in devices"
                batch.dead_letters.append(_dead(message, Reason.UNKNOWN_DEVICE, detail))
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
            try:
                ids: list[int] | None = list(map(known.__getitem__, result.labels))  # no frame per call
            except KeyError:
                ids = None  # the rare case: a label this process has not seen on the device
                units = result.units or [None] * len(result.labels)
                requests.append((device, dict(zip(result.labels, units, strict=True))))
            accepted.append((message, result, device, ids))
        limits = iter(await self._registry.add_datapoints(requests) if requests else ())
        readings = batch.readings
        users = batch.device_users
        for message, result, device, ids in accepted:
            if ids is None:
                limit = next(limits)
                if limit is not None:
                    batch.dead_letters.append(
                        _dead(message, Reason.DATAPOINT_LIMIT, f"{limit} on device {device.id}")
                    )
                    continue
                known = device.datapoints
                unknown = [label for label in result.labels if label not in known]
                if unknown:
                    # All or nothing per message, so a redelivery never half-succeeds differently.
                    detail = f"{', '.join(unknown)} on device {device.id}"
                    batch.dead_letters.append(_dead(message, Reason.UNKNOWN_DATAPOINT, detail))
                    continue
                ids = [known[label] for label in result.labels]
            if device.ranges:
                implausible = _out_of_range(result, device.ranges)
                if implausible:
                    # Also the whole message: a sensor this broken spoils the frame it is in.
                    detail = f"{implausible} on device {device.id}"
                    batch.dead_letters.append(_dead(message, Reason.OUT_OF_RANGE, detail))
                    continue
            users[device.id] = device.user_id
            if message.ack.partition == HTTP_PARTITION:
                batch.answered[message.ack] = len(result.values)
            if result.texts is None:
                readings.extend(
                    map(Reading, result.timestamps, repeat(device.id), ids, result.values, result.labels)
                )
            else:
                _split_texts(batch, result, device.id, ids)
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


def _out_of_range(result: ParsedMessage, ranges: Mapping[str, ValueRange]) -> str:
    """What lies outside its datapoint's range, as `label=value outside [min, max]`; "" if nothing."""
    texts = result.texts or [None] * len(result.labels)
    return "; ".join(
        f"{label}={format_number(value)} outside {ranges[label]}"
        for label, value, text in zip(result.labels, result.values, texts, strict=True)
        if label in ranges and text is None and not ranges[label].contains(value)
    )


def _split_texts(batch: DecodedBatch, result: ParsedMessage, device_id: int, ids: list[int]) -> None:
    """A message with string or boolean values (Limits.keep_text): numbers to `readings`,
    the rest to `texts`."""
    assert result.texts is not None
    columns = zip(result.timestamps, ids, result.values, result.labels, result.texts, strict=True)
    for timestamp, datapoint_id, value, label, text in columns:
        if text is None:
            batch.readings.append(Reading(timestamp, device_id, datapoint_id, value, label))
        else:
            batch.texts.append(TextReading(timestamp, device_id, datapoint_id, text, label))


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
        fingerprint=fingerprint(topic, message.payload),
        topic_size=len(topic),
        reason_size=reason_size,
    )


def fingerprint(topic: str, payload: bytes) -> bytes:
    """A dead letter's key, `sha256(topic \\0 payload)`, its topic NUL-escaped as stored: a
    redelivery finds its row, and so does a replay of the row."""
    return hashlib.sha256(topic.encode("utf-8", "surrogatepass") + b"\0" + payload).digest()
