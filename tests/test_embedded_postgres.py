"""The embedded PostgreSQL runs with herald's settings from its first start, and keeps them
over a stop and a start (``EMBEDDED_PG_SETTINGS`` in ``herald/embedded.py``)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from herald.embedded import EMBEDDED_PG_SETTINGS, EmbeddedPostgres

pytestmark = pytest.mark.integration


def _show(url: str, name: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(f"SHOW {name}").fetchone()
    assert row is not None
    return str(row[0])


def test_a_fresh_embedded_postgres_takes_its_settings_and_keeps_them(tmp_path: Path) -> None:
    assert EMBEDDED_PG_SETTINGS == {"autovacuum_naptime": "10s"}
    pg = EmbeddedPostgres(tmp_path / "pgdata")
    pg.start()
    try:
        assert _show(pg.url, "autovacuum_naptime") == "10s"  # PostgreSQL's default is 1min
        pg.stop()
        pg.start()
        assert _show(pg.url, "autovacuum_naptime") == "10s"
    finally:
        pg.stop()
