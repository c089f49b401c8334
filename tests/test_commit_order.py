"""Commit order (invariant 7): a failure anywhere before step 3 of the loop leaves the
offset uncommitted; a retryable one keeps the batch in hand and commits it once.

``herald.inspect.committed`` reports a negative offset (OFFSET_INVALID, -1001) for
a partition the group never committed.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from confluent_kafka import Message
from prometheus_client import REGISTRY

from config.settings import Settings
from consumers.ingest import IngestHandler
from consumers.loop import BatchLoop
from core.errors import BrokerUnavailable, DatabaseUnavailable
from herald.embedded import free_port
from herald.inspect import read_topic
from producers.publisher import KafkaPublisher, OutRecord, Position
from producers.topics import Topics, ensure_topics
from storage.db import Database
from storage.preferences import set_preferences
from tests.faults import committed_now, last_offsets, produce_ordered
from tests.helpers import event, ingest, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Batch = list[tuple[str, int, int]]


def _positions(messages: Sequence[Message]) -> Batch:
    return [(m.topic() or "", m.partition() or 0, m.offset() or 0) for m in messages]


def _produce(settings: Settings, values: Sequence[dict[str, Any]]) -> list[Position]:
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.ingest_topics())
    return produce_ordered(settings, topics.events, [json.dumps(v).encode() for v in values])


def _loop(settings: Settings, group: str, handler: Any) -> BatchLoop:
    return BatchLoop(
        settings, name="test", group=group, topics=[Topics(settings.topic_prefix).events], handler=handler
    )


def _db_unavailable() -> float:
    return REGISTRY.get_sample_value("herald_db_unavailable_total", {"consumer": "test"}) or 0.0


def _nothing_committed(settings: Settings, group: str) -> None:
    got = committed_now(settings, group)
    assert got and all(off < 0 for off in got.values()), f"group {group} committed {got}"


def _committed_through(settings: Settings, group: str, positions: Sequence[Position]) -> None:
    """Committed: the last offset + 1 where records landed, nothing elsewhere."""
    want = {k: off + 1 for k, off in last_offsets(positions).items()}
    got = committed_now(settings, group)
    assert {k: v for k, v in got.items() if k in want} == want
    assert all(v < 0 for k, v in got.items() if k not in want), got


def test_a_handler_failure_leaves_the_offset_uncommitted(settings: Settings) -> None:
    positions = _produce(settings, [event() for _ in range(6)])
    group = f"g-{uuid.uuid4().hex[:8]}"
    seen: list[Batch] = []

    def handler(messages: Sequence[Message]) -> None:
        seen.append(_positions(messages))
        raise RuntimeError("the handler broke (test)")

    loop = _loop(settings, group, handler)
    with pytest.raises(RuntimeError, match="handler broke"):
        loop.run(timeout=30)
    assert len(seen) == 1, "a non-retryable failure is not retried in hand"
    assert set(seen[0]) <= set(positions)
    _nothing_committed(settings, group)

    # The next consumer of the group starts again from the first record.
    again: list[Batch] = []
    loop = _loop(settings, group, lambda messages: again.append(_positions(messages)))
    loop.run(max_messages=len(positions), timeout=30)
    assert sorted(p for b in again for p in b) == sorted(positions)
    _committed_through(settings, group, positions)


def test_database_unavailable_twice_retries_the_same_batch_and_commits_it_once(settings: Settings) -> None:
    # One partition (same key), so the first batch is a well-defined set of records.
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.ingest_topics())
    n = 8
    positions = produce(settings, [event() for _ in range(n)], key=b"one-partition")
    group = f"g-{uuid.uuid4().hex[:8]}"
    calls: list[Batch] = []
    committed_during: list[dict[tuple[str, int], int]] = []
    commits: list[Batch] = []
    before = _db_unavailable()

    def handler(messages: Sequence[Message]) -> None:
        calls.append(_positions(messages))
        committed_during.append(committed_now(settings, group))
        if len(calls) <= 2:
            raise DatabaseUnavailable("PostgreSQL is down (test)")

    loop = _loop(settings, group, handler)
    real_commit = loop._commit

    def counting_commit(batch: Sequence[Message], *rest: Any) -> None:
        commits.append(_positions(batch))
        real_commit(batch, *rest)

    loop._commit = counting_commit  # type: ignore[method-assign]
    stats = loop.run(max_messages=n, timeout=60)

    assert len(calls) >= 3
    assert calls[0] == calls[1] == calls[2], f"the batch in hand changed between retries: {calls[:3]}"
    for during in committed_during[:3]:
        assert all(off < 0 for off in during.values()), f"an offset moved during the retries: {during}"
    assert commits[0] == calls[0], "the retried batch is committed once it succeeds"
    assert commits == calls[2:], f"each batch committed exactly once: commits {commits}, calls {calls}"
    later = [p for b in calls[3:] for p in b]
    assert not set(later) & set(calls[0]), "a committed batch came back"
    assert sorted(p for b in calls[2:] for p in b) == sorted(positions), "every record exactly once"
    assert stats.batches == len(calls) - 2 and stats.messages == n
    assert _db_unavailable() - before == 2, "each retry is counted in herald_db_unavailable"
    _committed_through(settings, group, positions)


class CountingPublisher:
    """Wraps a publisher, counting publish attempts and the failures it raised."""

    def __init__(self, inner: KafkaPublisher) -> None:
        self.inner = inner
        self.attempts = 0
        self.failures: list[BaseException] = []
        self.failed_twice = threading.Event()

    def publish(self, records: Sequence[OutRecord]) -> list[Position]:
        self.attempts += 1
        try:
            return self.inner.publish(records)
        except BaseException as exc:
            self.failures.append(exc)
            if len(self.failures) >= 2:
                self.failed_twice.set()
            raise

    def close(self) -> None:
        self.inner.close()


def test_an_unreachable_broker_leaves_the_offset_uncommitted_and_the_outbox_full(
    settings: Settings, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    """Step 3 committed in PostgreSQL, step 4 never acknowledged: no offset moves, the
    delivery rows stay unpublished, and the next run of the group publishes them."""
    database = Database(settings.database_url.get_secret_value())
    set_preferences(database, "u-outbox", {"email": True, "push": True})
    events = [event(user_id="u-outbox", severity="critical") for _ in range(3)]
    events += [event(user_id="u-outbox", severity="info"), b"not json"]
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.ingest_topics())
    positions = produce_ordered(
        settings, topics.events, [e if isinstance(e, bytes) else json.dumps(e).encode() for e in events]
    )
    group = f"g-{uuid.uuid4().hex[:8]}"

    nowhere = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    publisher = CountingPublisher(
        KafkaPublisher(nowhere, flush_timeout=2.0, **{"message.timeout.ms": 1000, "log_level": 0})
    )
    handler = IngestHandler(settings, database, publisher, topics)
    loop = _loop(settings, group, handler)
    db_before = _db_unavailable()
    failed_twice, stop = publisher.failed_twice, loop.stopper
    stopper = threading.Thread(target=lambda: failed_twice.wait(60) and stop.set())
    stopper.start()
    try:
        stats = loop.run(timeout=60)
    finally:
        failed_twice.set()
        stopper.join()
        publisher.close()
        database.close()
    assert all(isinstance(f, BrokerUnavailable) for f in publisher.failures), publisher.failures
    assert len(publisher.failures) >= 2 and stats.batches == 0
    del loop, handler, publisher  # the producer that cannot reach a broker goes with them
    counted_as_db_outage = _db_unavailable() - db_before
    _nothing_committed(settings, group)

    # The notifications are stored (step 3), their deliveries wait in the outbox.
    rows = db.execute(
        "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL) FROM deliveries"
    ).fetchone()
    assert rows == (6, 6), f"(delivery rows, unpublished) = {rows}"
    assert db.execute("SELECT count(*) FROM notifications").fetchone() == (4,)
    for channel in ("email", "push"):
        assert read_topic(settings, topics.deliveries(channel)) == []
    assert read_topic(settings, topics.events_dlq) == []

    # The group's next run (the broker reachable again) drains the outbox: every delivery is published.
    ingest(settings, positions, group=group)
    assert db.execute("SELECT count(*) FROM notifications").fetchone() == (4,)
    ids = {str(r[0]) for r in db.execute("SELECT id FROM deliveries WHERE published_at IS NOT NULL")}
    assert len(ids) == 6
    published = {
        json.loads(r.value or b"{}")["delivery_id"]
        for channel in ("email", "push")
        for r in read_topic(settings, topics.deliveries(channel))
    }
    assert published == ids
    dead = {r.headers["kafka_dlt-original-offset"] for r in read_topic(settings, topics.events_dlq)}
    assert dead == {positions[-1][2].to_bytes(8, "big")}, (
        "the malformed record is dead-lettered once it can be"
    )

    # Last, so the checks above still run: a broker outage must not read as a database outage.
    assert counted_as_db_outage == 0, (
        f"BUG (consumers/loop.py, BatchLoop._apply): {counted_as_db_outage:.0f} BrokerUnavailable "
        "retries counted in herald_db_unavailable ('Batches paused because PostgreSQL was unreachable')"
    )


def test_a_bounded_run_ends_on_time_while_the_database_stays_down(settings: Settings) -> None:
    """``run(timeout=...)`` (and ``herald ingest --timeout``) must bound the run even when
    the batch in hand keeps failing with a retryable error; the batch stays uncommitted."""
    _produce(settings, [event() for _ in range(3)])
    group = f"g-{uuid.uuid4().hex[:8]}"
    calls: list[Batch] = []

    def handler(messages: Sequence[Message]) -> None:
        calls.append(_positions(messages))
        raise DatabaseUnavailable("PostgreSQL is down (test)")

    loop = _loop(settings, group, handler)
    done = threading.Event()
    runner = threading.Thread(target=lambda: (loop.run(timeout=2), done.set()), daemon=True)
    runner.start()
    ended_in_time = done.wait(8)  # joining takes ~1 s, the timeout 2 s, one backoff at most 1 s
    loop.stopper.set()  # free the loop either way
    runner.join(15)
    assert calls, "the handler never ran"
    _nothing_committed(settings, group)
    assert ended_in_time, (
        "BUG (consumers/loop.py, BatchLoop._apply): run(timeout=2) still running after 8 s: the "
        "retry-in-hand loop only checks the stopper, never the run's deadline"
    )
