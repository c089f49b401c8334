"""Reading a topic to its end by direct assignment (no group join): for operators and tests.

``herald dlq``, ``herald redrive`` and ``herald/inspect.py`` (the demo, the tests) share it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from config.settings import Settings
from core.errors import BrokerUnavailable
from producers.publisher import KAFKA_LOG


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int


def consumer(settings: Settings, group: str | None = None) -> Consumer:
    """A consumer that never commits by itself (a throw-away group unless one is named)."""
    conf = {
        "group.id": group or f"herald-inspect-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
    }
    conf.update(settings.kafka_client_config())
    return Consumer(conf, logger=KAFKA_LOG)


def headers_of(m: Message) -> dict[str, bytes]:
    raw = m.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    out: dict[str, bytes] = {}
    for k, v in pairs:
        out[k] = v.encode() if isinstance(v, str) else (v or b"")
    return out


def read_topic(
    settings: Settings, topic: str, timeout: float = 30.0, start: Mapping[int, int] | None = None
) -> list[Record]:
    """Every record on ``topic`` now (from ``start``: partition -> offset, where given).

    ``BrokerUnavailable`` when the broker does not answer or a partition does not reach
    its end within ``timeout``; an unknown topic reads as empty.
    """
    c = consumer(settings)
    try:
        try:
            meta = c.list_topics(topic, timeout=timeout).topics.get(topic)
        except KafkaException as exc:
            raise BrokerUnavailable(
                f"the broker at {settings.kafka_bootstrap} did not answer: {exc}"
            ) from exc
        if meta is None or meta.error is not None:
            return []
        begin = start or {}
        parts = [TopicPartition(topic, p, begin.get(p, OFFSET_BEGINNING)) for p in meta.partitions]
        c.assign(parts)
        pending = {p.partition for p in parts}
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(
                    f"reading {topic}: partitions {sorted(pending)} did not reach the end"
                )
            for m in c.consume(num_messages=1000, timeout=0.5):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(m.partition())
                    continue
                out.append(
                    Record(
                        topic=m.topic() or "",
                        partition=m.partition() or 0,
                        offset=m.offset() or 0,
                        key=m.key(),
                        value=m.value(),
                        headers=headers_of(m),
                        timestamp_ms=m.timestamp()[1],
                    )
                )
        return out
    finally:
        c.close()
