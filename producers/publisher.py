"""The producer seam: publish a batch of records and wait until the broker has them all."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from config.settings import Settings
from core.errors import BrokerMisconfigured, BrokerUnavailable, FatalBrokerError, HeraldError

log = logging.getLogger(__name__)
# librdkafka's own log lines (connection failures, broker errors) go through Python logging.
KAFKA_LOG = logging.getLogger("herald.kafka")
# On a dead letter republished without its value because the broker refused its size.
H_VALUE_DROPPED = "herald-dlt-value-dropped"

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
        """Return only once every record is acknowledged; raise if not.

        ``BrokerUnavailable`` when it may pass by itself, ``BrokerMisconfigured`` when an
        operator must act (unknown topic, authorization, size limit), ``FatalBrokerError``
        when the producer can never recover.

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
        self._producer = Producer(producer_config(settings, **extra), logger=KAFKA_LOG)
        self._flush_timeout = flush_timeout

    def publish(self, records: Sequence[OutRecord]) -> list[Position]:
        """In this order:

        1. produce every record and wait for every ack;
        2. a dead letter the broker found too large is published again without its value
           (its headers still say where the original is), and waited for;
        3. raise if any record is still unacknowledged, so no offset moves past it.
        """
        if not records:
            return []
        outcome = _Outcome()
        self._send(records, outcome)
        shrink = [rec for rec, err in outcome.failures if _retry_without_value(rec, err)]
        if shrink:
            outcome.failures = [(r, e) for r, e in outcome.failures if not _retry_without_value(r, e)]
            log.warning(
                "%d dead letter(s) too large for the broker: publishing them without value", len(shrink)
            )
            self._send([value_dropped(rec) for rec in shrink], outcome)
        if outcome.failures:
            raise publish_error(outcome.failures)
        return outcome.acked

    def _send(self, records: Sequence[OutRecord], outcome: _Outcome) -> None:
        for rec in records:
            self._produce(rec, outcome)
        remaining = self._producer.flush(self._flush_timeout)
        if remaining:
            raise BrokerUnavailable(f"{remaining} records not acknowledged in {self._flush_timeout}s")

    def _produce(self, rec: OutRecord, outcome: _Outcome) -> None:
        while True:
            try:
                self._producer.produce(
                    rec.topic,
                    value=rec.value,
                    key=rec.key,
                    headers=list(rec.headers) or None,
                    timestamp=rec.timestamp_ms or 0,
                    on_delivery=outcome.callback(rec),
                )
                return
            except BufferError:
                # Local queue full: let deliveries drain, then try again.
                self._producer.poll(0.1)
            except KafkaException as exc:
                # Refused before it left (too large for message.max.bytes, unknown topic):
                # recorded like a failed delivery, so it is classified, never a crash.
                outcome.failures.append((rec, _kafka_error(exc)))
                return

    def close(self) -> None:
        self._producer.flush(self._flush_timeout)


class _Outcome:
    """Acks and failures of one ``publish`` call, filled by delivery callbacks."""

    def __init__(self) -> None:
        self.acked: list[Position] = []
        self.failures: list[tuple[OutRecord, KafkaError]] = []

    def callback(self, rec: OutRecord) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self.failures.append((rec, err))
            else:
                self.acked.append((msg.topic() or "", msg.partition() or 0, msg.offset() or 0))

        return on_delivery


def _kafka_error(exc: KafkaException) -> KafkaError:
    arg = exc.args[0] if exc.args else None
    return arg if isinstance(arg, KafkaError) else KafkaError(KafkaError._FAIL, str(exc))


TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
NO_TOPIC = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    }
)
# The broker refuses these records as they are: resending the same bytes fails the same way.
REFUSED = frozenset(
    {
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError.UNSUPPORTED_COMPRESSION_TYPE,
        KafkaError.INVALID_REQUIRED_ACKS,
        KafkaError.POLICY_VIOLATION,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError._INVALID_ARG,
    }
)


def _retry_without_value(rec: OutRecord, err: KafkaError) -> bool:
    """A dead letter must land even when its value cannot: its headers say where the original is."""
    return rec.reason is not None and rec.value is not None and err.code() in TOO_LARGE


def value_dropped(rec: OutRecord) -> OutRecord:
    """The same dead letter (key, coordinates, headers) without its value."""
    return replace(rec, value=None, headers=[*rec.headers, (H_VALUE_DROPPED, b"true")])


def publish_error(failures: Sequence[tuple[OutRecord, KafkaError]]) -> HeraldError:
    """The most severe failure decides: a fatal producer, then a misconfiguration, then an outage."""
    errors = [classify(rec, err) for rec, err in failures]
    for kind in (FatalBrokerError, BrokerMisconfigured):
        for exc in errors:
            if isinstance(exc, kind):
                return exc
    return BrokerUnavailable(f"{len(failures)} records failed: {failures[0][1].str()}")


def classify(rec: OutRecord, err: KafkaError) -> HeraldError:
    """Translate one failed record: permanent for this producer or broker, or passing."""
    code, where = err.code(), f"{rec.topic}: {err.str()}"
    if err.fatal():
        return FatalBrokerError(f"producer failed for good on {where}")
    if code in NO_TOPIC:
        return BrokerMisconfigured(where, "create the topic or grant the producer WRITE on it")
    if code in TOO_LARGE:
        size = len(rec.value or b"") + len(rec.key or b"")
        return BrokerMisconfigured(
            f"{where} ({size} bytes)",
            "raise message.max.bytes (HERALD_KAFKA__MESSAGE_MAX_BYTES) and the topic's max.message.bytes",
        )
    if code in REFUSED:
        return BrokerMisconfigured(
            where, "the broker refuses these records as sent: check its topic settings"
        )
    return BrokerUnavailable(where)
