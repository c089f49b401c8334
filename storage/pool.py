"""An async connection pool for the HTTP API (``storage.Database`` is one blocking connection).

Connections are autocommit: every API statement is a single statement, so it is its own
transaction without a BEGIN/COMMIT round trip. psycopg prepares a statement on a connection
after it ran a few times there (``prepare_threshold``), so the hot queries are parsed and
planned once per connection. Sessions run in UTC, so timestamps that PostgreSQL renders
into JSON are RFC 3339 with ``+00:00``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from config.settings import Settings
from core.errors import DatabaseUnavailable
from storage.db import classify, session_options

AsyncConn = psycopg.AsyncConnection[tuple[Any, ...]]


class AsyncDatabase:
    """A fixed-size pool; ``connection()`` translates psycopg errors into herald's tree."""

    def __init__(self, url: str, *, size: int, options: dict[str, Any] | None = None) -> None:
        kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 5, **(options or {})}
        kwargs["options"] = (kwargs.get("options", "") + " -c TimeZone=UTC").strip()
        self._pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
            url,
            kwargs=kwargs,
            min_size=size,
            max_size=size,
            open=False,
            timeout=5.0,  # waiting for a free connection longer than this is an outage: 503
            name="herald-api",
        )

    async def open(self, timeout: float = 10.0) -> None:
        """Open every connection now: an unreachable server fails start-up, not a request."""
        try:
            await self._pool.open(wait=True, timeout=timeout)
        except PoolTimeout as exc:
            await self._pool.close()
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL within {timeout:.0f}s") from exc

    async def close(self) -> None:
        await self._pool.close()

    @property
    def closed(self) -> bool:
        return bool(self._pool.closed)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConn]:
        try:
            async with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise DatabaseUnavailable("no PostgreSQL connection free in time") from exc
        except psycopg.Error as exc:
            raise classify(exc) from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> AsyncDatabase:
        return cls(
            settings.database_url.get_secret_value(),
            size=settings.api.pool_size,
            options=session_options(
                statement_timeout_ms=settings.db_statement_timeout_ms,
                idle_in_transaction_timeout_ms=settings.db_idle_in_transaction_timeout_ms,
                keepalives_idle_s=settings.db_keepalives_idle_s,
            ),
        )
