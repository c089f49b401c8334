"""The inbox's change feed in PostgreSQL: NOTIFY on commit, one LISTEN per API process,
and what a stream client has not seen yet.

Writers (ingest, the API's mark-read) call ``pg_notify`` inside the transaction that
changed the inbox; PostgreSQL delivers it only once that transaction commits, and never
if it rolls back. The payload is small, ``{"u": <user id>, "k": "new" | "read"}``: a
wake-up, not the data. The woken stream reads what changed.

A client's position is a snapshot (``pg_current_snapshot()``, text ``xmin:xmax:xip,...``):
it has seen exactly what that snapshot saw. ``sync`` returns the user's rows whose creating
transaction (``created_xid``, migration 0006) that snapshot does not see, plus a fresh
snapshot, in one statement (one snapshot for both). Commit order, not ``created_at``,
decides: a long transaction that commits late is still found after a reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from storage.inbox import _ITEM_JSON, _UNREAD, _VISIBLE
from storage.pool import AsyncConn

log = logging.getLogger(__name__)

CHANNEL = "herald_inbox"
NEW = "new"  # notifications were inserted
READ = "read"  # read or archive state changed

# pg_snapshot's text form; the xip list is bounded by the server's connections.
_SNAPSHOT = re.compile(r"[1-9][0-9]{0,19}:[1-9][0-9]{0,19}:([1-9][0-9]{0,19}(,[1-9][0-9]{0,19})*)?")
MAX_SNAPSHOT_CHARS = 8192

# Ingest: one NOTIFY per user per batch, in the batch's transaction, in one round trip.
_NOTIFY_USERS_SQL = (
    f"SELECT pg_notify('{CHANNEL}', json_build_object('u', u, 'k', %s::text)::text)"  # noqa: S608 (constants)
    " FROM unnest(%b::text[]) AS u"
)
_NOTIFY_USER_SQL = f"SELECT pg_notify('{CHANNEL}', json_build_object('u', %s::text, 'k', %s::text)::text)"

_COUNT = f"(SELECT count(*) FROM notifications WHERE {_VISIBLE}{_UNREAD})"  # noqa: S608 (constants)

# The partial index notifications_stream serves (user_id, created_xid >= xmin); oldest first.
_SYNC_SQL = f"""
SELECT pg_current_snapshot()::text, {_COUNT}, ARRAY(
    SELECT item FROM (
        SELECT {_ITEM_JSON} AS item, created_at, id FROM notifications
        WHERE user_id = %s AND NOT hidden AND archived_at IS NULL AND created_xid IS NOT NULL
          AND created_xid >= pg_snapshot_xmin(%s::pg_snapshot)
          AND NOT pg_visible_in_snapshot(created_xid, %s::pg_snapshot)
        ORDER BY created_at, id LIMIT %s
    ) AS unseen ORDER BY created_at, id
)
""".encode()  # noqa: S608 (constants)

_START_SQL = f"SELECT pg_current_snapshot()::text, {_COUNT}".encode()  # noqa: S608 (constants)


def valid_position(text: str) -> bool:
    """Whether ``text`` can be a position this module handed out (a snapshot's text form)."""
    return len(text) <= MAX_SNAPSHOT_CHARS and _SNAPSHOT.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class Sync:
    """What a client has not seen: notification JSON texts (oldest first, at most ``limit``;
    ``more`` when others follow), the unread count, and the position after them."""

    items: list[str]
    more: bool
    unread: int
    position: str


async def sync(conn: AsyncConn, user_id: str, position: str | None, limit: int) -> Sync:
    """Everything new since ``position`` (``None``: nothing, only the current position)."""
    if position is None:
        cur = await conn.execute(_START_SQL, (user_id,))
        row = await cur.fetchone()
        assert row is not None
        return Sync([], False, int(row[1]), str(row[0]))
    cur = await conn.execute(_SYNC_SQL, (user_id, user_id, position, position, limit + 1))
    row = await cur.fetchone()
    assert row is not None
    items = list(row[2])
    return Sync(items[:limit], len(items) > limit, int(row[1]), str(row[0]))


async def check_position(conn: AsyncConn, position: str) -> None:
    """``RecordRejected`` (through the pool) when PostgreSQL refuses it as a snapshot."""
    await conn.execute("SELECT pg_snapshot_xmin(%s::pg_snapshot)", (position,))


def notify_users(cur: psycopg.Cursor[Any], user_ids: Sequence[str], kind: str = NEW) -> None:
    """Inside a transaction: wake the streams of these users once it commits."""
    if user_ids:
        cur.execute(_NOTIFY_USERS_SQL, (kind, list(user_ids)))


async def notify_user(conn: AsyncConn, user_id: str, kind: str) -> None:
    """On an autocommit connection, after the change committed."""
    await conn.execute(_NOTIFY_USER_SQL, (user_id, kind))


class Listener:
    """One LISTEN connection for the process, reconnecting with backoff.

    ``on_notify(user, kind)`` runs on the event loop for every notification;
    ``on_gap()`` after every (re)connect: anything may have changed while no one listened,
    so every client should look (its position makes that exact, never lossy).
    """

    def __init__(
        self,
        url: str,
        on_notify: Callable[[str, str], None],
        on_gap: Callable[[], None],
        *,
        options: dict[str, Any] | None = None,
        backoff_s: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        self._url = url
        self._on_notify = on_notify
        self._on_gap = on_gap
        self._options = options or {}
        self._backoff = backoff_s
        self.listening = asyncio.Event()

    async def run(self) -> None:
        delay = self._backoff[0]
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=5, **self._options
                )
            except psycopg.Error as exc:
                log.warning("stream: cannot LISTEN (%s); retrying in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    delay = self._backoff[0]
                    self._on_gap()
                    async for note in conn.notifies():
                        self._dispatch(note.payload)
            except psycopg.Error as exc:
                log.warning("stream: LISTEN connection lost (%s); reconnecting", type(exc).__name__)
            finally:
                self.listening.clear()
            await asyncio.sleep(delay)

    def _dispatch(self, payload: str) -> None:
        try:
            body = json.loads(payload)
            user, kind = body["u"], body["k"]
        except (ValueError, KeyError, TypeError):
            log.warning("stream: ignoring a %s notification that is not herald's", CHANNEL)
            return
        if isinstance(user, str) and isinstance(kind, str):
            self._on_notify(user, kind)
