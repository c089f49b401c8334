"""The PostgreSQL seam: connections, and psycopg errors translated at the boundary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from core.errors import DatabaseUnavailable, HeraldError

# SQLSTATE classes that mean "try again later": connection exceptions, operator
# intervention (admin shutdown), insufficient resources, and serialization/deadlock.
_RETRYABLE_CLASSES = ("08", "57", "53", "40")


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection[tuple[object, ...]]:
    """Open one connection; an unreachable server becomes ``DatabaseUnavailable``."""
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc


def is_retryable(exc: psycopg.Error) -> bool:
    state = exc.sqlstate or ""
    return isinstance(exc, psycopg.OperationalError) or state[:2] in _RETRYABLE_CLASSES


@contextmanager
def translate_errors() -> Iterator[None]:
    """Map psycopg failures onto herald's error tree."""
    try:
        yield
    except psycopg.Error as exc:
        if is_retryable(exc):
            raise DatabaseUnavailable(f"PostgreSQL: {describe(exc)}") from exc
        raise HeraldError(f"PostgreSQL: {describe(exc)}") from exc


def describe(exc: psycopg.Error) -> str:
    """The error without its DETAIL: "Failing row contains (...)" would put a payload in a log."""
    primary = exc.diag.message_primary or str(exc).split("\n", 1)[0]
    state = f" [{exc.sqlstate}]" if exc.sqlstate else ""
    return f"{exc.__class__.__name__}{state}: {primary}"


class Database:
    """One lazily (re)opened connection, replaced after any connection failure."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    @property
    def url(self) -> str:
        return self._url

    def connection(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self._url)
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor[tuple[object, ...]]]:
        """One transaction; on a connection failure the connection is dropped."""
        with translate_errors():
            try:
                conn = self.connection()
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except psycopg.OperationalError:
                self.close()
                raise

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
