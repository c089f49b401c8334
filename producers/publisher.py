"""The producer seam: publish a batch of records and wait until the broker has them all."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import KafkaError, Message, Producer

from config.settings import Settings
from core.errors import BrokerUnavailable

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]
# Where the broker stored a record: (topic, partition, offset).
Position = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: Headers = field(default_factory=list)
    timestamp_ms: int | None = None
    # Why a dead-letter record failed, for metrics (also in its headers).
    reason: str | None = None


class Publisher(Protocol):
    def publish(self, records: Sequence[OutRecord]) -> list[Position]:
        """Return only once every record is acknowledged; raise ``BrokerUnavailable`` if not.

        The positions come in acknowledgement order, not in the order of ``records``.
        """

    def close(self) -> None: ...


def producer_config(settings: Settings, **extra: str | int | bool) -> dict[str, str | int | float | bool]:
    conf: dict[str, str | int | float | bool] = {
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": "lz4",
        "message.timeout.ms": 30_000,
    }
    conf.update(settings.kafka_client_config())
    conf.update(extra)
    return conf


class KafkaPublisher:
    """confluent-kafka producer; ``publish`` is synchronous per batch, not per record."""

    def __init__(self, settings: Settings, *, flush_timeout: float = 60.0, **extra: str | int | bool) -> None:
        self._producer = Producer(producer_config(settings, **extra))
        self._flush_timeout = flush_timeout

    def publish(self, records: Sequence[OutRecord]) -> list[Position]:
        if not records:
            return []
        failures: list[KafkaError] = []
        acked: list[Position] = []

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failures.append(err)
            else:
                acked.append((msg.topic() or "", msg.partition() or 0, msg.offset() or 0))

        for rec in records:
            self._produce(rec, on_delivery)
        remaining = self._producer.flush(self._flush_timeout)
        if remaining:
            raise BrokerUnavailable(f"{remaining} records not acknowledged in {self._flush_timeout}s")
        if failures:
            raise BrokerUnavailable(f"{len(failures)} records failed: {failures[0]}")
        return acked

    def _produce(self, rec: OutRecord, on_delivery: Callable[[KafkaError | None, Message], None]) -> None:
        while True:
            try:
                self._producer.produce(
                    rec.topic,
                    value=rec.value,
                    key=rec.key,
                    headers=list(rec.headers) or None,
                    timestamp=rec.timestamp_ms or 0,
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                # Local queue full: let deliveries drain, then try again.
                self._producer.poll(0.1)

    def close(self) -> None:
        self._producer.flush(self._flush_timeout)
