"""Unread-count consistency under concurrency: inserts, mark-read and mark-all-read from two
clients at once end with the count equal to the rows whose read_at IS NULL (and visible)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from tests.api_support import add_notifications, api_settings, client, running_api

if TYPE_CHECKING:
    from tests.conftest import Backend

pytestmark = pytest.mark.integration

SECONDS = 3.0


def visible_unread(conn: psycopg.Connection[Any], user: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM notifications"
        " WHERE user_id = %s AND read_at IS NULL AND NOT hidden AND archived_at IS NULL",
        (user,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_unread_count_matches_the_rows_after_concurrent_writes(
    backend: Backend, db: psycopg.Connection[Any]
) -> None:
    user = f"c-{uuid.uuid4().hex[:8]}"
    add_notifications(db, user, 60)
    errors: list[str] = []
    stop = threading.Event()
    inserted = [0]

    def inserter() -> None:
        with psycopg.connect(backend.database_url, autocommit=True) as conn:
            while not stop.is_set():
                # created_at = now(): arrivals race the clients' reads and read-alls
                for _ in range(3):
                    conn.execute(
                        "INSERT INTO notifications (id, user_id, source, type, severity, title,"
                        " idempotency_key, hidden, occurred_at)"
                        " VALUES (%s, %s, 'test', 't', 'info', 'new', %s, %s, now())",
                        (nid := uuid.uuid4(), user, f"k:{nid}", random.random() < 0.1),
                    )
                    inserted[0] += 1
                time.sleep(0.01)

    def reader_marker(base: str) -> None:
        with client(base, user) as c:
            while not stop.is_set():
                page = c.get("/v1/notifications", params={"unread": "1", "limit": 10})
                if page.status_code != 200:
                    errors.append(page.text)
                    return
                for item in page.json()["items"][:3]:
                    r = c.post(f"/v1/notifications/{item['id']}/read")
                    if r.status_code != 200:
                        errors.append(r.text)

    def read_all_client(base: str) -> None:
        with client(base, user) as c:
            while not stop.is_set():
                items = c.get("/v1/notifications", params={"limit": 5}).json()["items"]
                if items:
                    r = c.post("/v1/notifications/read-all", json={"before": items[-1]["created_at"]})
                    if r.status_code != 200:
                        errors.append(r.text)
                if c.get("/v1/notifications/unread-count").status_code != 200:
                    errors.append("unread-count failed")
                time.sleep(0.02)

    settings = api_settings(backend.bootstrap, backend.database_url)
    with running_api(settings) as base:
        threads = [
            threading.Thread(target=inserter),
            threading.Thread(target=reader_marker, args=(base,)),
            threading.Thread(target=read_all_client, args=(base,)),
        ]
        for t in threads:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors, errors[:3]
        assert inserted[0] > 50
        with client(base, user) as c:
            count = c.get("/v1/notifications/unread-count").json()["count"]
            listed = []
            cursor = None
            while True:
                params: dict[str, Any] = {"unread": "1", "limit": 100}
                if cursor:
                    params["cursor"] = cursor
                page = c.get("/v1/notifications", params=params).json()
                listed += page["items"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
    truth = visible_unread(db, user)
    assert count == truth
    assert len(listed) == truth and all(i["read_at"] is None for i in listed)
    # the clients really did mark rows read, and some arrivals stayed unread
    read = db.execute(
        "SELECT count(*) FROM notifications WHERE user_id = %s AND read_at IS NOT NULL", (user,)
    ).fetchone()
    assert read is not None and read[0] > 0
