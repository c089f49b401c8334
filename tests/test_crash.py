"""Invariants 1-3 under kill -9: an ingest process is SIGKILLed at random moments
mid-stream and restarted, and the end state is exactly what the stream asks for.

Set HERALD_CRASH_SEED to replay a run's kill moments and stream.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from config.settings import Settings
from herald.inspect import wait_committed
from producers.topics import Topics, ensure_topics
from tests.conftest import Backend
from tests.faults import (
    HeraldProcess,
    OrderedProducer,
    StreamBuilder,
    Trickle,
    check_end_state,
    committed_now,
    last_offsets,
    store_preferences,
    users,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECORDS = 5_200
MALFORMED = 30
KILLS = 6
# Kill this many seconds (uniform) after the process logged its k-th batch (k uniform in 1..2).
KILL_DELAY = (0.0, 0.03)
BATCH_LINE = "consumers.ingest: batch:"


def _unpublished(db_url: str) -> set[str]:
    """Delivery rows committed in PostgreSQL whose records are not yet acknowledged (the outbox)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute("SELECT id FROM deliveries WHERE published_at IS NULL").fetchall()
    return {str(r[0]) for r in rows}


def test_sigkill_mid_stream_changes_nothing_in_the_end_state(
    settings: Settings, backend: Backend, db: psycopg.Connection[tuple[object, ...]], tmp_path: Path
) -> None:
    seed = int(os.environ.get("HERALD_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash test seed: {seed} (HERALD_CRASH_SEED={seed} replays it)")
    rng = random.Random(seed)

    s = settings.model_copy(update={"topic_partitions": 4, "session_timeout_ms": 6000, "batch_size": 200})
    topics = Topics(s.topic_prefix)
    ensure_topics(s, topics.ingest_topics())
    people = users(300)
    prefs = store_preferences(backend.database_url, people, s)
    stream = StreamBuilder(rng, topics.events, people, tag=uuid.uuid4().hex[:6]).build(
        RECORDS, duplicate_share=0.10, malformed=MALFORMED
    )
    # Each cycle: most of a chunk waits as a backlog for the restarted process, the rest
    # flows while it works; the kill comes at a random moment after its k-th batch (the
    # subprocess logs each batch at DEBUG; a batch takes ~20-40 ms here), so it lands
    # inside a batch while a backlog is left, sometimes between the PostgreSQL commit
    # and the outbox drain. The last chunk flows while the final process drains.
    chunks = [[stream.values[i] for i in c] for c in stream.chunks(KILLS + 1)]
    producer = OrderedProducer(s, topics.events)
    positions: list[tuple[str, int, int]] = []

    proc = HeraldProcess(s, f"crash-{uuid.uuid4().hex[:8]}", tmp_path, HERALD_LOG_LEVEL="DEBUG")
    kills: list[dict[str, int]] = []
    try:
        for cycle in range(KILLS):
            half = len(chunks[cycle]) * 4 // 5
            positions += producer.produce(chunks[cycle][:half])
            waiting = _unpublished(backend.database_url)
            proc.start()
            proc.wait_assigned(timeout=60)
            trickle = Trickle(producer, chunks[cycle][half:])
            trickle.start()
            nth = rng.randint(1, 2)
            delay = rng.uniform(*KILL_DELAY)
            proc.wait_count(BATCH_LINE, nth, timeout=10)
            time.sleep(delay)
            produced = len(positions) + len(trickle.positions)
            alive = proc.kill()
            done = sum(o for o in committed_now(s, proc.group).values() if o > 0)
            kills.append(
                {
                    "alive": int(alive),
                    "after_batch": nth,
                    "delay_ms": round(delay * 1000),
                    "committed": done,
                    "produced": produced,
                    # rows this process committed but never saw acknowledged: killed in the window
                    "left_in_outbox": len(_unpublished(backend.database_url) - waiting),
                }
            )
            print(f"kill {cycle + 1}: {kills[-1]}")
            positions += trickle.result()

        proc.start()
        trickle = Trickle(producer, chunks[-1])
        trickle.start()
        positions += trickle.result()
        assert len(positions) == len(stream)
        started = time.monotonic()
        wait_committed(s, proc.group, last_offsets(positions), timeout=150)
        print(f"final drain: {time.monotonic() - started:.1f}s after the last produce")
        assert proc.terminate(timeout=60) == 0, "SIGTERM must end ingest cleanly (exit 0)"

        alive_kills = sum(1 for k in kills if k["alive"])
        assert alive_kills >= 5, f"only {alive_kills} kills hit a live process: {kills}"
        mid_stream = sum(1 for k in kills if k["alive"] and k["committed"] < k["produced"])
        assert mid_stream >= 3, f"only {mid_stream} kills landed with records still unprocessed: {kills}"

        report = check_end_state(s, backend.database_url, stream, positions, prefs)
        outbox_hits = sum(1 for k in kills if k["left_in_outbox"] > 0)
        print(
            f"end state ok: {report}; {stream.exact_duplicates} exact and "
            f"{stream.semantic_duplicates} semantic duplicates; {alive_kills} kills, "
            f"{outbox_hits} between the PostgreSQL commit and the outbox drain"
        )
    except BaseException:
        print(f"seed {seed}; kills {kills}\n{proc.tails()}")
        raise
    finally:
        proc.cleanup()
