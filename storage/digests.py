"""Batch statements of the digest process: windows, their items, and closing them.

One round trip per statement, never per item; arrays travel as binary parameters. Rows
are fed in a stable order (``ORDER BY`` the conflict key), so processes that meet the
same windows queue behind each other instead of deadlocking.

A window row is locked by whoever changes it: the batch that adds items (``latest``
locks the windows of its keys) or the tick that closes it (``FOR UPDATE SKIP LOCKED``: a
window being filled waits for the next tick). An upsert that meets a window closed
meanwhile changes nothing and says so (``add_to_windows`` returns fewer ids), and the
batch is retried.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

Cursor = psycopg.Cursor[tuple[Any, ...]]

WindowKey = tuple[str, str, str, datetime]  # user_id, channel, batch_key ('' for none), window_start

# Every window of the batch's keys (a few sequences each), locked: a tick closing one of
# them finishes first, and this batch then sees it closed.
_LATEST_SQL = """
SELECT w.user_id, w.channel, w.batch_key, w.window_start, w.id, w.sequence, w.status, w.item_count
FROM digest_windows w
JOIN unnest(%b::text[], %b::text[], %b::text[], %b::timestamptz[]) AS k(u, c, b, s)
  ON w.user_id = k.u AND w.channel = k.c AND w.batch_key = k.b AND w.window_start = k.s
ORDER BY w.id
FOR UPDATE OF w
"""

_KNOWN_ITEMS_SQL = "SELECT delivery_id FROM digest_items WHERE delivery_id = ANY(%b)"

# closes_at: the window's end plus its delay (grace, plus the user's share of the spread),
# or now when it reached max items or when that is already past (a replay, a follow-up):
# then the next tick closes it.
_ADD_TO_WINDOWS_SQL = """
INSERT INTO digest_windows (id, user_id, channel, batch_key, window_start, window_seconds,
    sequence, item_count, closes_at)
SELECT t.id, t.u, t.c, t.b, t.s, t.secs, t.seq, t.n,
       CASE WHEN t.is_full THEN now()
            ELSE greatest(now(), t.s + make_interval(secs => t.secs + t.delay)) END
FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::int[], %b::int[],
    %b::int[], %b::bool[], %b::float8[]) AS t(id, u, c, b, s, secs, seq, n, is_full, delay)
ORDER BY t.id
ON CONFLICT (id) DO UPDATE SET
    item_count = digest_windows.item_count + excluded.item_count,
    closes_at = least(digest_windows.closes_at, excluded.closes_at),
    updated_at = now()
WHERE digest_windows.status = 'open'
RETURNING id
"""

_INSERT_ITEMS_SQL = """
INSERT INTO digest_items (delivery_id, window_id, notification_id, severity, title, target_url, occurred_at)
SELECT * FROM unnest(%b::uuid[], %b::uuid[], %b::uuid[], %b::text[], %b::text[], %b::text[],
    %b::timestamptz[]) AS t
ORDER BY 1
ON CONFLICT (delivery_id) DO NOTHING
RETURNING delivery_id
"""

_DUE_SQL = """
SELECT id, user_id, channel, batch_key, window_start, window_seconds, sequence,
       greatest(0, extract(epoch FROM clock_timestamp() - closes_at))::float8
FROM digest_windows
WHERE status = 'open' AND closes_at <= now()
ORDER BY closes_at
LIMIT %s
FOR UPDATE SKIP LOCKED
"""

# Per window, in one statement (one snapshot of read_at): the items left out (read in the app
# before the close, or their notification gone), the unread count, and the first
# ``shown`` unread items, oldest first (event time).
_SUMMARY_SQL = """
SELECT i.window_id,
       count(*) FILTER (WHERE NOT r.read),
       bool_or(i.severity = 'critical') FILTER (WHERE NOT r.read),
       (array_agg(i.notification_id ORDER BY i.occurred_at, i.delivery_id)
            FILTER (WHERE NOT r.read))[1:%(shown)s],
       (array_agg(i.title ORDER BY i.occurred_at, i.delivery_id)
            FILTER (WHERE NOT r.read))[1:%(shown)s],
       (array_agg(i.target_url ORDER BY i.occurred_at, i.delivery_id)
            FILTER (WHERE NOT r.read))[1:%(shown)s],
       coalesce(array_agg(i.delivery_id) FILTER (WHERE r.read), '{}')
FROM digest_items i
LEFT JOIN notifications n ON n.id = i.notification_id
CROSS JOIN LATERAL (SELECT n.id IS NULL OR n.read_at IS NOT NULL AS read) r
WHERE i.window_id = ANY(%(ids)b)
GROUP BY i.window_id
"""

_CLOSE_SQL = """
UPDATE digest_windows w
SET status = c.status, digest = c.digest, left_out = c.left_out, closed_at = clock_timestamp(),
    updated_at = now()
FROM (SELECT t.id, t.status, t.digest, string_to_array(t.left_out, ',')::uuid[] AS left_out
      FROM unnest(%b::uuid[], %b::text[], %b::jsonb[], %b::text[]) AS t(id, status, digest, left_out)
      ORDER BY 1) AS c
WHERE w.id = c.id
"""

_DIGEST_ROWS_SQL = """
INSERT INTO deliveries (id, notification_id, user_id, channel, route, reason, window_start, window_seconds)
SELECT t.id, NULL, t.u, t.c, 'digest', NULL, t.s, t.secs
FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::timestamptz[], %b::int[]) AS t(id, u, c, s, secs)
ORDER BY 1
ON CONFLICT (id) DO NOTHING
"""

# The items' delivery rows take their window's outcome. Only rows still queued: a row another
# path already settled keeps its status. Locked in id order, as ingest's mark step does. The
# digest read their records, so they are published (ingest's mark skips a row locked here).
_SETTLE_SQL = """
WITH x AS (
    SELECT d.id, CASE WHEN w.status = 'suppressed' OR d.id = ANY(w.left_out)
                      THEN 'suppressed' ELSE 'digested' END AS status
    FROM digest_windows w
    JOIN digest_items i ON i.window_id = w.id
    JOIN deliveries d ON d.id = i.delivery_id
    WHERE w.id = ANY(%b) AND d.status = 'queued'
    ORDER BY d.id
    FOR NO KEY UPDATE OF d
)
UPDATE deliveries d SET status = x.status, updated_at = now(), published_at = COALESCE(d.published_at, now())
FROM x WHERE d.id = x.id
"""

_SETTLED_SQL = "UPDATE digest_windows SET settled_at = now() WHERE id = ANY(%b) AND settled_at IS NULL"

# Windows closed by a tick that died before settling their items.
_UNSETTLED_SQL = """
SELECT id FROM digest_windows
WHERE status <> 'open' AND settled_at IS NULL AND closed_at < now() - make_interval(secs => %s)
ORDER BY closed_at LIMIT %s
FOR UPDATE SKIP LOCKED
"""

# Digests committed but not acknowledged by the broker (a crash between the two).
_STRANDED_SQL = """
SELECT w.digest, w.channel, w.user_id
FROM deliveries d JOIN digest_windows w ON w.id = d.id
WHERE d.published_at IS NULL AND d.created_at < now() - make_interval(secs => %s)
  AND w.status = 'sent'
ORDER BY d.created_at
LIMIT %s
FOR UPDATE OF d SKIP LOCKED
"""

_OPEN_COUNT_SQL = "SELECT count(*) FROM digest_windows WHERE status = 'open'"


@dataclass(frozen=True, slots=True)
class Latest:
    """The newest window (highest sequence) of a key."""

    id: uuid.UUID
    sequence: int
    status: str
    item_count: int


@dataclass(frozen=True, slots=True)
class WindowAdd:
    """Items added to one window by a batch (a new window, or one that exists)."""

    id: uuid.UUID
    key: WindowKey
    window_seconds: int
    sequence: int
    count: int
    full: bool


@dataclass(frozen=True, slots=True)
class ItemRow:
    delivery_id: uuid.UUID
    window_id: uuid.UUID
    notification_id: uuid.UUID | None
    severity: str
    title: str
    target_url: str | None
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class DueWindow:
    id: uuid.UUID
    user_id: str
    channel: str
    batch_key: str
    window_start: datetime
    window_seconds: int
    sequence: int
    lag_s: float  # how long after its closing time it was claimed


@dataclass(frozen=True, slots=True)
class Summary:
    """A closing window's items: how many unread, the first few of them, the ones left out."""

    unread: int
    critical: bool
    notification_ids: Sequence[uuid.UUID | None]
    titles: Sequence[str]
    target_urls: Sequence[str | None]
    left_out: Sequence[uuid.UUID]


@dataclass(frozen=True, slots=True)
class Closed:
    """What closing a window wrote: ``sent`` with its record, or ``suppressed``."""

    window: DueWindow
    status: str
    record: dict[str, Any] | None
    unread: int
    left_out: Sequence[uuid.UUID]


def latest(cur: Cursor, keys: Sequence[WindowKey]) -> dict[WindowKey, Latest]:
    """Lock the windows of ``keys``; returns the newest (highest sequence) of each."""
    out: dict[WindowKey, Latest] = {}
    if not keys:
        return out
    cur.execute(_LATEST_SQL, [list(c) for c in zip(*keys, strict=True)])
    for r in cur.fetchall():
        key = (r[0], r[1], r[2], r[3])
        if key not in out or r[5] > out[key].sequence:
            out[key] = Latest(r[4], r[5], r[6], r[7])
    return out


def known_items(cur: Cursor, delivery_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    if not delivery_ids:
        return set()
    cur.execute(_KNOWN_ITEMS_SQL, (list(delivery_ids),))
    return {r[0] for r in cur.fetchall()}


def add_to_windows(cur: Cursor, adds: Sequence[WindowAdd], delay_s: Callable[[str], float]) -> set[uuid.UUID]:
    """Create or grow windows; returns the ids changed (a window closed meanwhile is not).

    ``delay_s(user_id)``: how long after its end a window of that user closes."""
    if not adds:
        return set()
    cur.execute(
        _ADD_TO_WINDOWS_SQL,
        (
            [a.id for a in adds],
            [a.key[0] for a in adds],
            [a.key[1] for a in adds],
            [a.key[2] for a in adds],
            [a.key[3] for a in adds],
            [a.window_seconds for a in adds],
            [a.sequence for a in adds],
            [a.count for a in adds],
            [a.full for a in adds],
            [delay_s(a.key[0]) for a in adds],
        ),
    )
    return {r[0] for r in cur.fetchall()}


def insert_items(cur: Cursor, items: Sequence[ItemRow]) -> set[uuid.UUID]:
    """Insert items; returns the delivery ids inserted (the others existed already)."""
    if not items:
        return set()
    cur.execute(
        _INSERT_ITEMS_SQL,
        (
            [i.delivery_id for i in items],
            [i.window_id for i in items],
            [i.notification_id for i in items],
            [i.severity for i in items],
            [i.title for i in items],
            [i.target_url for i in items],
            [i.occurred_at for i in items],
        ),
    )
    return {r[0] for r in cur.fetchall()}


def claim_due(cur: Cursor, limit: int) -> list[DueWindow]:
    """Lock up to ``limit`` open windows whose closing time has come; others skip them."""
    cur.execute(_DUE_SQL, (limit,))
    return [DueWindow(*r) for r in cur.fetchall()]


def summaries(cur: Cursor, window_ids: Sequence[uuid.UUID], shown: int) -> dict[uuid.UUID, Summary]:
    """Each window's unread count, first ``shown`` unread items, and the items left out."""
    out: dict[uuid.UUID, Summary] = {}
    if not window_ids:
        return out
    cur.execute(_SUMMARY_SQL, {"ids": list(window_ids), "shown": shown})
    for wid, unread, critical, nids, titles, urls, left_out in cur.fetchall():
        out[wid] = Summary(unread, bool(critical), nids or [], titles or [], urls or [], left_out)
    return out


def close(cur: Cursor, closed: Sequence[Closed]) -> None:
    """Record the outcome of each window, and the digest delivery rows of those sent."""
    if not closed:
        return
    cur.execute(
        _CLOSE_SQL,
        (
            [c.window.id for c in closed],
            [c.status for c in closed],
            [None if c.record is None else json.dumps(c.record) for c in closed],
            [",".join(str(i) for i in c.left_out) for c in closed],
        ),
    )
    sent = [c.window for c in closed if c.status == "sent"]
    if sent:
        cur.execute(
            _DIGEST_ROWS_SQL,
            (
                [w.id for w in sent],
                [w.user_id for w in sent],
                [w.channel for w in sent],
                [w.window_start for w in sent],
                [w.window_seconds for w in sent],
            ),
        )


def settle(cur: Cursor, window_ids: Sequence[uuid.UUID]) -> None:
    """The items of closed windows become ``digested`` or ``suppressed``."""
    if window_ids:
        cur.execute(_SETTLE_SQL, (list(window_ids),))
        cur.execute(_SETTLED_SQL, (list(window_ids),))


def unsettled(cur: Cursor, older_than_s: float, limit: int) -> list[uuid.UUID]:
    cur.execute(_UNSETTLED_SQL, (older_than_s, limit))
    return [r[0] for r in cur.fetchall()]


def stranded(cur: Cursor, older_than_s: float, limit: int) -> list[tuple[dict[str, Any], str, str]]:
    """Lock sent digests whose records were never acknowledged: (record, channel, user_id)."""
    cur.execute(_STRANDED_SQL, (older_than_s, limit))
    return [(r[0], r[1], r[2]) for r in cur.fetchall()]


def open_windows(cur: Cursor) -> int:
    cur.execute(_OPEN_COUNT_SQL)
    row = cur.fetchone()
    return int(row[0]) if row else 0
