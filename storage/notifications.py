"""Batch statements for ingest: one round trip per statement, never per event.

Arrays travel as binary parameters (``%b``): psycopg quoting thousands of text
array elements was the largest single cost of a batch.

Every statement that takes row locks feeds its rows in a stable order
(``ORDER BY`` the conflict key), so several ingest processes working on
overlapping users queue behind each other instead of deadlocking.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from core.envelope import Notification
from core.policy import DIGEST, Decision, RateKey

Cursor = psycopg.Cursor[tuple[Any, ...]]

_PREFS_SQL = """
SELECT user_id, in_app, email, push, webhook, digest_minutes, categories
FROM notification_preferences WHERE user_id = ANY(%b)
"""

# New notifications travel by binary COPY into a temporary table that lives for the
# transaction, then one INSERT ... SELECT keeps what is new. COPY formats each row in C:
# about 4 us of Python per row less than sixteen array parameters, on the statement that
# is ingest's critical path (`herald bench ingest`), for the same server work.
_STAGE_COLUMNS = (
    ("id", "uuid"),
    ("user_id", "text"),
    ("source", "text"),
    ("type", "text"),
    ("category", "text"),
    ("severity", "text"),
    ("title", "text"),
    ("body", "text"),
    ("summary", "text"),
    ("target_url", "text"),
    ("data", "jsonb"),
    ("sensitive", "bool"),
    ("idempotency_key", "text"),
    ("batch_key", "text"),
    ("hidden", "bool"),
    ("occurred_at", "timestamptz"),
)
NOTIFICATION_COLUMNS = tuple(name for name, _ in _STAGE_COLUMNS)
_NAMES = ", ".join(NOTIFICATION_COLUMNS)
_STAGE_TYPES = [t for _, t in _STAGE_COLUMNS]
# Created and dropped inside the one statement sequence below: nothing outlives it (a
# pooler may hand the session on), and a rollback takes it away with the rest.
_STAGE_SQL = (
    "CREATE TEMPORARY TABLE herald_new_notifications ("
    + ", ".join(f"{name} {t}" for name, t in _STAGE_COLUMNS)
    + ")"
)
_COPY_STAGE_SQL = f"COPY herald_new_notifications ({_NAMES}) FROM STDIN (FORMAT BINARY)"
_INSERT_NOTIFICATIONS_SQL = (
    f"INSERT INTO notifications ({_NAMES}) SELECT {_NAMES} FROM herald_new_notifications"  # noqa: S608
    " ORDER BY id ON CONFLICT (id) DO NOTHING RETURNING id"
)
_DROP_STAGE_SQL = "DROP TABLE herald_new_notifications"

_RATE_SQL = """
INSERT INTO rate_limits (user_id, channel, window_start, count)
SELECT * FROM unnest(%b::text[], %b::text[], %b::timestamptz[], %b::int[]) AS t ORDER BY 1, 2, 3
ON CONFLICT (user_id, channel, window_start)
DO UPDATE SET count = rate_limits.count + excluded.count
RETURNING user_id, channel, window_start, count
"""

_INSERT_DELIVERIES_SQL = """
INSERT INTO deliveries (id, notification_id, user_id, channel, route, reason, window_start, window_seconds)
SELECT * FROM unnest(%b::uuid[], %b::uuid[], %b::text[], %b::text[], %b::text[], %b::text[],
    %b::timestamptz[], %b::int[]) AS t
ORDER BY 1
ON CONFLICT (id) DO NOTHING
"""

_UNPUBLISHED_SQL = """
SELECT d.id, d.notification_id, d.user_id, d.channel, d.route, d.reason, n.severity, n.type,
       n.category, n.title, n.summary, n.target_url, n.batch_key, n.occurred_at,
       d.window_start, d.window_seconds
FROM deliveries d JOIN notifications n ON n.id = d.notification_id
WHERE d.notification_id = ANY(%b) AND d.published_at IS NULL
ORDER BY d.id
"""

# The outbox relay: rows left unpublished past the age limit, claimed so that several
# ingest processes never publish the same row at once (SKIP LOCKED: each takes others).
_CLAIM_STRANDED_SQL = """
SELECT d.id, d.notification_id, d.user_id, d.channel, d.route, d.reason, n.severity, n.type,
       n.category, n.title, n.summary, n.target_url, n.batch_key, n.occurred_at,
       d.window_start, d.window_seconds
FROM deliveries d JOIN notifications n ON n.id = d.notification_id
WHERE d.published_at IS NULL AND d.created_at < now() - make_interval(secs => %s)
ORDER BY d.created_at
LIMIT %s
FOR UPDATE OF d SKIP LOCKED
"""

# After the broker's acks. A channel consumer may have read a record already and hold its
# row (a claim, an outcome, a digest settling its items): the mark skips that row and never
# waits, so it is never part of a deadlock with them, and each of those statements marks the
# row published itself (it read the record: it is published). FOR NO KEY UPDATE, as the
# update itself takes: it does not wait for the key-share locks of delivery_attempts' inserts.
_MARK_PUBLISHED_SQL = """
UPDATE deliveries d SET published_at = now(), updated_at = now()
FROM (SELECT id FROM deliveries WHERE id = ANY(%b) AND published_at IS NULL
      ORDER BY id FOR NO KEY UPDATE SKIP LOCKED) s
WHERE d.id = s.id
"""


@dataclass(frozen=True, slots=True)
class UnpublishedDelivery:
    """A delivery row whose record the broker has not acknowledged yet."""

    id: uuid.UUID
    notification_id: uuid.UUID
    user_id: str
    channel: str
    route: str
    reason: str | None
    severity: str
    type: str
    category: str | None
    title: str
    summary: str | None
    target_url: str | None
    batch_key: str | None
    occurred_at: datetime
    window_start: datetime | None = None  # a digest entry's window, fixed at ingest
    window_seconds: int | None = None


def load_preferences(cur: Cursor, user_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    cur.execute(_PREFS_SQL, (list(user_ids),))
    cols = ("in_app", "email", "push", "webhook", "digest_minutes", "categories")
    return {row[0]: dict(zip(cols, row[1:], strict=True)) for row in cur.fetchall()}


def insert_notifications(cur: Cursor, rows: Sequence[Notification], hidden: Sequence[bool]) -> set[uuid.UUID]:
    """Insert what is new; returns the ids actually inserted (the rest were duplicates).

    The staging table is dropped after use, so this is callable more than once in one
    transaction.
    """
    if not rows:
        return set()
    cur.execute(_STAGE_SQL)
    with cur.copy(_COPY_STAGE_SQL) as copy:
        copy.set_types(_STAGE_TYPES)
        write = copy.write_row
        for n, h in zip(rows, hidden, strict=True):
            write(notification_row(n, h))
    cur.execute(_INSERT_NOTIFICATIONS_SQL)
    inserted = {row[0] for row in cur.fetchall()}
    cur.execute(_DROP_STAGE_SQL)
    return inserted


def notification_row(n: Notification, hidden: bool) -> tuple[Any, ...]:
    """One notification as stored, in ``NOTIFICATION_COLUMNS`` order (``data`` as its dict)."""
    return (
        n.id,
        n.user_id,
        n.source,
        n.type,
        n.category,
        n.severity,
        n.title,
        n.body,
        n.summary,
        n.target_url,
        n.data,
        n.sensitive,
        n.idempotency_key,
        n.batch_key,
        hidden,
        n.occurred_at,
    )


def add_rate_counts(cur: Cursor, asked: dict[RateKey, int]) -> dict[RateKey, int]:
    """Add this batch's requests to the counters; returns each counter after the add."""
    if not asked:
        return {}
    keys = list(asked)
    cur.execute(
        _RATE_SQL,
        (
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [asked[k] for k in keys],
        ),
    )
    return {(r[0], r[1], r[2]): r[3] for r in cur.fetchall()}


def insert_deliveries(cur: Cursor, decisions: Sequence[Decision]) -> None:
    if not decisions:
        return
    cur.execute(
        _INSERT_DELIVERIES_SQL,
        (
            [d.delivery_id for d in decisions],
            [d.notification.id for d in decisions],
            [d.notification.user_id for d in decisions],
            [d.channel for d in decisions],
            [d.route for d in decisions],
            [d.reason for d in decisions],
            [d.window_start for d in decisions],
            [d.window_seconds if d.route == DIGEST else None for d in decisions],
        ),
    )


def unpublished_for(cur: Cursor, notification_ids: Sequence[uuid.UUID]) -> list[UnpublishedDelivery]:
    """Outbox rows of notifications seen before: a crash fell between commit and publish."""
    if not notification_ids:
        return []
    cur.execute(_UNPUBLISHED_SQL, (list(notification_ids),))
    return [UnpublishedDelivery(*row) for row in cur.fetchall()]


def claim_stranded(cur: Cursor, older_than_s: float, limit: int) -> list[UnpublishedDelivery]:
    """Lock up to ``limit`` rows unpublished for longer than ``older_than_s``; others skip them."""
    cur.execute(_CLAIM_STRANDED_SQL, (older_than_s, limit))
    return [UnpublishedDelivery(*row) for row in cur.fetchall()]


def mark_published(cur: Cursor, delivery_ids: Sequence[uuid.UUID]) -> None:
    if delivery_ids:
        cur.execute(_MARK_PUBLISHED_SQL, (list(delivery_ids),))
