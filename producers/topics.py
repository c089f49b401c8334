"""Topic names and their creation on start-up."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from config.settings import CHANNELS, Settings
from core.errors import BrokerUnavailable
from producers.publisher import KAFKA_LOG

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    """Every topic name derives from one prefix (default ``herald``)."""

    prefix: str = "herald"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def events_dlq(self) -> str:
        return f"{self.prefix}.events.dlq"

    @property
    def digests_pending(self) -> str:
        return f"{self.prefix}.digests.pending"

    def deliveries(self, channel: str) -> str:
        return f"{self.prefix}.deliveries.{channel}"

    def retry(self, channel: str, tier: str) -> str:
        """A retry topic, named by its delay: ``herald.deliveries.email.retry.5s``."""
        return f"{self.prefix}.deliveries.{channel}.retry.{tier}"

    def deliveries_dlq(self, channel: str) -> str:
        return f"{self.prefix}.deliveries.{channel}.dlq"

    def channel_topics(self, channel: str, tiers: Iterable[str]) -> list[str]:
        """What a channel's deliverer reads (its main topic, then its retry tiers)."""
        return [self.deliveries(channel), *(self.retry(channel, t) for t in tiers)]

    def ingest_topics(self) -> list[str]:
        """What the ingest process reads and writes."""
        out = [self.events, self.events_dlq, self.digests_pending]
        out += [self.deliveries(c) for c in CHANNELS]
        return out


def topic_config(settings: Settings, name: str) -> dict[str, str]:
    """Per-topic settings at creation: dead-letter topics get ``HERALD_DLQ_RETENTION_DAYS``."""
    if name.endswith(".dlq"):
        return {"retention.ms": str(int(settings.dlq_retention_days * 86_400_000))}
    return {}


def ensure_topics(settings: Settings, names: Iterable[str], timeout: float = 30.0) -> list[str]:
    """Create missing topics with the configured partitions and replication.

    Returns the names created. Existing topics are left as they are.
    """
    admin = AdminClient(settings.kafka_client_config(), logger=KAFKA_LOG)
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot list topics at {settings.kafka_bootstrap}: {exc}") from exc
    missing = sorted(set(names) - existing)
    if not missing:
        return []
    futures = admin.create_topics(
        [
            NewTopic(
                t, settings.topic_partitions, settings.topic_replication, config=topic_config(settings, t)
            )
            for t in missing
        ],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    created = []
    for name, fut in futures.items():
        try:
            fut.result()
            created.append(name)
            log.info(
                "created topic %s (%d partitions)", name, settings.topic_partitions, extra={"topic": name}
            )
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise BrokerUnavailable(f"cannot create topic {name}: {exc}") from exc
    return created
