"""The outbox relay publishes delivery rows that no batch will ever come back for, once.

Stranded rows are made the way production strands them: ingest commits the batch,
then its publish fails and the group's offsets are moved past the batch (a replay
tool, expired retention), so the batch never comes again.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Sequence

import psycopg
import pytest
from confluent_kafka import TopicPartition
from prometheus_client import REGISTRY

from config.settings import Settings
from consumers.ingest import IngestHandler
from consumers.outbox import OutboxRelay
from core.errors import BrokerUnavailable
from herald.inspect import read_topic
from producers.publisher import KafkaPublisher, OutRecord, Position
from producers.topics import Topics, ensure_topics
from storage.db import Database
from storage.preferences import set_preferences
from tests.helpers import event, produce, start_ingest

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]


class BrokenPublisher:
    """The broker never acknowledges: ingest commits its rows, then cannot publish them."""

    def publish(self, records: Sequence[OutRecord]) -> list[Position]:
        raise BrokerUnavailable("broker gone (test)")

    def close(self) -> None:
        pass


def strand(settings: Settings, db: Conn, count: int, age_s: float = 600.0) -> None:
    """``count`` critical events for email-on users: committed rows, nothing published."""
    database = Database(settings.database_url.get_secret_value())
    users = [f"stranded-{i % 7}" for i in range(count)]
    for u in set(users):
        set_preferences(database, u, {"email": True})
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.ingest_topics())
    from confluent_kafka import Consumer

    produce(settings, [event(user_id=u, severity="critical") for u in users])
    consumer = Consumer(
        {**settings.kafka_client_config(), "group.id": "strand", "auto.offset.reset": "earliest"}
    )
    consumer.assign([TopicPartition(topics.events, p, 0) for p in range(settings.topic_partitions)])
    messages = []
    deadline = time.monotonic() + 30
    while len(messages) < count and time.monotonic() < deadline:
        messages += [m for m in consumer.consume(500, timeout=1) if m.error() is None]
    consumer.close()
    handler = IngestHandler(settings, database, BrokenPublisher(), topics)
    with pytest.raises(BrokerUnavailable):
        handler.apply(handler.prepare(messages))
    database.close()
    db.execute("UPDATE deliveries SET created_at = now() - make_interval(secs => %s)", (age_s,))


def _unpublished(db: Conn) -> int:
    row = db.execute("SELECT count(*) FROM deliveries WHERE published_at IS NULL").fetchone()
    assert row is not None
    return int(str(row[0]))


def _delivery_ids(settings: Settings) -> Counter[str]:
    """Every delivery id published, immediate (email) or folded by the rate limit (digest)."""
    topics = Topics(settings.topic_prefix)
    records = read_topic(settings, topics.deliveries("email"), timeout=10)
    records += read_topic(settings, topics.digests_pending, timeout=10)
    return Counter(json.loads(r.value or b"{}")["delivery_id"] for r in records)


def test_stranded_rows_are_published_once(settings: Settings, db: Conn) -> None:
    strand(settings, db, 20)
    assert _unpublished(db) == 20
    database = Database(settings.database_url.get_secret_value())
    publisher = KafkaPublisher(settings)
    try:
        relay = OutboxRelay(settings, database, publisher, Topics(settings.topic_prefix))
        assert relay.run_once() == 20
        assert relay.run_once() == 0  # published rows are never taken again
    finally:
        publisher.close()
        database.close()
    assert _unpublished(db) == 0
    ids = _delivery_ids(settings)
    assert len(ids) == 20 and set(ids.values()) == {1}
    stored = {str(r[0]) for r in db.execute("SELECT id FROM deliveries").fetchall()}
    assert set(ids) == stored


def test_young_rows_are_left_to_the_batch_that_wrote_them(settings: Settings, db: Conn) -> None:
    strand(settings, db, 5, age_s=0)
    database = Database(settings.database_url.get_secret_value())
    publisher = KafkaPublisher(settings)
    try:
        s = settings.model_copy(update={"outbox_relay_after_s": 300})
        assert OutboxRelay(s, database, publisher, Topics(settings.topic_prefix)).run_once() == 0
    finally:
        publisher.close()
        database.close()
    assert _unpublished(db) == 5


def test_two_relays_at_once_publish_each_row_once(settings: Settings, db: Conn) -> None:
    """SKIP LOCKED: two ingest processes' relays split the rows, they never share one."""
    strand(settings, db, 2500)
    topics = Topics(settings.topic_prefix)
    done: list[int] = []

    def relay() -> None:
        database = Database(settings.database_url.get_secret_value())
        publisher = KafkaPublisher(settings)
        try:
            done.append(OutboxRelay(settings, database, publisher, topics).run_once())
        finally:
            publisher.close()
            database.close()

    threads = [threading.Thread(target=relay) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(done) == 2500, done
    ids = _delivery_ids(settings)
    assert len(ids) == 2500 and set(ids.values()) == {1}


def test_the_ingest_process_runs_the_relay(settings: Settings, db: Conn) -> None:
    strand(settings, db, 3)
    before = REGISTRY.get_sample_value("herald_outbox_relayed_total") or 0.0
    s = settings.model_copy(update={"outbox_relay_every_s": 0.2, "outbox_relay_after_s": 1.0})
    runner = start_ingest(s)
    try:
        deadline = time.monotonic() + 30
        while _unpublished(db):
            assert time.monotonic() < deadline, "the relay did not publish the stranded rows"
            time.sleep(0.1)
    finally:
        runner.stop()
    assert (REGISTRY.get_sample_value("herald_outbox_relayed_total") or 0.0) - before == 3
    assert len(_delivery_ids(settings)) == 3
