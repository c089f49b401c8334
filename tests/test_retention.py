"""``herald purge`` and ``herald forget`` remove exactly what they should, in batches, and
leave everything else (other users, unread or recent rows, open digest windows) alone."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from config.settings import Settings
from tests.ops_support import run

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]
NOW = datetime.now(UTC)
TABLES = (
    "notifications",
    "deliveries",
    "delivery_attempts",
    "digest_windows",
    "digest_items",
    "notification_preferences",
    "channel_endpoints",
    "rate_limits",
)


def note(db: Conn, user: str, age_days: int, *, read: bool = False, archived: bool = False) -> uuid.UUID:
    nid = uuid.uuid4()
    at = NOW - timedelta(days=age_days)
    db.execute(
        "INSERT INTO notifications (id, user_id, source, type, severity, title, idempotency_key,"
        " occurred_at, created_at, read_at, archived_at)"
        " VALUES (%s, %s, 'test', 't', 'critical', 'hi', %s, %s, %s, %s, %s)",
        (nid, user, f"k:{nid}", at, at, at if read else None, at if archived else None),
    )
    return nid


def delivery(db: Conn, user: str, nid: uuid.UUID | None, did: uuid.UUID | None = None) -> uuid.UUID:
    did = did or uuid.uuid4()
    db.execute(
        "INSERT INTO deliveries (id, notification_id, user_id, channel, route, status, attempts)"
        " VALUES (%s, %s, %s, 'webhook', 'immediate', 'sent', 1)",
        (did, nid, user),
    )
    db.execute(
        "INSERT INTO delivery_attempts (delivery_id, attempt, endpoint_id, outcome, started_at, finished_at)"
        " VALUES (%s, 1, 1, 'ok', now(), now())",
        (did,),
    )
    return did


def window(db: Conn, user: str, closed_days_ago: int | None, item_note: uuid.UUID | None = None) -> uuid.UUID:
    """A digest window with one item; closed (sent, settled, with its digest delivery) or open."""
    wid = uuid.uuid4()
    start = NOW - timedelta(days=closed_days_ago or 0, minutes=10)
    closed = None if closed_days_ago is None else NOW - timedelta(days=closed_days_ago)
    db.execute(
        "INSERT INTO digest_windows (id, user_id, channel, window_start, window_seconds, status,"
        " item_count, closes_at, closed_at, settled_at)"
        " VALUES (%s, %s, 'webhook', %s, 300, %s, 1, %s, %s, %s)",
        (
            wid,
            user,
            start,
            "open" if closed is None else "sent",
            closed or NOW + timedelta(minutes=5),
            closed,
            closed,
        ),
    )
    db.execute(
        "INSERT INTO digest_items (delivery_id, window_id, notification_id, severity, title, occurred_at)"
        " VALUES (%s, %s, %s, 'warning', 'w', %s)",
        (uuid.uuid4(), wid, item_note, start),
    )
    if closed is not None:
        delivery(db, user, None, wid)
    return wid


def ids(db: Conn, table: str, column: str = "id") -> set[Any]:
    return {r[0] for r in db.execute(f"SELECT {column} FROM {table}").fetchall()}  # noqa: S608


def counts(db: Conn, user: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for table in TABLES:
        if table == "delivery_attempts":
            sql = (
                "SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id"
                " WHERE d.user_id = %s"
            )
        elif table == "digest_items":
            sql = (
                "SELECT count(*) FROM digest_items i JOIN digest_windows w ON w.id = i.window_id"
                " WHERE w.user_id = %s"
            )
        else:
            sql = f"SELECT count(*) FROM {table} WHERE user_id = %s"  # noqa: S608
        row = db.execute(sql, (user,)).fetchone()
        out[table] = int(row[0]) if row else 0
    return out


def test_purge_deletes_old_read_or_archived_and_old_closed_windows_only(db: Conn, settings: Settings) -> None:
    old_read = note(db, "alice", 100, read=True)
    old_unread = note(db, "alice", 100)
    new_read = note(db, "alice", 10, read=True)
    old_archived = note(db, "bob", 120, archived=True)
    d_old = delivery(db, "alice", old_read)
    d_kept = delivery(db, "alice", old_unread)
    w_old = window(db, "alice", 100, item_note=old_read)
    w_recent = window(db, "alice", 10)
    w_open = window(db, "bob", None)
    before = {
        t: ids(db, t, "delivery_id" if t in ("delivery_attempts", "digest_items") else "id")
        for t in TABLES[:5]
    }

    dry = run(settings, "purge", "--older-than", "90d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "2 notifications, 1 deliveries, 1 digest_windows" in dry.stdout and "dry run" in dry.stdout
    declined = run(settings, "purge", "--older-than", "90d", stdin="")
    assert declined.returncode == 1 and "nothing changed" in declined.stdout
    assert before == {
        t: ids(db, t, "delivery_id" if t in ("delivery_attempts", "digest_items") else "id")
        for t in TABLES[:5]
    }

    done = run(settings, "purge", "--older-than", "90d", "--batch-size", "1", "--yes")
    assert done.returncode == 0, done.stderr
    assert (
        "deleted: 2 notifications, 2 deliveries, 2 delivery_attempts, 1 digest_windows, 1 digest_items"
        in done.stdout
    ), done.stdout
    assert ids(db, "notifications") == {old_unread, new_read}
    assert old_archived not in ids(db, "notifications")
    assert ids(db, "deliveries") == {d_kept, w_recent}
    assert d_old not in ids(db, "delivery_attempts", "delivery_id") and w_old not in ids(db, "deliveries")
    assert ids(db, "digest_windows") == {w_recent, w_open}
    assert ids(db, "digest_items", "window_id") == {w_recent, w_open}

    bad = run(settings, "purge", "--older-than", "soon")
    assert bad.returncode == 2 and "--older-than 'soon'" in bad.stderr and bad.stderr.count("\n") == 1


def test_forget_erases_one_user_everywhere_and_no_one_else(db: Conn, settings: Settings) -> None:
    for user in ("alice", "bob"):
        n1, n2 = note(db, user, 1), note(db, user, 200, read=True)
        delivery(db, user, n1)
        delivery(db, user, n2)
        delivery(db, user, None)  # its notification gone already (a delivery row kept as evidence)
        window(db, user, 3, item_note=n1)
        window(db, user, None, item_note=n2)
        db.execute("INSERT INTO notification_preferences (user_id, webhook) VALUES (%s, true)", (user,))
        db.execute(
            "INSERT INTO channel_endpoints (user_id, channel, address) VALUES (%s, 'webhook', 'https://x.test/h')",
            (user,),
        )
        db.execute(
            "INSERT INTO rate_limits (user_id, channel, window_start, count)"
            " VALUES (%s, 'webhook', now(), 3)",
            (user,),
        )
    bob = counts(db, "bob")
    alice = counts(db, "alice")
    assert all(alice.values())

    dry = run(settings, "forget", "alice", "--dry-run")
    assert dry.returncode == 0 and "dry run: nothing changed" in dry.stdout
    assert counts(db, "alice") == alice

    done = run(settings, "forget", "alice", "--batch-size", "1", "--yes")
    assert done.returncode == 0, done.stderr
    assert (
        "removed: 2 notifications, 4 deliveries, 4 delivery_attempts, 2 digest_windows, 2 digest_items,"
        " 1 preferences, 1 endpoints, 1 rate_limits" in done.stdout
    ), done.stdout
    assert set(counts(db, "alice").values()) == {0}
    assert counts(db, "bob") == bob, "another user's rows are left alone"
    nothing = run(settings, "forget", "alice", "--yes")
    assert nothing.returncode == 0 and "0 notifications" in nothing.stdout


def test_dead_letter_topics_are_created_with_the_retention_setting(settings: Settings) -> None:
    from confluent_kafka.admin import AdminClient, ConfigResource

    from producers.topics import Topics, ensure_topics

    s = settings.model_copy(update={"dlq_retention_days": 2.5})
    topics = Topics(s.topic_prefix)
    ensure_topics(s, [topics.events, topics.events_dlq, topics.deliveries_dlq("webhook")])
    admin = AdminClient(s.kafka_client_config())
    for name, want in (
        (topics.events_dlq, str(int(2.5 * 86_400_000))),
        (topics.deliveries_dlq("webhook"), str(int(2.5 * 86_400_000))),
    ):
        res = ConfigResource(ConfigResource.Type.TOPIC, name)
        got = admin.describe_configs([res])[res].result(10)
        assert got["retention.ms"].value == want
    res = ConfigResource(ConfigResource.Type.TOPIC, topics.events)
    events = admin.describe_configs([res])[res].result(10)
    assert "retention.ms" not in events or events["retention.ms"].value != str(int(2.5 * 86_400_000))
