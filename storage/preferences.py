"""Preferences and channel endpoints: the CLI (blocking ``Database``) and the API (async pool)."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from storage.db import Database
from storage.pool import AsyncConn

_PREF_COLUMNS = ("in_app", "email", "push", "webhook", "digest_minutes")


def set_preferences(db: Database, user_id: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Upsert only the given columns; returns the stored row (NULL = policy default)."""
    cols = [c for c in _PREF_COLUMNS if c in changes]
    if not cols:
        return show_preferences(db, user_id) or {}
    names = ", ".join(cols)
    params = ", ".join(["%s"] * len(cols))
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols)
    sql = (
        f"INSERT INTO notification_preferences (user_id, {names}) VALUES (%s, {params}) "  # noqa: S608 (column names from a fixed list)
        f"ON CONFLICT (user_id) DO UPDATE SET {updates}, updated_at = now()"
    )
    with db.transaction() as cur:
        cur.execute(sql.encode(), [user_id, *(changes[c] for c in cols)])
    return show_preferences(db, user_id) or {}


def show_preferences(db: Database, user_id: str) -> dict[str, Any] | None:
    with db.transaction() as cur:
        cur.execute(
            "SELECT in_app, email, push, webhook, digest_minutes FROM notification_preferences"
            " WHERE user_id = %s",
            (user_id,),
        )
        row = cur.fetchone()
    return None if row is None else dict(zip(_PREF_COLUMNS, row, strict=True))


def add_endpoint(db: Database, user_id: str, channel: str, address: str, secret: str | None = None) -> int:
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO channel_endpoints (user_id, channel, address, secret) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (user_id, channel, address) DO UPDATE SET disabled_at = NULL,"
            " secret = COALESCE(excluded.secret, channel_endpoints.secret)"
            " RETURNING id",
            (user_id, channel, address, secret),
        )
        row = cur.fetchone()
    assert row is not None
    return int(str(row[0]))


def list_endpoints(db: Database, user_id: str) -> list[tuple[str, str]]:
    with db.transaction() as cur:
        cur.execute(
            "SELECT channel, address FROM channel_endpoints WHERE user_id = %s AND disabled_at IS NULL"
            " ORDER BY channel, id",
            (user_id,),
        )
        return [(str(r[0]), str(r[1])) for r in cur.fetchall()]


# The API's side: async, on a pooled autocommit connection (storage/pool.py).

_READ_SQL = (
    b"SELECT in_app, email, push, webhook, digest_minutes, categories FROM notification_preferences"
    b" WHERE user_id = %s"
)


async def read_preferences(conn: AsyncConn, user_id: str) -> dict[str, Any] | None:
    """The stored row (``None`` values and a missing row mean the policy defaults)."""
    cur = await conn.execute(_READ_SQL, (user_id,))
    row = await cur.fetchone()
    return None if row is None else dict(zip((*_PREF_COLUMNS, "categories"), row, strict=True))


async def write_preferences(conn: AsyncConn, user_id: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Upsert the given columns (``categories`` replaces the whole map); returns the stored row.

    One statement, so two writers never interleave half of each other's change.
    """
    cols = [c for c in (*_PREF_COLUMNS, "categories") if c in changes]
    values = [Jsonb(changes[c]) if c == "categories" else changes[c] for c in cols]
    if not cols:
        return await read_preferences(conn, user_id) or {}
    names = ", ".join(cols)
    params = ", ".join(["%s"] * len(cols))
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols)
    sql = (
        f"INSERT INTO notification_preferences (user_id, {names}) VALUES (%s, {params}) "  # noqa: S608 (column names from a fixed list)
        f"ON CONFLICT (user_id) DO UPDATE SET {updates}, updated_at = now() "
        "RETURNING in_app, email, push, webhook, digest_minutes, categories"
    )
    cur = await conn.execute(sql.encode(), [user_id, *values])
    row = await cur.fetchone()
    assert row is not None
    return dict(zip((*_PREF_COLUMNS, "categories"), row, strict=True))


# Endpoints through the API: always with the owner condition; webhooks (and their secrets) are
# the CLI's, never listed here.

_ADD_ENDPOINT_SQL = (
    b"INSERT INTO channel_endpoints (user_id, channel, address) VALUES (%s, %s, %s)"
    b" ON CONFLICT (user_id, channel, address) DO UPDATE SET disabled_at = NULL RETURNING id"
)
_LIST_ENDPOINTS_SQL = (
    b"SELECT id, channel, address, created_at FROM channel_endpoints"
    b" WHERE user_id = %s AND channel = ANY(%s) AND disabled_at IS NULL ORDER BY id"
)
_REMOVE_ENDPOINT_SQL = (
    b"UPDATE channel_endpoints SET disabled_at = now()"
    b" WHERE id = %s AND user_id = %s AND channel = ANY(%s) AND disabled_at IS NULL RETURNING id"
)


async def save_endpoint(conn: AsyncConn, user_id: str, channel: str, address: str) -> int:
    """Add (or re-enable) the endpoint; returns its id."""
    cur = await conn.execute(_ADD_ENDPOINT_SQL, (user_id, channel, address))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def user_endpoints(conn: AsyncConn, user_id: str, channels: list[str]) -> list[tuple[Any, ...]]:
    cur = await conn.execute(_LIST_ENDPOINTS_SQL, (user_id, channels))
    return list(await cur.fetchall())


async def remove_endpoint(conn: AsyncConn, user_id: str, endpoint_id: int, channels: list[str]) -> bool:
    """Disable the user's own endpoint (delivery attempts keep pointing at it); False if none."""
    cur = await conn.execute(_REMOVE_ENDPOINT_SQL, (endpoint_id, user_id, channels))
    return await cur.fetchone() is not None
