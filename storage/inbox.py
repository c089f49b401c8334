"""The in-app inbox as the API reads and changes it: keyset pages, unread counts, read, archive.

Every statement names the owner (``user_id = %s``) in its WHERE clause, so a user can
only ever see or change their own rows; a row of someone else's is indistinguishable
from one that does not exist. Hidden rows (in-app off when they arrived) are neither
listed, counted, nor found.

``read_at`` is the only unread state (DESIGN.md, invariant 4). Writes are idempotent:
marking a read row read, or archiving an archived one, keeps the first timestamp.

Pages run newest first over ``(created_at, id)``, served by the partial indexes of
migration 0004 as one index range: ``(created_at, id) < (cursor)`` in the index order.
PostgreSQL renders each item's JSON itself, so the API passes text through untouched.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from storage.pool import AsyncConn

# What the API shows of a notification: never `data` (it stays in the system), never
# `hidden` or `idempotency_key` (internal).
_ITEM_JSON = """json_build_object(
    'id', id, 'type', type, 'category', category, 'severity', severity, 'title', title,
    'body', body, 'summary', summary, 'target_url', target_url, 'occurred_at', occurred_at,
    'created_at', created_at, 'read_at', read_at, 'archived_at', archived_at)::text"""

_VISIBLE = "user_id = %s AND NOT hidden AND archived_at IS NULL"
_UNREAD = " AND read_at IS NULL"
_AFTER = " AND (created_at, id) < (%s, %s)"
_PAGE = f"SELECT {_ITEM_JSON}, created_at, id FROM notifications WHERE {_VISIBLE}"  # noqa: S608 (constants)
_ORDER = " ORDER BY created_at DESC, id DESC LIMIT %s"

# One statement per variant, so each is prepared once per connection with its own plan.
_PAGE_SQL = {
    (unread, after): (_PAGE + (_UNREAD if unread else "") + (_AFTER if after else "") + _ORDER).encode()
    for unread in (False, True)
    for after in (False, True)
}

_UNREAD_COUNT_SQL = f"SELECT count(*) FROM notifications WHERE {_VISIBLE}{_UNREAD}".encode()  # noqa: S608

# One round trip, idempotent, owner condition in both the lookup and the UPDATE: the row
# is found (or not: 404), and updated only if it is still unread.
_MARK_READ_SQL = b"""
WITH target AS (
    SELECT id, read_at, archived_at FROM notifications WHERE id = %s AND user_id = %s AND NOT hidden
), updated AS (
    UPDATE notifications n SET read_at = now(), updated_at = now()
    FROM target t WHERE n.id = t.id AND n.user_id = %s AND n.read_at IS NULL
    RETURNING n.id, n.read_at
)
SELECT t.id, COALESCE(u.read_at, t.read_at), t.archived_at FROM target t LEFT JOIN updated u ON true
"""

_ARCHIVE_SQL = b"""
WITH target AS (
    SELECT id, read_at, archived_at FROM notifications WHERE id = %s AND user_id = %s AND NOT hidden
), updated AS (
    UPDATE notifications n SET archived_at = now(), updated_at = now()
    FROM target t WHERE n.id = t.id AND n.user_id = %s AND n.archived_at IS NULL
    RETURNING n.id, n.archived_at
)
SELECT t.id, t.read_at, COALESCE(u.archived_at, t.archived_at) FROM target t LEFT JOIN updated u ON true
"""

# Only rows that existed at the user's view (created_at <= before): a notification that
# arrives while the user clicks "mark all read" stays unread. A `before` in the future is
# cut to now, so no request can mark rows that do not exist yet.
_READ_ALL_SQL = f"""
UPDATE notifications SET read_at = now(), updated_at = now()
WHERE {_VISIBLE}{_UNREAD} AND created_at <= LEAST(COALESCE(%s::timestamptz, now()), now())
""".encode()  # noqa: S608 (constants)


@dataclass(frozen=True, slots=True)
class Page:
    """Up to ``limit`` items as JSON texts, and the keyset position after the last one when
    more rows follow (``None``: this was the last page)."""

    items: list[str]
    after: tuple[datetime, uuid.UUID] | None


@dataclass(frozen=True, slots=True)
class State:
    """A notification's read and archive state after a write."""

    id: uuid.UUID
    read_at: datetime | None
    archived_at: datetime | None


async def page(
    conn: AsyncConn,
    user_id: str,
    *,
    limit: int,
    unread_only: bool = False,
    after: tuple[datetime, uuid.UUID] | None = None,
) -> Page:
    """One page, newest first, strictly after ``after``; one row more than asked says if more follow."""
    params: list[Any] = [user_id]
    if after is not None:
        params += [after[0], after[1]]
    params.append(limit + 1)
    cur = await conn.execute(_PAGE_SQL[(unread_only, after is not None)], params)
    rows = await cur.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([r[0] for r in rows], (rows[-1][1], rows[-1][2]) if more else None)


async def unread_count(conn: AsyncConn, user_id: str) -> int:
    cur = await conn.execute(_UNREAD_COUNT_SQL, (user_id,))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def mark_read(conn: AsyncConn, user_id: str, notification_id: uuid.UUID) -> State | None:
    """The state after marking it read; ``None`` when the user has no such notification."""
    return await _write(conn, _MARK_READ_SQL, user_id, notification_id)


async def archive(conn: AsyncConn, user_id: str, notification_id: uuid.UUID) -> State | None:
    """The state after archiving it; ``None`` when the user has no such notification."""
    return await _write(conn, _ARCHIVE_SQL, user_id, notification_id)


async def _write(conn: AsyncConn, sql: bytes, user_id: str, notification_id: uuid.UUID) -> State | None:
    cur = await conn.execute(sql, (notification_id, user_id, user_id))
    row = await cur.fetchone()
    return None if row is None else State(row[0], row[1], row[2])


async def mark_all_read(conn: AsyncConn, user_id: str, before: datetime | None) -> int:
    """Mark every visible unread row created at or before ``before`` (default: now) read."""
    cur = await conn.execute(_READ_ALL_SQL, (user_id, before))
    return max(cur.rowcount, 0)
