"""The in-app API over real HTTP on loopback, against the real PostgreSQL: auth, the inbox,
preferences, unsubscribe, bad input. One server for the module; rows are per test."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from core.unsubscribe import make_token
from tests.api_support import (
    AUDIENCE,
    JWT_SECRET,
    UNSUBSCRIBE_SECRET,
    add_notifications,
    api_settings,
    bearer,
    client,
    running_api,
    token,
)

if TYPE_CHECKING:
    from tests.conftest import Backend

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]


@pytest.fixture(scope="module")
def base(backend: Backend) -> Iterator[str]:
    with running_api(api_settings(backend.bootstrap, backend.database_url)) as url:
        yield url


@pytest.fixture
def user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


def row(db: Conn, nid: uuid.UUID) -> tuple[Any, ...]:
    got = db.execute(
        "SELECT user_id, read_at, archived_at, updated_at FROM notifications WHERE id = %s", (nid,)
    ).fetchone()
    assert got is not None
    return got


# auth


def test_no_token_is_401_with_a_problem(base: str, db: Conn) -> None:
    r = httpx.get(f"{base}/v1/notifications")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["status"] == 401 and r.json()["title"] == "Unauthorized"


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: token("alice", ttl=-120), id="expired"),
        pytest.param(lambda: token("alice", aud="someone-else"), id="wrong-audience"),
        pytest.param(lambda: token("alice", aud=None), id="no-audience"),
        pytest.param(lambda: token("alice", secret="another-secret-" + "y" * 32), id="wrong-key"),
        pytest.param(
            lambda: jwt.encode(
                {"sub": "alice", "aud": AUDIENCE, "exp": int(time.time()) + 600},
                JWT_SECRET,
                algorithm="HS512",
            ),
            id="wrong-algorithm",
        ),
        pytest.param(
            lambda: jwt.encode(
                {"sub": "alice", "aud": AUDIENCE, "exp": int(time.time()) + 600}, None, algorithm="none"
            ),
            id="alg-none",
        ),
        pytest.param(
            lambda: jwt.encode({"sub": "alice", "aud": AUDIENCE}, JWT_SECRET, algorithm="HS256"), id="no-exp"
        ),
        pytest.param(
            lambda: jwt.encode(
                {"aud": AUDIENCE, "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256"
            ),
            id="no-sub",
        ),
        pytest.param(lambda: "not.a.jwt", id="garbage"),
    ],
)
def test_bad_tokens_are_401(base: str, db: Conn, bad: Any) -> None:
    r = httpx.get(f"{base}/v1/notifications/unread-count", headers={"Authorization": f"Bearer {bad()}"})
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/problem+json"


def test_user_a_cannot_read_mark_or_archive_bs_notification(base: str, db: Conn, user: str) -> None:
    (theirs,) = add_notifications(db, "bob-" + user, 1)
    before = row(db, theirs)
    with client(base, user) as a:
        for path in (f"/v1/notifications/{theirs}/read", f"/v1/notifications/{theirs}/archive"):
            r = a.post(path)
            assert r.status_code == 404, r.text
            assert r.json()["detail"] == "no such notification"
        # the same answer as an id that exists nowhere: nothing tells them apart
        assert (
            a.post(f"/v1/notifications/{uuid.uuid4()}/read").json()
            == a.post(f"/v1/notifications/{theirs}/read").json()
        )
        assert a.get("/v1/notifications").json()["items"] == []
        assert a.post("/v1/notifications/read-all").json() == {"marked": 0}
    assert row(db, theirs) == before


def test_rs256_with_an_identity_providers_public_key(backend: Backend, db: Conn, user: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    settings = api_settings(
        backend.bootstrap,
        backend.database_url,
        api={"jwt_public_key": pem, "audience": AUDIENCE, "issuer": "https://idp.example.com/"},
    )
    add_notifications(db, user, 2)
    claims = {"sub": user, "aud": AUDIENCE, "iss": "https://idp.example.com/", "exp": int(time.time()) + 60}
    good = jwt.encode(claims, key, algorithm="RS256")
    other_iss = jwt.encode({**claims, "iss": "https://evil.example.com/"}, key, algorithm="RS256")
    # algorithm confusion: the public key used as an HMAC secret
    confused = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    with running_api(settings) as url:

        def count(t: str) -> httpx.Response:
            return httpx.get(f"{url}/v1/notifications/unread-count", headers={"Authorization": f"Bearer {t}"})

        assert count(good).json() == {"count": 2}
        assert count(other_iss).status_code == 401
        assert count(confused).status_code == 401


# the inbox


def test_pages_are_stable_newest_first_and_skip_archived_and_hidden(base: str, db: Conn, user: str) -> None:
    ids = add_notifications(db, user, 45)
    add_notifications(db, user, 3, hidden=True, start=datetime(2031, 1, 1, tzinfo=UTC))
    add_notifications(db, user, 2, archived_at=datetime(2031, 1, 1, tzinfo=UTC))
    # rows that share a created_at are ordered by id
    tied = add_notifications(db, user, 5, same_time=True, start=datetime(2029, 1, 1, tzinfo=UTC))
    expected = [str(i) for i in reversed(ids)] + sorted((str(i) for i in tied), reverse=True)
    seen: list[str] = []
    with client(base, user) as c:
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 20}
            if cursor:
                params["cursor"] = cursor
            page = c.get("/v1/notifications", params=params).json()
            seen += [item["id"] for item in page["items"]]
            # a row inserted mid-way (newer than everything) never shifts later pages
            add_notifications(db, user, 1, start=datetime(2035, 1, 1, tzinfo=UTC))
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == expected
        first = c.get("/v1/notifications", params={"limit": 1}).json()["items"][0]
    assert set(first) == {
        "id",
        "type",
        "category",
        "severity",
        "title",
        "body",
        "summary",
        "target_url",
        "occurred_at",
        "created_at",
        "read_at",
        "archived_at",
    }
    assert first["created_at"].endswith("+00:00")


def test_unread_filter_count_read_and_archive(base: str, db: Conn, user: str) -> None:
    ids = add_notifications(db, user, 6)
    with client(base, user) as c:
        assert c.get("/v1/notifications/unread-count").json() == {"count": 6}
        r1 = c.post(f"/v1/notifications/{ids[0]}/read")
        assert r1.status_code == 200 and r1.json()["read_at"] is not None
        # idempotent: the first read_at stays
        r2 = c.post(f"/v1/notifications/{ids[0]}/read")
        assert r2.json() == r1.json()
        assert c.get("/v1/notifications/unread-count").json() == {"count": 5}
        unread = [i["id"] for i in c.get("/v1/notifications", params={"unread": "1"}).json()["items"]]
        assert str(ids[0]) not in unread and len(unread) == 5
        a1 = c.post(f"/v1/notifications/{ids[1]}/archive")
        assert a1.status_code == 200 and a1.json()["archived_at"] is not None
        assert c.post(f"/v1/notifications/{ids[1]}/archive").json() == a1.json()
        assert c.get("/v1/notifications/unread-count").json() == {"count": 4}
        listed = [i["id"] for i in c.get("/v1/notifications").json()["items"]]
        assert str(ids[1]) not in listed and len(listed) == 5


def test_read_all_never_marks_what_arrived_after_the_view(base: str, db: Conn, user: str) -> None:
    old = add_notifications(db, user, 3, start=datetime(2020, 1, 1, tzinfo=UTC))
    with client(base, user) as c:
        view = c.get("/v1/notifications").json()["items"]
        newest_seen = view[0]["created_at"]
        add_notifications(db, user, 2, start=datetime(2020, 6, 1, tzinfo=UTC))  # arrives meanwhile
        r = c.post("/v1/notifications/read-all", json={"before": newest_seen})
        assert r.json() == {"marked": 3}
        assert c.post("/v1/notifications/read-all", json={"before": newest_seen}).json() == {"marked": 0}
        assert c.get("/v1/notifications/unread-count").json() == {"count": 2}
        assert c.post("/v1/notifications/read-all").json() == {"marked": 2}  # no body: up to now
        assert c.get("/v1/notifications/unread-count").json() == {"count": 0}
    assert all(row(db, i)[1] is not None for i in old)


def test_hidden_rows_are_not_found(base: str, db: Conn, user: str) -> None:
    (hidden,) = add_notifications(db, user, 1, hidden=True)
    with client(base, user) as c:
        assert c.post(f"/v1/notifications/{hidden}/read").status_code == 404
        assert c.get("/v1/notifications/unread-count").json() == {"count": 0}


# bad input


@pytest.mark.parametrize(
    ("method", "path", "kw", "status", "detail"),
    [
        ("POST", "/v1/notifications/not-a-uuid/read", {}, 400, "id:"),
        ("POST", "/v1/notifications/123/archive", {}, 400, "id:"),
        ("GET", "/v1/notifications", {"params": {"cursor": "garbage!"}}, 400, "cursor:"),
        ("GET", "/v1/notifications", {"params": {"cursor": "MTIzOmFiYw"}}, 400, "cursor:"),
        ("GET", "/v1/notifications", {"params": {"limit": "0"}}, 400, "limit:"),
        ("GET", "/v1/notifications", {"params": {"limit": "101"}}, 400, "limit:"),
        ("GET", "/v1/notifications", {"params": {"limit": "ten"}}, 400, "limit:"),
        ("GET", "/v1/notifications", {"params": {"unread": "yes"}}, 400, "unread:"),
        (
            "PUT",
            "/v1/preferences",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "JSON",
        ),
        (
            "PUT",
            "/v1/preferences",
            {"content": b"[" * 30_000, "headers": {"content-type": "application/json"}},
            400,
            "nested too deeply",
        ),
        (
            "PUT",
            "/v1/preferences",
            {"content": b"{}", "headers": {"content-type": "text/plain"}},
            415,
            "application/json",
        ),
        ("PUT", "/v1/preferences", {"json": {"channels": {"email": "yes"}}}, 422, "channels.email"),
        ("PUT", "/v1/preferences", {"json": {"channels": {"fax": True}}}, 422, "channels.fax"),
        ("PUT", "/v1/preferences", {"json": {"digest_minutes": -1}}, 422, "digest_minutes"),
        ("PUT", "/v1/preferences", {"json": {"user_id": "bob"}}, 422, "user_id"),
        ("PUT", "/v1/preferences", {"json": [1, 2]}, 422, "body"),
        ("POST", "/v1/notifications/read-all", {"json": {"before": "yesterday"}}, 422, "before"),
        ("POST", "/v1/notifications/read-all", {"json": {"before": "2030-01-01T00:00:00"}}, 422, "before"),
        (
            "PUT",
            "/v1/preferences",
            {"json": {"categories": {"x" * 101: {"email": False}}}},
            422,
            "categories",
        ),
        (
            "PUT",
            "/v1/preferences",
            {"content": b'{"a":"' + b"x" * 70_000 + b'"}', "headers": {"content-type": "application/json"}},
            413,
            "at most",
        ),
    ],
)
def test_bad_input_gets_a_precise_4xx(
    base: str, db: Conn, user: str, method: str, path: str, kw: dict[str, Any], status: int, detail: str
) -> None:
    with client(base, user) as c:
        r = c.request(method, path, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert detail in r.json()["detail"]


def test_unknown_routes_and_methods_are_problems_too(base: str) -> None:
    r = httpx.get(f"{base}/v2/nothing")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    r = httpx.delete(f"{base}/v1/preferences", headers=bearer("x"))
    assert r.status_code == 405 and r.headers["content-type"] == "application/problem+json"


def test_openapi_and_healthz(base: str) -> None:
    spec = httpx.get(f"{base}/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    assert {"/v1/notifications", "/v1/preferences", "/v1/unsubscribe"} <= set(spec["paths"])
    assert httpx.get(f"{base}/healthz").text == "ok\n"


# preferences and unsubscribe


def test_preferences_roundtrip_and_mandatory_categories(base: str, db: Conn, user: str) -> None:
    with client(base, user) as c:
        got = c.get("/v1/preferences").json()
        assert got == {
            "channels": {"in_app": True, "email": False, "push": False, "webhook": False},
            "categories": {},
            "digest_minutes": 5,
            "mandatory_categories": ["security"],
        }
        put = c.put(
            "/v1/preferences",
            json={
                "channels": {"email": True},
                "categories": {"billing": {"email": False}},
                "digest_minutes": 10,
            },
        )
        assert put.status_code == 200, put.text
        assert put.json()["channels"]["email"] is True
        assert put.json()["categories"] == {"billing": {"email": False}}
        assert c.get("/v1/preferences").json() == put.json()
        # idempotent
        again = c.put(
            "/v1/preferences",
            json={
                "channels": {"email": True},
                "categories": {"billing": {"email": False}},
                "digest_minutes": 10,
            },
        )
        assert again.json() == put.json()
        refused = c.put("/v1/preferences", json={"categories": {"security": {"email": False}}})
        assert refused.status_code == 422 and "security" in refused.json()["detail"]
        assert c.get("/v1/preferences").json() == put.json()


def test_unsubscribe_turns_the_channel_off_and_forgeries_do_not(base: str, db: Conn, user: str) -> None:
    with client(base, user) as c:
        c.put("/v1/preferences", json={"channels": {"email": True, "push": True}})
    good = make_token(UNSUBSCRIBE_SECRET, user, "email")
    forged = make_token("someone-elses-secret-0123456789", user, "push")
    prefix, user_part, _, mac = good.split(".")
    altered = ".".join([prefix, user_part, "push", mac])  # same signature, other channel
    other_user = make_token(UNSUBSCRIBE_SECRET, "mallory", "push")
    spliced = ".".join([prefix, other_user.split(".")[1], "push", mac])
    for bad in (forged, altered, spliced, good[:-2], good + "A", "v1..email."):
        r = httpx.post(
            f"{base}/v1/unsubscribe", params={"token": bad}, data={"List-Unsubscribe": "One-Click"}
        )
        assert r.status_code in (400, 403), (bad, r.text)
    with client(base, user) as c:
        assert c.get("/v1/preferences").json()["channels"] == {
            "in_app": True,
            "email": True,
            "push": True,
            "webhook": False,
        }
    r = httpx.post(f"{base}/v1/unsubscribe", params={"token": good}, data={"List-Unsubscribe": "One-Click"})
    assert r.status_code == 200 and r.json() == {"channel": "email", "unsubscribed": True}
    assert httpx.post(f"{base}/v1/unsubscribe", params={"token": good}).status_code == 200  # idempotent
    with client(base, user) as c:
        assert c.get("/v1/preferences").json()["channels"] == {
            "in_app": True,
            "email": False,
            "push": True,
            "webhook": False,
        }


def test_expired_leeway_is_honoured_after_caching(base: str, db: Conn, user: str) -> None:
    t = token(user, ttl=0)  # expired, but within the test server's 2 s leeway
    h = {"Authorization": f"Bearer {t}"}
    assert httpx.get(f"{base}/v1/notifications/unread-count", headers=h).status_code == 200
    time.sleep(2.5)  # now past exp + leeway: the cached verdict must not outlive it
    assert httpx.get(f"{base}/v1/notifications/unread-count", headers=h).status_code == 401


def test_timestamps_are_utc(base: str, db: Conn, user: str) -> None:
    add_notifications(db, user, 1, start=datetime(2030, 1, 1, 12, tzinfo=UTC) + timedelta(microseconds=7))
    with client(base, user) as c:
        item = c.get("/v1/notifications").json()["items"][0]
    assert datetime.fromisoformat(item["created_at"]) == datetime(2030, 1, 1, 12, 0, 0, 7, tzinfo=UTC)


def test_pages_and_counts_are_served_by_the_0004_indexes(db: Conn, user: str) -> None:
    """The keyset condition is an index range (not a filter), the count an index-only scan."""
    add_notifications(db, user, 50)
    db.execute("ANALYZE notifications")
    with db.transaction():
        db.execute("SET LOCAL enable_seqscan = off")
        db.execute("SET LOCAL enable_bitmapscan = off")
        from storage.inbox import _PAGE_SQL, _UNREAD_COUNT_SQL

        now = datetime.now(UTC)
        for unread in (False, True):
            sql = b"EXPLAIN " + _PAGE_SQL[(unread, True)]
            plan = "\n".join(r[0] for r in db.execute(sql, (user, now, uuid.uuid4(), 31)).fetchall())
            index = "notifications_unread_page" if unread else "notifications_inbox_page"
            assert f"Index Scan using {index}" in plan, plan
            assert "Index Cond: ((user_id = " in plan and "ROW(created_at, id) < ROW(" in plan, plan
            assert "Sort" not in plan, plan
        plan = "\n".join(r[0] for r in db.execute(b"EXPLAIN " + _UNREAD_COUNT_SQL, (user,)).fetchall())
        assert "Index Only Scan using notifications_unread_page" in plan, plan


def test_read_all_with_a_future_before_stops_at_now(base: str, db: Conn, user: str) -> None:
    add_notifications(db, user, 2, start=datetime(2020, 1, 1, tzinfo=UTC))
    future = add_notifications(db, user, 1, start=datetime.now(UTC) + timedelta(hours=1))
    with client(base, user) as c:
        r = c.post("/v1/notifications/read-all", json={"before": "2099-01-01T00:00:00Z"})
        assert r.json() == {"marked": 2}
    assert row(db, future[0])[1] is None
