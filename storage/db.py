"""The PostgreSQL seam: connections, and psycopg errors translated at the boundary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from config.settings import Settings
from core.errors import DatabaseMisconfigured, DatabaseUnavailable, HeraldError, RecordRejected

# SQLSTATE classes, by what they mean (https://www.postgresql.org/docs/current/errcodes-appendix.html).
# The record's fault: data exceptions, integrity constraints, program limits (an index row too large).
_RECORD_CLASSES = ("22", "23", "54")
# Passing: connection exceptions, operator intervention (admin shutdown, a cancelled
# statement), insufficient resources, serialization failures and deadlocks.
_OUTAGE_CLASSES = ("08", "57", "53", "40")
# The environment, with what an operator should do about it. Anything unlisted is
# treated as the environment too: never dead-letter a record for a fault we cannot name.
_ENVIRONMENT_HINTS = {
    "42501": "grant herald's database role the privileges it needs",
    "42P01": "a table is missing: run `herald migrate`",
    "42703": "a column is missing: run `herald migrate`",
    "42": "the schema does not match this herald version: run `herald migrate`",
    "25006": "the server is read-only (a standby after a failover?): use the primary in HERALD_DATABASE_URL",
    "28": "PostgreSQL refused the credentials: check HERALD_DATABASE_URL",
    "3D": "the database does not exist: check HERALD_DATABASE_URL",
}


def connect(
    url: str, *, autocommit: bool = False, options: dict[str, Any] | None = None
) -> psycopg.Connection[tuple[object, ...]]:
    """Open one connection; an unreachable server becomes ``DatabaseUnavailable``."""
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=5, **(options or {}))
    except psycopg.OperationalError as exc:
        state = exc.sqlstate or ""
        if state[:2] in ("28", "3D"):
            raise classify(exc) from exc
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc


def classify(exc: psycopg.Error) -> HeraldError:
    """One place that says what a PostgreSQL error means for the batch that met it."""
    state = exc.sqlstate or ""
    text = f"PostgreSQL: {describe(exc)}"
    if state[:2] in _RECORD_CLASSES or (not state and isinstance(exc, psycopg.DataError)):
        # psycopg raises DataError itself, with no SQLSTATE, for values it cannot send
        # (a NUL in a text value): the record's fault as much as the server's 22 class.
        return RecordRejected(text)
    if state[:2] in _OUTAGE_CLASSES or (not state and isinstance(exc, psycopg.OperationalError)):
        return DatabaseUnavailable(text)
    hint = _ENVIRONMENT_HINTS.get(state) or _ENVIRONMENT_HINTS.get(state[:2])
    return DatabaseMisconfigured(text, hint or "an operator must look at PostgreSQL's log")


def session_options(
    *, statement_timeout_ms: int, idle_in_transaction_timeout_ms: int, keepalives_idle_s: int
) -> dict[str, Any]:
    """libpq connection parameters: TCP keepalives (a dead peer is noticed) and server-side timeouts."""
    return {
        "keepalives": 1,
        "keepalives_idle": keepalives_idle_s,
        "keepalives_interval": max(1, keepalives_idle_s // 3),
        "keepalives_count": 3,
        "options": f"-c statement_timeout={statement_timeout_ms}"
        f" -c idle_in_transaction_session_timeout={idle_in_transaction_timeout_ms}",
    }


@contextmanager
def translate_errors() -> Iterator[None]:
    """Map psycopg failures onto herald's error tree (see ``classify``)."""
    try:
        yield
    except psycopg.Error as exc:
        raise classify(exc) from exc


def describe(exc: psycopg.Error) -> str:
    """The error without its DETAIL: "Failing row contains (...)" would put a payload in a log."""
    primary = exc.diag.message_primary or str(exc).split("\n", 1)[0]
    state = f" [{exc.sqlstate}]" if exc.sqlstate else ""
    return f"{exc.__class__.__name__}{state}: {primary}"


class Database:
    """One lazily (re)opened connection, replaced after any connection failure."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self._url = url
        self._options = options
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    @property
    def url(self) -> str:
        return self._url

    def connection(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self._url, options=self._options)
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor[tuple[object, ...]]]:
        """One transaction; on a connection failure the connection is dropped."""
        with translate_errors():
            try:
                conn = self.connection()
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except psycopg.Error as exc:
                # Anything but a refused record starts afresh: a broken connection, or one
                # that a failover left pointing at a read-only standby.
                if not isinstance(classify(exc), RecordRejected):
                    self.close()
                raise

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(
            settings.database_url.get_secret_value(),
            session_options(
                statement_timeout_ms=settings.db_statement_timeout_ms,
                idle_in_transaction_timeout_ms=settings.db_idle_in_transaction_timeout_ms,
                keepalives_idle_s=settings.db_keepalives_idle_s,
            ),
        )

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
