"""Dead-letter records that JVM tools can read (Spring Kafka's header names)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from core import metrics
from producers.publisher import H_VALUE_DROPPED, Headers, OutRecord

H_TOPIC = "kafka_dlt-original-topic"
H_PARTITION = "kafka_dlt-original-partition"
H_OFFSET = "kafka_dlt-original-offset"
H_TIMESTAMP = "kafka_dlt-original-timestamp"
H_FQCN = "kafka_dlt-exception-fqcn"
H_MESSAGE = "kafka_dlt-exception-message"
# herald's own short, machine-readable reason code (not_json, schema, too_large, ...).
H_REASON = "herald-dlt-reason"
# The exception message header is cut to this many bytes (whole UTF-8 characters).
MESSAGE_LIMIT = 4000

DLT_HEADERS = frozenset(
    {H_TOPIC, H_PARTITION, H_OFFSET, H_TIMESTAMP, H_FQCN, H_MESSAGE, H_REASON, H_VALUE_DROPPED}
)


def dead_letter(msg: Message, dlq_topic: str, exc: BaseException, reason: str) -> OutRecord:
    """The original key, value and headers, plus where it came from and why it failed.

    Timestamped when published; the original time is in ``kafka_dlt-original-timestamp``.
    """
    kind, ts = msg.timestamp()
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    original: Headers = [(k, v) for k, v in pairs if k not in DLT_HEADERS]
    cls = type(exc)
    added: Headers = [
        (H_TOPIC, (msg.topic() or "").encode()),
        (H_PARTITION, struct.pack(">i", msg.partition() or 0)),
        (H_OFFSET, struct.pack(">q", msg.offset() or 0)),
        (H_TIMESTAMP, struct.pack(">q", ts if kind != TIMESTAMP_NOT_AVAILABLE else 0)),
        (H_FQCN, f"{cls.__module__}.{cls.__qualname__}".encode()),
        (H_MESSAGE, utf8_cut(str(exc), MESSAGE_LIMIT)),
        (H_REASON, reason.encode()),
    ]
    return OutRecord(
        topic=dlq_topic,
        value=msg.value(),
        key=msg.key(),
        headers=original + added,
        # None: the producer stamps it now, so topic retention counts from the failure, not
        # from the original (a replay of old events would otherwise expire at once).
        timestamp_ms=None,
        reason=reason,
    )


def count_dead_letters(consumer: str, records: Iterable[OutRecord]) -> None:
    """After the broker acknowledged them: each dead letter counts for its dead-letter topic
    and reason, and as a failed record of the topic it was read from."""
    m = metrics.loop()
    for rec in records:
        if rec.reason is None:
            continue
        m.dlq_records.labels(rec.topic, rec.reason).inc()
        original = next((v for k, v in rec.headers if k == H_TOPIC), None)
        topic = original.decode(errors="replace") if isinstance(original, bytes) else "unknown"
        m.records_failed.labels(consumer, topic).inc()


def utf8_cut(text: str, limit: int) -> bytes:
    """At most ``limit`` bytes of UTF-8, never half a character (JVM readers decode strictly)."""
    # "replace": a lone surrogate (from JSON's "\\ud800") cannot be encoded as it is.
    raw = text.encode("utf-8", "replace")[:limit]
    # The prefix is valid UTF-8 except a possibly cut last character, which "ignore" drops.
    return raw.decode("utf-8", "ignore").encode()


def decode_headers(headers: Mapping[str, bytes]) -> dict[str, object]:
    """Read the dead-letter headers back (for tests, ``herald redrive`` and humans)."""
    out: dict[str, object] = {}
    for name, raw in headers.items():
        if name == H_PARTITION:
            out[name] = struct.unpack(">i", raw)[0]
        elif name in (H_OFFSET, H_TIMESTAMP):
            out[name] = struct.unpack(">q", raw)[0]
        elif name in DLT_HEADERS:
            out[name] = raw.decode()
    return out
