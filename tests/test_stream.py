"""The live stream (GET /v1/stream) over real HTTP, fed by PostgreSQL LISTEN/NOTIFY: events
produced to Kafka reach every open stream through the real ingest consumer, and a reconnect
with Last-Event-ID misses nothing, even a transaction that commits out of created_at order."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import psycopg
import pytest

from storage import stream
from tests.api_support import JWT_SECRET, api_settings, bearer, running_api, token
from tests.helpers import event, produce, start_ingest
from tests.stream_support import SseClient

if TYPE_CHECKING:
    from config.settings import Settings
    from tests.conftest import Backend

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]


@pytest.fixture
def user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def live(backend: Backend, db: Conn) -> Iterator[tuple[Settings, str]]:
    """The API and an ingest consumer, on a fresh topic prefix."""
    settings = api_settings(
        backend.bootstrap,
        backend.database_url,
        api={
            "jwt_secret": JWT_SECRET,
            "audience": "herald-test",
            "pool_size": 4,
            "leeway_s": 2,
            "stream_heartbeat_s": 0.5,
        },
    )
    with running_api(settings) as base:
        runner = start_ingest(settings)
        try:
            yield settings, base
        finally:
            runner.stop()


def unread(db: Conn, user: str) -> int:
    row = db.execute(
        "SELECT count(*) FROM notifications WHERE user_id = %s AND read_at IS NULL"
        " AND NOT hidden AND archived_at IS NULL",
        (user,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_kafka_to_two_streams_within_a_second_and_a_resume_misses_nothing(
    live: tuple[Settings, str], db: Conn, user: str
) -> None:
    settings, base = live
    with SseClient(base, user) as a, SseClient(base, user) as b:
        assert a.status == b.status == 200
        assert a.next("unread").json() == {"count": 0}
        assert b.next("unread").json() == {"count": 0}
        # Warm-up: the first record also waits for the ingest group to join.
        produce(settings, [event(user_id=user, title="warm-up")])
        a.next("notification", timeout=30)
        b.next("notification", timeout=30)

        # 1. Kafka -> ingest -> NOTIFY -> both streams, within a second of the produce call.
        started = time.monotonic()
        produce(settings, [event(user_id=user, title="Deploy 42 failed", severity="critical")])
        got = [c.next("notification", timeout=5) for c in (a, b)]
        for e in got:
            assert e.json()["title"] == "Deploy 42 failed"
            assert e.at - started < 1.0, f"reached a stream {e.at - started:.2f} s after the produce"
        assert [c.next("unread").json()["count"] for c in (a, b)] == [2, 2]
        position = a.last_id
        assert position is not None and stream.valid_position(position)

    # 2. While the client is away: three new notifications, and one read from another device.
    missed = [f"missed {i}" for i in range(3)]
    produce(settings, [event(user_id=user, title=t) for t in missed])
    deadline = time.monotonic() + 20
    while unread(db, user) < 5:
        assert time.monotonic() < deadline, "ingest did not store the three"
        time.sleep(0.05)
    first = db.execute(
        "SELECT id FROM notifications WHERE user_id = %s ORDER BY created_at LIMIT 1", (user,)
    ).fetchone()
    assert first is not None
    r = httpx.post(f"{base}/v1/notifications/{first[0]}/read", headers=bearer(user))
    assert r.status_code == 200

    # 3. The reconnect, as EventSource makes it: exactly what it missed, then the server's count.
    with SseClient(base, user, last_event_id=position) as again:
        events = again.take("unread")
        # One batch, one transaction: the three share created_at, so only the id orders them.
        assert sorted(e.json()["title"] for e in events if e.event == "notification") == missed
        assert events[-1].json() == {"count": unread(db, user)} == {"count": 4}
        assert events[-1].id is not None and events[-1].id != position

        # 4. Another tab marks everything read: this one's count follows.
        assert httpx.post(f"{base}/v1/notifications/read-all", headers=bearer(user)).json() == {"marked": 4}
        assert again.next("unread").json() == {"count": 0}


def test_a_transaction_that_commits_late_is_not_missed_after_a_reconnect(
    backend: Backend, db: Conn, user: str
) -> None:
    """A row's created_at is its transaction's start: a slow transaction that commits after a
    newer row was streamed has an older created_at. The position is a snapshot, so it is found."""
    settings = api_settings(backend.bootstrap, backend.database_url)
    insert = (
        "INSERT INTO notifications (id, user_id, source, type, severity, title, idempotency_key,"
        " occurred_at) VALUES (%s, %s, 'test', 't', 'info', %s, %s, now())"
    )
    with running_api(settings) as base, psycopg.connect(backend.database_url) as slow:
        with SseClient(base, user) as c:
            c.next("unread")
            slow_id = uuid.uuid4()
            slow.execute(insert, (slow_id, user, "slow", f"k:{slow_id}"))  # begins, not committed
            with db.transaction():
                quick_id = uuid.uuid4()
                db.execute(insert, (quick_id, user, "quick", f"k:{quick_id}"))
                stream.notify_users(db.cursor(), [user])
            assert c.next("notification").json()["title"] == "quick"
            position = c.next("unread").id
        with slow.cursor() as cur:
            stream.notify_users(cur, [user])
        slow.commit()
        times = dict(
            db.execute("SELECT title, created_at FROM notifications WHERE user_id = %s", (user,)).fetchall()
        )
        assert times["slow"] < times["quick"], "the test needs the late row to look older"
        with SseClient(base, user, last_event_id=position) as again:
            events = again.take("unread")
            assert [e.json()["title"] for e in events if e.event == "notification"] == ["slow"]
            assert events[-1].json() == {"count": 2}


def test_stream_auth_and_positions(backend: Backend, db: Conn, user: str) -> None:
    settings = api_settings(backend.bootstrap, backend.database_url)
    with running_api(settings) as base:
        get = lambda **params: httpx.get(f"{base}/v1/stream", params=params, timeout=10)  # noqa: E731

        assert get().status_code == 401  # EventSource sends no Authorization: a token is required
        assert get(token=token(user)).status_code == 401  # a bearer token is not a stream token
        r = httpx.post(f"{base}/v1/stream/token", timeout=10)
        assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"

        # The exchange: short-lived, never past the bearer token's own exp.
        got = httpx.post(f"{base}/v1/stream/token", headers=bearer(user, ttl=20), timeout=10)
        assert got.status_code == 200 and got.headers["cache-control"] == "no-store"
        assert 0 < got.json()["expires_in"] <= 20
        st = got.json()["token"]
        # ... and a stream token is not a bearer token.
        r = httpx.get(f"{base}/v1/notifications", headers={"Authorization": f"Bearer {st}"}, timeout=10)
        assert r.status_code == 401

        for bad in ("nonsense", "1:2:3:4", "12:" + "9" * 30 + ":"):
            r = httpx.get(f"{base}/v1/stream", params={"token": st, "last_event_id": bad}, timeout=10)
            assert r.status_code == 400, bad
        # Well-formed, but no snapshot PostgreSQL accepts (xmin after xmax).
        r = httpx.get(
            f"{base}/v1/stream", params={"token": st}, headers={"Last-Event-ID": "9:5:"}, timeout=10
        )
        assert r.status_code == 400

        # Stream tokens are signed with a key derived from the JWT secret (so every API process
        # sharing it accepts them); an expired one is refused, a fresh one opens the stream.
        key = hmac.new(JWT_SECRET.encode(), b"herald stream tokens", hashlib.sha256).digest()
        now = int(time.time())
        claims = {"sub": user, "aud": "herald-stream", "sx": now + 600}
        old = jwt.encode({**claims, "exp": now - 60}, key, algorithm="HS256")
        r = get(token=old)
        assert r.status_code == 401 and "expired" in r.json()["detail"]
        fresh = jwt.encode({**claims, "exp": now + 60}, key, algorithm="HS256")
        with httpx.stream("GET", f"{base}/v1/stream", params={"token": fresh}, timeout=10) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream; charset=utf-8"


def test_heartbeats_and_a_prompt_stop(backend: Backend, db: Conn, user: str) -> None:
    settings = api_settings(
        backend.bootstrap,
        backend.database_url,
        api={
            "jwt_secret": JWT_SECRET,
            "audience": "herald-test",
            "stream_heartbeat_s": 0.2,
        },
    )
    with running_api(settings) as base:
        c = SseClient(base, user)
        assert c.next("comment", timeout=2).data == "ping"
        started = time.monotonic()
    # The server's shutdown ended the open stream at once instead of waiting it out.
    assert time.monotonic() - started < 5
    assert c.ended.wait(2)
    c.close()


def test_a_lost_listen_connection_loses_nothing(backend: Backend, db: Conn, user: str) -> None:
    """A row committed with no NOTIFY anyone heard (here: none at all) still reaches the open
    stream: the listener's reconnect wakes every stream, and each looks from its position."""
    settings = api_settings(backend.bootstrap, backend.database_url)
    with running_api(settings) as base, SseClient(base, user) as c:
        c.next("unread")
        nid = uuid.uuid4()
        db.execute(
            "INSERT INTO notifications (id, user_id, source, type, severity, title, idempotency_key,"
            " occurred_at) VALUES (%s, %s, 'test', 't', 'info', 'unannounced', %s, now())",
            (nid, user, f"k:{nid}"),
        )
        time.sleep(0.3)
        assert c.events.empty(), "nothing announced it yet"
        killed = db.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE query = %s AND pid <> pg_backend_pid()",
            (f"LISTEN {stream.CHANNEL}",),
        ).fetchone()
        assert killed is not None and killed[0] >= 1
        assert c.next("notification", timeout=10).json()["title"] == "unannounced"
        assert c.next("unread").json() == {"count": 1}


def test_a_stream_ends_with_its_session(backend: Backend, db: Conn, user: str) -> None:
    """The stream token carries the bearer token's exp: the stream closes then, and its
    token no longer opens one (the page must come back with a fresh bearer token)."""
    settings = api_settings(backend.bootstrap, backend.database_url)
    with running_api(settings) as base:
        r = httpx.post(f"{base}/v1/stream/token", headers=bearer(user, ttl=2), timeout=10)
        st = r.json()["token"]
        assert r.json()["expires_in"] <= 2
        started = time.monotonic()
        with httpx.stream("GET", f"{base}/v1/stream", params={"token": st}, timeout=10) as resp:
            assert resp.status_code == 200
            body = b"".join(resp.iter_bytes())  # returns once the server ends the stream
        assert time.monotonic() - started < 5
        assert b"event: unread" in body
        assert httpx.get(f"{base}/v1/stream", params={"token": st}, timeout=10).status_code == 401
