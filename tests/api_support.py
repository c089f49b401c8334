"""The API under test: a real uvicorn on loopback (a thread), real PostgreSQL, real tokens."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import psycopg

from api.app import create_app
from config.settings import Settings
from core.web import bind, bound_port, server
from tests.helpers import make_settings

JWT_SECRET = "test-jwt-secret-" + "x" * 48  # 64 bytes: long enough for HS512 too (the wrong-algorithm test)
UNSUBSCRIBE_SECRET = "test-unsubscribe-secret-0123456789"
AUDIENCE = "herald-test"


def api_settings(bootstrap: str, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api": {"jwt_secret": JWT_SECRET, "audience": AUDIENCE, "pool_size": 4, "leeway_s": 2},
        "unsubscribe_secret": UNSUBSCRIBE_SECRET,
        "policy": {"mandatory_categories": ["security"]},
    }
    values.update(overrides)
    return make_settings(bootstrap, database_url, **values)


def token(user: str, *, ttl: int = 600, secret: str = JWT_SECRET, **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"sub": user, "aud": AUDIENCE, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret, algorithm="HS256")


def bearer(user: str, **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, **kw)}"}


@contextmanager
def running_api(settings: Settings) -> Iterator[str]:
    """Serve the real app on a free loopback port in a thread; yields its base URL."""
    app = create_app(settings)
    sock = bind("127.0.0.1", 0, "HERALD_API__PORT")
    srv = server(app, on_shutdown=app.state.stop_streams)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        assert thread.is_alive(), "the API server stopped during start-up"
        assert time.monotonic() < deadline, "the API server did not start in 15 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{bound_port(sock)}"
    finally:
        srv.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the API server did not stop"


@contextmanager
def client(base: str, user: str | None = None) -> Iterator[httpx.Client]:
    headers = bearer(user) if user else {}
    with httpx.Client(base_url=base, headers=headers, timeout=10) as c:
        yield c


def add_notifications(
    conn: psycopg.Connection[Any],
    user: str,
    count: int,
    *,
    start: datetime | None = None,
    step: timedelta = timedelta(seconds=1),
    same_time: bool = False,
    **columns: Sequence[Any] | Any,
) -> list[uuid.UUID]:
    """Insert ``count`` rows for ``user`` directly (ingest is tested elsewhere); oldest first.

    ``same_time``: every row shares one created_at, so only the id orders them.
    """
    start = start or datetime(2030, 1, 1, tzinfo=UTC)
    ids = [uuid.uuid4() for _ in range(count)]
    with conn.cursor() as cur:
        for i, nid in enumerate(ids):
            created = start if same_time else start + i * step
            extra = {k: (v[i] if isinstance(v, list | tuple) else v) for k, v in columns.items()}
            cur.execute(
                "INSERT INTO notifications (id, user_id, source, type, category, severity, title, body,"
                " idempotency_key, hidden, occurred_at, created_at, read_at, archived_at)"
                " VALUES (%s, %s, 'test', 't', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    nid,
                    user,
                    extra.get("category"),
                    extra.get("severity", "info"),
                    extra.get("title", f"note {i}"),
                    extra.get("body"),
                    f"k:{nid}",
                    extra.get("hidden", False),
                    created,
                    created,
                    extra.get("read_at"),
                    extra.get("archived_at"),
                ),
            )
    return ids
