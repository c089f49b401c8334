"""Read-side helpers for operators, the demo and tests: read a topic, wait for a group.

Reading a topic lives in ``consumers/reading.py`` (the operator commands use it too).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import (
    ConsumerGroupState,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from config.settings import Settings
from consumers.reading import Record, consumer, read_topic
from producers.publisher import KAFKA_LOG

__all__ = ["Record", "committed", "read_topic", "wait_committed", "wait_group_stable"]


def committed(
    settings: Settings, group: str, partitions: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    c = consumer(settings, group)
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
