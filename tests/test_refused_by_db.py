"""A record PostgreSQL refuses (after validation passed) is dead-lettered; the rest of its batch lands."""

from __future__ import annotations

import psycopg
import pytest

from config.settings import Settings
from consumers.dlq import decode_headers
from herald.inspect import read_topic
from producers.topics import Topics
from tests.helpers import event, ingest, produce

pytestmark = pytest.mark.integration


def test_refused_record_goes_to_dlq_and_the_batch_lands(
    settings: Settings, db: psycopg.Connection[tuple[object, ...]], refuse_evil: None
) -> None:
    good = [event(title=f"fine {i}") for i in range(5)]
    positions = produce(settings, [good[0], good[1], event(title="evil"), *good[2:]], key=b"one-partition")
    run = ingest(settings, positions)

    titles = {str(r[0]) for r in db.execute("SELECT title FROM notifications").fetchall()}
    assert titles == {f"fine {i}" for i in range(5)}
    dead = read_topic(settings, Topics(settings.topic_prefix).events_dlq)
    assert len(dead) == 1
    headers = decode_headers(dead[0].headers)
    assert headers["herald-dlt-reason"] == "rejected"
    assert headers["kafka_dlt-original-offset"] == positions[2][2]
    assert "test_refuse_evil" in str(headers["kafka_dlt-exception-message"])
    assert run.handler.totals.inserted == 5


def test_nul_characters_are_a_schema_violation(
    settings: Settings, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    positions = produce(settings, [b'{"id":"n1","type":"t","title":"a\\u0000b","user_id":"u"}', event()])
    ingest(settings, positions)
    dead = read_topic(settings, Topics(settings.topic_prefix).events_dlq)
    assert [decode_headers(d.headers)["herald-dlt-reason"] for d in dead] == ["schema"]
    count = db.execute("SELECT count(*) FROM notifications").fetchone()
    assert count is not None and count[0] == 1


def test_refusals_never_carry_the_row(
    settings: Settings, db: psycopg.Connection[tuple[object, ...]], refuse_evil: None
) -> None:
    """PostgreSQL's DETAIL repeats the failing row; it must not reach logs or headers."""
    positions = produce(settings, [event(title="evil", body="secret body 4242")])
    ingest(settings, positions)
    dead = read_topic(settings, Topics(settings.topic_prefix).events_dlq)
    message = str(decode_headers(dead[0].headers)["kafka_dlt-exception-message"])
    assert "test_refuse_evil" in message
    assert "secret body" not in message
    assert "Failing row" not in message
