"""Marking rows published never waits for a channel consumer, so it never deadlocks with one.

The digest (and ingest) mark delivery rows published after the broker acknowledged them.
By then a deliverer may already have read the record and be claiming the row, or be
recording its outcome: a chaos run (seed 8601) saw PostgreSQL break three such waits-for
cycles in one second, each after ``deadlock_timeout``, and every critical queued behind
them waited 2.6 s. Two sessions on the real database stand in for the two processes here.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

import psycopg
import pytest

from storage import deliveries as store
from storage.notifications import mark_published
from tests.conftest import Backend

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]


def _rows(db: Conn, n: int) -> list[uuid.UUID]:
    """``n`` queued, unpublished delivery rows, in id order."""
    ids = sorted(uuid.uuid4() for _ in range(n))
    db.execute(
        "INSERT INTO deliveries (id, user_id, channel, route) "
        "SELECT unnest(%s::uuid[]), 'locks-user', 'webhook', 'immediate'",
        (ids,),
    )
    return ids


def _published(db: Conn, ids: list[uuid.UUID]) -> dict[uuid.UUID, bool]:
    rows = db.execute(
        "SELECT id, published_at IS NOT NULL FROM deliveries WHERE id = ANY(%s)", (ids,)
    ).fetchall()
    return {uuid.UUID(str(r[0])): bool(r[1]) for r in rows}


def _session(backend: Backend) -> Conn:
    """A session that gives up on a lock after 5 s (a deadlock is found after 1 s)."""
    return psycopg.connect(backend.database_url, options="-c lock_timeout=5000")


def test_a_mark_does_not_wait_for_a_deliverer_recording_an_outcome(db: Conn, backend: Backend) -> None:
    """The deliverer's outcome transaction inserts its attempts (each locks its delivery row
    FOR KEY SHARE, through the foreign key), then updates the rows in id order. A mark that
    locked FOR UPDATE waited for those key-share locks while holding rows the update needed."""
    low, high = _rows(db, 2)
    deliverer, marker = _session(backend), _session(backend)
    with deliverer, marker:
        deliverer.execute(
            "UPDATE deliveries SET status = 'sending', attempts = 1 WHERE id = ANY(%s)", ([low, high],)
        )
        deliverer.commit()
        with deliverer.cursor() as cur:  # the outcome transaction, up to its attempts
            now = datetime.now(UTC)
            store.record_attempts(
                cur,
                [store.Attempt(high, 1, 0, "ok", 200, None, None, now, now)],
            )
        errors: list[BaseException] = []

        def mark() -> None:
            try:
                with marker.cursor() as cur:
                    mark_published(cur, [low, high])
                marker.commit()
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        started = time.monotonic()
        t = threading.Thread(target=mark)
        t.start()
        t.join(timeout=10)
        took = time.monotonic() - started
        # The deliverer goes on to its outcome update (in id order: ``low`` first).
        with deliverer.cursor() as cur:
            store.finish(cur, [store.Finish(low, 1, "sent", None, None, "m-1", True)])
        deliverer.commit()
        assert not errors, errors
        assert took < 1.0, f"the mark waited {took:.1f}s for the deliverer"
    assert _published(db, [low, high]) == {low: True, high: True}


def test_a_mark_skips_a_row_a_deliverer_is_claiming_and_the_claim_marks_it(
    db: Conn, backend: Backend
) -> None:
    """A deliverer claims rows it read from the topic: their records are published, whoever
    marks them. The mark leaves a row that a claim holds to the claim, and never waits."""
    ids = _rows(db, 3)
    deliverer, marker = _session(backend), _session(backend)
    with deliverer, marker:
        with deliverer.cursor() as cur:
            assert store.claim(cur, [(ids[1], 0)], lease_s=10) == {ids[1]}
        started = time.monotonic()
        with marker.cursor() as cur:
            mark_published(cur, ids)
        marker.commit()
        assert time.monotonic() - started < 1.0, "the mark waited for the claim"
        assert _published(db, ids) == {ids[0]: True, ids[1]: False, ids[2]: True}
        deliverer.commit()
    assert _published(db, ids) == {i: True for i in ids}
