"""The API's endpoints routes: a browser registers its push subscription (and a user an
email address) with its bearer token, and the push deliverer then reaches that browser."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from tests.api_support import api_settings, client, running_api
from tests.push_peer import PushPeer
from tests.test_deliver import critical, deliver_until_final, rows, send_events
from tests.test_push import push_settings

if TYPE_CHECKING:
    from tests.conftest import Backend

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]


@pytest.fixture(scope="module")
def base(backend: Backend) -> Iterator[str]:
    settings = api_settings(backend.bootstrap, backend.database_url)
    allow = settings.push.model_copy(update={"allow_private_targets": True})
    with running_api(settings.model_copy(update={"push": allow})) as url:
        yield url


@pytest.fixture
def push() -> Iterator[PushPeer]:
    p = PushPeer()
    yield p
    p.close()


def test_a_browser_registers_its_subscription_and_gets_pushes(
    db: Conn, backend: Backend, base: str, push: PushPeer
) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"
    sub = json.loads(push.subscription("ok")) | {"expirationTime": None}
    with client(base, user) as c:
        added = c.post("/v1/endpoints", json={"channel": "push", "subscription": sub})
        assert added.status_code == 201, added.text
        again = c.post("/v1/endpoints", json={"channel": "push", "subscription": sub})
        assert again.json()["id"] == added.json()["id"], "the same subscription twice is one"
        mail = c.post("/v1/endpoints", json={"channel": "email", "address": "me@example.org"})
        assert mail.status_code == 201
        listed = c.get("/v1/endpoints").json()["items"]
        assert [e["channel"] for e in listed] == ["push", "email"]
        assert listed[0]["subscription"] == {"endpoint": sub["endpoint"], "keys": sub["keys"]}
        assert c.put("/v1/preferences", json={"channels": {"push": True}}).status_code == 200
    s = push_settings(backend)
    send_events(s, critical(user, title="Deploy failed"))
    deliver_until_final(s, db, user, channel="push")
    (row,) = rows(db, user, "push")
    assert row["status"] == "sent"
    (got,) = push.at("/ok/")
    assert got.problem is None and got.payload is not None and got.payload["title"] == "Deploy failed"

    with client(base, user) as c:
        assert c.delete(f"/v1/endpoints/{added.json()['id']}").status_code == 204
        assert c.delete(f"/v1/endpoints/{added.json()['id']}").status_code == 404
        assert [e["channel"] for e in c.get("/v1/endpoints").json()["items"]] == ["email"]
    with client(base, f"other-{user}") as other:
        assert other.delete(f"/v1/endpoints/{mail.json()['id']}").status_code == 404, "only the owner's"
        assert other.get("/v1/endpoints").json() == {"items": []}


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"channel": "push"}, "subscription: required"),
        ({"channel": "push", "subscription": {"endpoint": "https://p.example/1", "keys": {}}}, "keys.auth"),
        (
            {
                "channel": "push",
                "subscription": {"endpoint": "ftp://x", "keys": {"p256dh": "B", "auth": "A"}},
            },
            "https",
        ),
        ({"channel": "email", "address": "not an address"}, "not an email address"),
        ({"channel": "webhook", "address": "https://x.example"}, "channel"),
        ({"channel": "email", "address": "a@b.example", "extra": 1}, "extra"),
    ],
)
def test_bad_endpoints_are_422_naming_the_field(base: str, body: dict[str, Any], detail: str) -> None:
    with client(base, f"u-{uuid.uuid4().hex[:10]}") as c:
        r = c.post("/v1/endpoints", json=body)
        assert r.status_code == 422, r.text
        assert detail in r.json()["detail"]
        assert c.get("/v1/endpoints").json() == {"items": []}
