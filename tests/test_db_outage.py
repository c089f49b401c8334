"""PostgreSQL stops mid-stream: ingest holds the batch in hand, commits no offset and
dead-letters nothing, then resumes by itself when the database is back, and the
end state is exact (invariants 1-3 and 7)."""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import pytest

from config.settings import Settings
from herald.inspect import wait_committed
from producers.topics import Topics, ensure_topics
from tests.conftest import Backend
from tests.faults import (
    HeraldProcess,
    OrderedProducer,
    Stream,
    StreamBuilder,
    check_end_state,
    committed_now,
    dlq_count,
    last_offsets,
    store_preferences,
    truncate,
    users,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_SECONDS = 4.0


def test_postgres_stop_and_start_mid_stream(settings: Settings, backend: Backend, tmp_path: Path) -> None:
    pg = backend.postgres
    if pg is None:
        pytest.fail(
            "this test stops and starts PostgreSQL, which needs the embedded database; "
            "HERALD_TEST_DATABASE_URL or the containers backend gives it a database it cannot stop"
        )
    seed = random.SystemRandom().randrange(2**32)
    print(f"db outage seed: {seed}")
    rng = random.Random(seed)

    s = settings.model_copy(update={"topic_partitions": 4, "session_timeout_ms": 6000, "batch_size": 200})
    topics = Topics(s.topic_prefix)
    ensure_topics(s, topics.ingest_topics())
    truncate(backend.database_url)
    people = users(200)
    prefs = store_preferences(backend.database_url, people, s)
    builder = StreamBuilder(rng, topics.events, people, tag=uuid.uuid4().hex[:6])
    before = builder.build(600)
    during = builder.build(600)  # repeats events from before the outage, too
    after = builder.build(400, malformed=15)
    stream = Stream()
    for part in (before, during, after):
        stream.extend(part)

    producer = OrderedProducer(s, topics.events)
    proc = HeraldProcess(s, f"outage-{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        proc.start()
        proc.wait_assigned(timeout=60)
        positions = producer.produce(before.values)
        wait_committed(s, proc.group, last_offsets(positions), timeout=60)
        done = committed_now(s, proc.group)

        try:
            pg.stop()
            positions += producer.produce(during.values)
            time.sleep(OUTAGE_SECONDS)
            assert proc.alive(), "ingest must wait for PostgreSQL, not exit"
            assert "retrying the batch" in proc.log_text(), "ingest never noticed PostgreSQL was down"
            assert committed_now(s, proc.group) == done, "offsets moved while PostgreSQL was down"
            assert dlq_count(s) == 0, "an outage must not dead-letter valid events"
        finally:
            pg.start()  # other tests share this server: it must run again whatever happened
        assert pg.url == backend.database_url, f"PostgreSQL came back elsewhere: {pg.url}"

        positions += producer.produce(after.values)
        started = time.monotonic()
        wait_committed(s, proc.group, last_offsets(positions), timeout=90)
        print(f"caught up {time.monotonic() - started:.1f}s after PostgreSQL came back")
        assert proc.alive(), "ingest must resume by itself"
        assert proc.terminate(timeout=60) == 0, "SIGTERM must end ingest cleanly (exit 0)"

        report = check_end_state(s, backend.database_url, stream, positions, prefs)
        print(f"end state ok: {report}")
    except BaseException:
        print(f"seed {seed}\n{proc.tails(60)}")
        raise
    finally:
        proc.cleanup()
