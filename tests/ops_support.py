"""Shared by the operator-tool tests: run ``herald`` against a test's settings, produce
records one per batch with chosen timestamps, set and read a group's offsets."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Sequence

from confluent_kafka import Consumer, Producer, TopicPartition

from config.settings import Settings
from consumers.offsets import Kafka
from tests.helpers import herald_cli


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "HERALD_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "HERALD_DATABASE_URL": settings.database_url.get_secret_value(),
        "HERALD_TOPIC_PREFIX": settings.topic_prefix,
        "HERALD_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "HERALD_METRICS_PORT": "-1",
        **extra,
    }


def run(
    settings: Settings, *args: str, stdin: str | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    """``herald ARGS`` as an operator types it; asserts no traceback ever reaches the terminal."""
    done = herald_cli(*args, env=cli_env(settings, **extra), stdin=stdin, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def produce_single(
    settings: Settings,
    topic: str,
    values: Sequence[bytes],
    *,
    timestamps_ms: Sequence[int] | None = None,
    headers: Sequence[list[tuple[str, bytes]]] | None = None,
    partition: int = 0,
    key: bytes | None = None,
) -> list[int]:
    """One record per batch (flushed one by one: the embedded broker's watermark is exact
    only then, DESIGN.md), with the given CreateTime timestamps; returns the offsets."""
    p = Producer({**settings.kafka_client_config(), "linger.ms": 0})
    offsets: list[int] = []

    def on_delivery(err: object, msg: object) -> None:
        assert err is None, err
        offsets.append(msg.offset())  # type: ignore[attr-defined]

    for i, value in enumerate(values):
        kwargs: dict[str, object] = {"partition": partition, "on_delivery": on_delivery}
        if timestamps_ms is not None:
            kwargs["timestamp"] = timestamps_ms[i]
        if headers is not None:
            kwargs["headers"] = headers[i]
        p.produce(topic, value=value, key=key, **kwargs)
        assert p.flush(30) == 0
    return offsets


def set_offsets(settings: Settings, group: str, offsets: dict[tuple[str, int], int]) -> None:
    """Commit ``offsets`` for ``group`` as its consumers would (the group then exists)."""
    c = Consumer({**settings.kafka_client_config(), "group.id": group, "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False)
    finally:
        c.close()


def group_offsets(settings: Settings, group: str) -> dict[tuple[str, int], int]:
    with Kafka(settings) as k:
        return k.committed(group)


def new_group(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"
