"""Read-side helpers for operators, the demo and tests: read a topic, wait for a group."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupState,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

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


def _consumer(settings: Settings, group: str | None = None) -> Consumer:
    conf = {
        "group.id": group or f"herald-inspect-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
    }
    conf.update(settings.kafka_client_config())
    return Consumer(conf, logger=KAFKA_LOG)


def read_topic(settings: Settings, topic: str, timeout: float = 30.0) -> list[Record]:
    """Every record on ``topic`` now, by direct assignment (no group join)."""
    c = _consumer(settings)
    try:
        meta = c.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None:
            return []
        parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
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
                        headers=_headers(m),
                        timestamp_ms=m.timestamp()[1],
                    )
                )
        return out
    finally:
        c.close()


def committed(
    settings: Settings, group: str, partitions: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    c = _consumer(settings, group)
    try:
        tps = c.committed([TopicPartition(t, p) for t, p in partitions], timeout=10)
        return {(tp.topic, tp.partition): tp.offset for tp in tps}
    finally:
        c.close()


def wait_committed(
    settings: Settings, group: str, targets: dict[tuple[str, int], int], timeout: float = 60.0
) -> None:
    """Wait until ``group`` has committed past every (topic, partition) -> last offset given."""
    deadline = time.monotonic() + timeout
    while True:
        got = committed(settings, group, targets)
        if all(got.get(k, -1) > off for k, off in targets.items()):
            return
        if time.monotonic() > deadline:
            behind = {
                f"{t}[{p}]": (got.get((t, p)), off)
                for (t, p), off in targets.items()
                if got.get((t, p), -1) <= off
            }
            raise TimeoutError(f"group {group} did not catch up in {timeout}s: {behind}")
        time.sleep(0.2)


def _headers(m: Message) -> dict[str, bytes]:
    raw = m.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    out: dict[str, bytes] = {}
    for k, v in pairs:
        out[k] = v.encode() if isinstance(v, str) else (v or b"")
    return out


def wait_group_stable(settings: Settings, group: str, timeout: float = 60.0) -> None:
    """Until ``group`` is STABLE: its members joined and own their partitions.

    Decided from the group state alone: the embedded broker reports no member list.
    """
    admin = AdminClient(settings.kafka_client_config(), logger=KAFKA_LOG)
    deadline = time.monotonic() + timeout
    while True:
        try:
            desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
            if desc.state == ConsumerGroupState.STABLE:
                return
        except KafkaException:
            pass  # the group does not exist yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {group} did not become stable in {timeout:.0f}s")
        time.sleep(0.2)
