"""Migrations: applied once, recorded, a no-op the second time, safe from two migrators at once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from storage.migrate import available, migrate

if TYPE_CHECKING:
    from tests.conftest import Backend

pytestmark = pytest.mark.integration

TABLES = {
    "notifications",
    "notification_preferences",
    "channel_endpoints",
    "deliveries",
    "digest_windows",
    "digest_items",
    "rate_limits",
    "herald_migrations",
}


def with_dbname(url: str, name: str) -> str:
    """The same server, another database: postgresql://u:p@host/<name>?host=/socket/dir."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
def fresh_db(backend: Backend) -> Iterator[Callable[[], str]]:
    """A factory of empty databases on the backend server, dropped after the test."""
    made: list[str] = []

    def make() -> str:
        name = f"herald_mig_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(backend.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        made.append(name)
        return with_dbname(backend.database_url, name)

    yield make
    with psycopg.connect(backend.database_url, autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def state(url: str) -> tuple[list[str], set[str]]:
    with psycopg.connect(url) as conn:
        versions = [str(r[0]) for r in conn.execute("SELECT version FROM herald_migrations ORDER BY version")]
        tables = {
            str(r[0])
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
    return versions, tables


def test_fresh_database_url_points_at_the_new_database(fresh_db: Callable[[], str]) -> None:
    url = fresh_db()
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None and str(row[0]).startswith("herald_mig_")
    with psycopg.connect(url) as conn:
        assert conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone() == (0,)


def test_migrate_twice_is_a_no_op_the_second_time(fresh_db: Callable[[], str]) -> None:
    url = fresh_db()
    shipped = [v for v, _ in available()]
    assert shipped and shipped == sorted(shipped)
    assert migrate(url) == shipped
    versions, tables = state(url)
    assert versions == shipped
    assert tables >= TABLES
    query = "SELECT applied_at FROM herald_migrations ORDER BY version"
    with psycopg.connect(url) as conn:
        applied_at = conn.execute(query).fetchall()
    assert migrate(url) == []
    assert state(url) == (versions, tables)
    with psycopg.connect(url) as conn:
        assert conn.execute(query).fetchall() == applied_at  # nothing re-applied


def test_the_session_database_is_up_to_date(backend: Backend) -> None:
    """conftest migrated it already: one more migrate finds nothing to do."""
    assert migrate(backend.database_url) == []


def test_two_concurrent_migrations_both_succeed_and_apply_once(fresh_db: Callable[[], str]) -> None:
    url = fresh_db()
    shipped = [v for v, _ in available()]
    workers = 4
    start = threading.Barrier(workers)
    results: list[list[str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        start.wait()
        try:
            applied = migrate(url)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(applied)

    threads = [threading.Thread(target=run) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert sorted(results, key=len) == [[]] * (workers - 1) + [shipped]
    versions, tables = state(url)
    assert versions == shipped
    assert tables >= TABLES
