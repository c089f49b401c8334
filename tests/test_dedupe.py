"""Dedupe by (user_id, idempotency_key), in every way an event can come twice."""

from __future__ import annotations

import psycopg
import pytest

from config.settings import Settings
from tests.helpers import event, ingest, produce

pytestmark = pytest.mark.integration


def count(db: psycopg.Connection[tuple[object, ...]], sql: str = "SELECT count(*) FROM notifications") -> int:
    row = db.execute(sql).fetchone()
    assert row is not None
    return int(str(row[0]))


def test_same_event_twice_in_one_batch(
    settings: Settings, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    e = event()
    run = ingest(settings, produce(settings, [e, e]))
    assert count(db) == 1
    assert run.handler.totals.duplicates == 1


def test_same_event_twice_across_batches(
    settings: Settings, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    e = event()
    ingest(settings, produce(settings, [e]), group="g-across")
    run = ingest(settings, produce(settings, [e]), group="g-across")
    assert count(db) == 1
    assert run.handler.totals.duplicates == 1
    assert run.handler.totals.inserted == 0


def test_same_event_after_restart_with_new_group(
    settings: Settings, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    """A replay from offset zero by a fresh group is a restart that forgot everything but Postgres."""
    positions = produce(settings, [event(), event(), event()])
    ingest(settings, positions)
    run = ingest(settings, positions)  # new group: reads from the beginning again
    assert count(db) == 3
    assert run.handler.totals.inserted == 0
    assert run.handler.totals.duplicates == 3
