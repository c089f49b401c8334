"""Retention and erasure: ``herald purge`` and ``herald forget``, in short batches.

Each batch is one short transaction that locks only the rows it deletes (``FOR UPDATE
SKIP LOCKED``: a row the API or ingest holds right now waits for the next batch), so
neither command holds long locks or blocks ingest. Children go before parents: attempts,
then delivery rows, then notifications; digest items, then their windows.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from storage.db import Database

# One batch of notifications (chosen by {pick}) with their delivery rows and attempts, and
# (where {items}) the digest items that name them; counts in that order.
_DELETE_NOTIFICATIONS = """
WITH n AS ({pick}),
d AS (SELECT id FROM deliveries WHERE notification_id IN (SELECT id FROM n)),
i AS (DELETE FROM digest_items WHERE {items} AND notification_id IN (SELECT id FROM n) RETURNING 1),
a AS (DELETE FROM delivery_attempts WHERE delivery_id IN (SELECT id FROM d) RETURNING 1),
dd AS (DELETE FROM deliveries WHERE id IN (SELECT id FROM d) RETURNING 1),
nn AS (DELETE FROM notifications WHERE id IN (SELECT id FROM n) RETURNING 1)
SELECT (SELECT count(*) FROM nn), (SELECT count(*) FROM dd), (SELECT count(*) FROM a),
       (SELECT count(*) FROM i)
"""
NOTIFICATION_KEYS = ("notifications", "deliveries", "delivery_attempts", "digest_items")

# One batch of digest windows (chosen by {pick}) with their items, their digest's delivery
# row (deliveries.id = window id) and its attempts; counts in that order.
_DELETE_WINDOWS = """
WITH w AS ({pick}),
i AS (DELETE FROM digest_items WHERE window_id IN (SELECT id FROM w) RETURNING 1),
a AS (DELETE FROM delivery_attempts WHERE delivery_id IN (SELECT id FROM w) RETURNING 1),
dd AS (DELETE FROM deliveries WHERE id IN (SELECT id FROM w) RETURNING 1),
ww AS (DELETE FROM digest_windows WHERE id IN (SELECT id FROM w) RETURNING 1)
SELECT (SELECT count(*) FROM ww), (SELECT count(*) FROM dd), (SELECT count(*) FROM a),
       (SELECT count(*) FROM i)
"""
WINDOW_KEYS = ("digest_windows", "deliveries", "delivery_attempts", "digest_items")

_DONE_BEFORE = "created_at < %(cutoff)s AND (read_at IS NOT NULL OR archived_at IS NOT NULL)"
_CLOSED_BEFORE = "status <> 'open' AND settled_at IS NOT NULL AND closed_at < %(cutoff)s"
# Purge: read or archived notifications created before the cutoff; closed, settled windows
# closed before it. Oldest first, skipping rows another transaction holds.
_PURGE_NOTIFICATIONS = _DELETE_NOTIFICATIONS.format(
    pick=f"SELECT id FROM notifications WHERE {_DONE_BEFORE}"  # noqa: S608 (constants)
    " ORDER BY created_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED",
    items="false",  # a kept window keeps its items; old windows go by their own age
)
_PURGE_WINDOWS = _DELETE_WINDOWS.format(
    pick=f"SELECT id FROM digest_windows WHERE {_CLOSED_BEFORE}"  # noqa: S608 (constants)
    " ORDER BY closed_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
)
_COUNT_PURGE = f"""
SELECT
  (SELECT count(*) FROM notifications WHERE {_DONE_BEFORE}),
  (SELECT count(*) FROM deliveries WHERE notification_id IN (
     SELECT id FROM notifications WHERE {_DONE_BEFORE})),
  (SELECT count(*) FROM digest_windows WHERE {_CLOSED_BEFORE})
"""  # noqa: S608 (constants)

# Forget: one user's rows, a batch at a time: notifications (the inbox and the live stream
# read these), then digest windows.
_FORGET_NOTIFICATIONS = _DELETE_NOTIFICATIONS.format(
    pick="SELECT id FROM notifications WHERE user_id = %(user)s LIMIT %(limit)s FOR UPDATE",
    items="true",
)
_FORGET_WINDOWS = _DELETE_WINDOWS.format(
    pick="SELECT id FROM digest_windows WHERE user_id = %(user)s LIMIT %(limit)s FOR UPDATE"
)

# Delivery rows of the user no notification or window leads to any more (one scan, once).
_FORGET_ORPHANS = """
WITH d AS (SELECT id FROM deliveries WHERE user_id = %(user)s),
a AS (DELETE FROM delivery_attempts WHERE delivery_id IN (SELECT id FROM d) RETURNING 1),
dd AS (DELETE FROM deliveries WHERE id IN (SELECT id FROM d) RETURNING 1)
SELECT (SELECT count(*) FROM dd), (SELECT count(*) FROM a)
"""

_FORGET_SMALL = {
    "preferences": "DELETE FROM notification_preferences WHERE user_id = %(user)s",
    "endpoints": "DELETE FROM channel_endpoints WHERE user_id = %(user)s",
    "rate_limits": "DELETE FROM rate_limits WHERE user_id = %(user)s",
}

_COUNT_FORGET = """
SELECT
  (SELECT count(*) FROM notifications WHERE user_id = %(user)s),
  (SELECT count(*) FROM deliveries WHERE user_id = %(user)s),
  (SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id
   WHERE d.user_id = %(user)s),
  (SELECT count(*) FROM digest_windows WHERE user_id = %(user)s),
  (SELECT count(*) FROM digest_items i JOIN digest_windows w ON w.id = i.window_id
   WHERE w.user_id = %(user)s),
  (SELECT count(*) FROM notification_preferences WHERE user_id = %(user)s),
  (SELECT count(*) FROM channel_endpoints WHERE user_id = %(user)s),
  (SELECT count(*) FROM rate_limits WHERE user_id = %(user)s)
"""
FORGET_KEYS = (
    "notifications",
    "deliveries",
    "delivery_attempts",
    "digest_windows",
    "digest_items",
    "preferences",
    "endpoints",
    "rate_limits",
)


def _batches(
    db: Database, sql: str, params: dict[str, Any], keys: tuple[str, ...], total: Counter[str]
) -> None:
    """Run ``sql`` (one batch, counts in ``keys`` order) until a batch deletes nothing."""
    while True:
        with db.transaction() as cur:
            cur.execute(sql, params)
            row = cur.fetchone()
        counts = dict(zip(keys, row or (0,) * len(keys), strict=True))
        total.update(counts)
        if not counts[keys[0]]:
            return


def purge(db: Database, cutoff: datetime, batch: int = 1000, dry_run: bool = False) -> dict[str, int]:
    """Delete read or archived notifications created before ``cutoff`` with their delivery
    rows, and closed digest windows closed before it with their items; counts per table."""
    params = {"cutoff": cutoff, "limit": batch}
    if dry_run:
        with db.transaction() as cur:
            row = cur.execute(_COUNT_PURGE, params).fetchone() or (0, 0, 0)
        n, d, w = (int(str(v)) for v in row)
        return {"notifications": n, "deliveries": d, "digest_windows": w}
    total: Counter[str] = Counter()
    _batches(db, _PURGE_NOTIFICATIONS, params, NOTIFICATION_KEYS, total)
    _batches(db, _PURGE_WINDOWS, params, WINDOW_KEYS, total)
    return {
        k: total[k]
        for k in ("notifications", "deliveries", "delivery_attempts", "digest_windows", "digest_items")
    }


def forget(db: Database, user_id: str, batch: int = 1000, dry_run: bool = False) -> dict[str, int]:
    """Erase one user's rows everywhere herald keeps them; counts per table."""
    params: dict[str, Any] = {"user": user_id, "limit": batch}
    if dry_run:
        with db.transaction() as cur:
            row = cur.execute(_COUNT_FORGET, params).fetchone() or (0,) * len(FORGET_KEYS)
        return {k: int(str(v)) for k, v in zip(FORGET_KEYS, row, strict=True)}
    total: Counter[str] = Counter()
    _batches(db, _FORGET_NOTIFICATIONS, params, NOTIFICATION_KEYS, total)
    _batches(db, _FORGET_WINDOWS, params, WINDOW_KEYS, total)
    with db.transaction() as cur:
        row = cur.execute(_FORGET_ORPHANS, params).fetchone() or (0, 0)
        total.update({"deliveries": row[0], "delivery_attempts": row[1]})
        for key, sql in _FORGET_SMALL.items():
            total[key] += cur.execute(sql, params).rowcount
    return {k: total[k] for k in FORGET_KEYS}
