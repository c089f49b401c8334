"""Plain SQL migrations, applied in order, recorded, and safe from two processes at once."""

from __future__ import annotations

import logging
from importlib import resources

from storage.db import connect, translate_errors

log = logging.getLogger(__name__)

# pg_advisory_lock key: any constant unique to herald ("herald" in ASCII).
_LOCK_KEY = 0x686572616C64


def available() -> list[tuple[str, str]]:
    """(version, sql) pairs shipped in storage/migrations, in order."""
    folder = resources.files("storage").joinpath("migrations")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]


def migrate(url: str) -> list[str]:
    """Apply what is missing; returns the versions applied by this call."""
    applied: list[str] = []
    with translate_errors(), connect(url, autocommit=True) as conn:
        # A session lock: a second migrator waits here, then finds nothing to do.
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS herald_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM herald_migrations")}
            for version, sql in available():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql.encode())
                    conn.execute("INSERT INTO herald_migrations (version) VALUES (%s)", (version,))
                log.info("applied migration %s", version)
                applied.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied
