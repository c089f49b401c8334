"""Poison among ordinary records, privacy edges, dedupe across topic names, concurrent duplicates."""

from __future__ import annotations

import json
import threading
import uuid

import psycopg
import pytest
from prometheus_client import REGISTRY

from config.settings import Settings
from consumers.dlq import decode_headers
from core.envelope import expand, parse
from herald.inspect import read_topic
from producers.topics import Topics
from storage import notifications as store
from storage.db import Database
from storage.preferences import set_preferences
from tests.helpers import event, ingest, produce

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]


def _db_unavailable() -> float:
    return REGISTRY.get_sample_value("herald_db_unavailable_total", {"consumer": "ingest"}) or 0.0


def _email_on(settings: Settings, *users: str) -> None:
    database = Database(settings.database_url.get_secret_value())
    try:
        for u in users:
            set_preferences(database, u, {"email": True})
    finally:
        database.close()


def test_poison_among_ordinary_records_never_stalls_the_partition(
    settings: Settings, db: Conn, refuse_evil: None
) -> None:
    """The reported case (a 20,000-character recipient) and its family, on one partition."""
    poison: dict[str, bytes] = {
        "long_recipient": json.dumps(event(user_id=None, recipients=["ok-user", "r" * 20_000])).encode(),
        "long_multibyte_user": json.dumps(event(user_id="\u20ac" * 200)).encode(),
        "nan_in_data": b'{"id":"nan-1","type":"t","title":"x","user_id":"u","data":{"v":NaN}}',
        "lone_surrogate": b'{"id":"s-1","type":"t","title":"x","user_id":"u","data":{"v":"\\udc00"}}',
        "refused_by_db": json.dumps(event(title="evil")).encode(),
    }
    good = [event(title=f"good {i}") for i in range(6)]
    values: list[dict[str, object] | bytes] = []
    for i, value in enumerate(poison.values()):
        values += [good[i % len(good)], value] if i < len(good) else [value]
    values += good[len(poison) :]
    before = _db_unavailable()
    positions = produce(settings, values, key=b"one-partition")
    ingest(settings, positions)

    titles = {str(r[0]) for r in db.execute("SELECT title FROM notifications").fetchall()}
    assert titles == {f"good {i}" for i in range(6)}
    dead = read_topic(settings, Topics(settings.topic_prefix).events_dlq)
    reasons = sorted(str(decode_headers(d.headers)["herald-dlt-reason"]) for d in dead)
    assert reasons == ["rejected", "schema", "schema", "schema", "schema"]
    assert {d.value for d in dead} == set(poison.values())
    assert _db_unavailable() == before


def test_the_truncation_boundary_card_and_an_email_in_a_link_never_leave(
    settings: Settings, db: Conn
) -> None:
    _email_on(settings, "privacy-user")
    body = "x" * 265 + " 4111 1111 1111 1111 was declined, write to alice@example.com"
    e = event(
        user_id="privacy-user",
        severity="critical",
        body=body,
        target_url="/users/alice@example.com/billing",
        title="Card 5500 0000 0000 0004 declined",
    )
    ingest(settings, produce(settings, [e]))
    [record] = read_topic(settings, Topics(settings.topic_prefix).deliveries("email"))
    payload = json.loads(record.value or b"")
    # Every field but the timestamps (validated datetimes, whose digits may spell "5500").
    text = json.dumps({k: v for k, v in payload.items() if not k.endswith("_at")})
    assert "title" in text and "summary" in text and "target_url" in text
    for secret in ("4111", "1111 1", "alice@example.com", "5500"):
        assert secret not in text, secret
    assert payload["target_url"] == "/users/[redacted]/billing"
    assert payload["summary"].endswith("\u2026") and len(payload["summary"]) <= 280
    # The inbox keeps the full body: redaction is for what leaves the system.
    row = db.execute("SELECT body FROM notifications").fetchone()
    assert row is not None and "4111 1111 1111 1111" in str(row[0])


def test_the_same_events_from_a_renamed_or_mirrored_topic_create_nothing_new(
    settings: Settings, db: Conn, backend: object
) -> None:
    events = [event(), event(resource_id="inv-1"), event(idempotency_key="explicit-1")]
    ingest(settings, produce(settings, events))
    mirrored = settings.model_copy(update={"topic_prefix": f"mirror{uuid.uuid4().hex[:8]}"})
    run = ingest(mirrored, produce(mirrored, events))
    assert run.handler.totals.inserted == 0
    assert run.handler.totals.duplicates == 3
    count = db.execute("SELECT count(*) FROM notifications").fetchone()
    assert count is not None and count[0] == 3
    sources = {str(r[0]) for r in db.execute("SELECT source FROM notifications").fetchall()}
    assert sources == {settings.default_source}


def test_a_herald_source_header_names_the_source(settings: Settings, db: Conn) -> None:
    e = event()
    ingest(settings, produce(settings, [e], headers=[("herald-source", b"stripe-eu")]))
    row = db.execute("SELECT source, idempotency_key FROM notifications").fetchone()
    assert row is not None
    assert row[0] == "stripe-eu" and row[1] == f"s:9:stripe-eu:{e['id']}"


def test_an_unusable_herald_source_header_falls_back_to_the_default(settings: Settings, db: Conn) -> None:
    """A NUL or a control character would be refused by PostgreSQL (or by psycopg itself)."""
    positions = produce(settings, [event()], headers=[("herald-source", b"bad\x00source")])
    positions += produce(settings, [event()], headers=[("herald-source", b"line\nbreak")])
    ingest(settings, positions)
    sources = {str(r[0]) for r in db.execute("SELECT source FROM notifications").fetchall()}
    assert sources == {settings.default_source}


def test_a_concurrent_duplicate_insert_does_nothing_instead_of_raising(settings: Settings, db: Conn) -> None:
    """Two ingest processes, the same event, overlapping transactions: no unique_violation."""
    [note] = expand(
        parse(json.dumps(event(user_id="race")).encode(), max_bytes=10_000),
        default_source="events",
        record_time=None,
    )
    url = settings.database_url.get_secret_value()
    with psycopg.connect(url) as first, psycopg.connect(url) as second:
        with first.cursor() as cur:
            assert store.insert_notifications(cur, [note], [False]) == {note.id}  # not committed yet
        outcome: list[object] = []

        def racer() -> None:
            try:
                with second.cursor() as cur:
                    outcome.append(store.insert_notifications(cur, [note], [False]))
                second.commit()
            except Exception as exc:  # noqa: BLE001 (the assertion below reports it)
                outcome.append(exc)

        t = threading.Thread(target=racer)
        t.start()
        t.join(0.5)
        assert t.is_alive(), "the second insert must wait for the first transaction"
        first.commit()
        t.join(10)
    assert outcome == [set()], outcome
    count = db.execute("SELECT count(*) FROM notifications").fetchone()
    assert count is not None and count[0] == 1
