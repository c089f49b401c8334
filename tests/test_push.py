"""The Web Push channel end to end, against a push service on loopback that decrypts each
message with the subscription's private key and verifies the VAPID JWT (tests/push_peer.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from channels.push import generate_keys
from config.settings import Settings
from consumers.dlq import decode_headers
from tests.conftest import Backend
from tests.helpers import make_settings
from tests.push_peer import PushPeer
from tests.test_deliver import (
    critical,
    deliver_until_final,
    dlq,
    final,
    rows,
    send_events,
    start_deliver,
    wait_until,
    wants,
)

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]
PRIVATE, PUBLIC = generate_keys()


@pytest.fixture
def push() -> Iterator[PushPeer]:
    p = PushPeer()
    yield p
    p.close()


def push_settings(backend: Backend, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "delivery": {"retry_tiers": ["1s", "2s"], "max_attempts": 3, "lease_s": 10},
        "push": {
            "vapid_private_key": PRIVATE,
            "vapid_subject": "mailto:ops@example.com",
            "allow_private_targets": True,
            "timeout_s": 2.0,
        },
        "policy": {"rate_limits": {"push": 100_000}},
        "app_url": "https://app.example.com/",
    }
    values.update(overrides)
    return make_settings(backend.bootstrap, backend.database_url, **values)


def subscribed(db: Conn, settings: Settings, user: str, *subscriptions: str) -> list[int]:
    return wants(db, settings, user, "push", subscriptions)


def test_push_is_encrypted_for_the_subscription_and_signed_with_vapid(
    db: Conn, backend: Backend, push: PushPeer
) -> None:
    s = push_settings(backend)
    subscribed(db, s, "alice", push.subscription("ok"), push.subscription("ok"))
    send_events(
        s,
        critical(
            "alice",
            title="Payment failed for 4242 4242 4242 4242",
            body="full body with secret-body-text",
            summary="declined; mail bob@example.com",
            data={"secret": "secret-data-value"},
            target_url="/invoices/42",
        ),
    )
    deliver_until_final(s, db, "alice", channel="push")
    (row,) = rows(db, "alice", "push")
    assert (row["status"], row["attempts"]) == ("sent", 1)
    got = push.at("/ok/")
    assert len(got) == 2, "one message per subscription of the user"
    for r in got:
        assert r.problem is None, r.problem
        assert r.answered == 201
        assert r.payload is not None and r.claims is not None
        assert set(r.payload) == {"type", "id", "notification_id", "title", "summary", "url", "severity"}
        assert r.payload["id"] == str(row["id"]) and r.payload["url"] == "https://app.example.com/invoices/42"
        assert r.claims["aud"] == push.origin and r.claims["sub"] == "mailto:ops@example.com"
        assert r.claims["exp"] > time.time() + 3600
        assert f"k={PUBLIC}" in r.headers["authorization"], "the VAPID public key the app subscribed with"
        assert r.headers["urgency"] == "high" and int(r.headers["ttl"]) > 0
        text = str(r.payload)
        for leaked in ("secret-body-text", "secret-data-value", "4242 4242 4242 4242", "bob@example.com"):
            assert leaked not in text, f"{leaked!r} left the system"
        assert b"Payment failed" not in r.body, "the body on the wire is ciphertext"
    assert len({r.body for r in got}) == 2, "each subscription gets its own encryption"


def test_410_and_404_disable_the_subscription_and_the_other_one_still_gets_it(
    db: Conn, backend: Backend, push: PushPeer
) -> None:
    s = push_settings(backend)
    live, gone, expired = subscribed(
        db, s, "bob", push.subscription("ok"), push.subscription("gone"), push.subscription("expired")
    )
    (alone,) = subscribed(db, s, "cy", push.subscription("gone"))
    send_events(s, critical("bob"), critical("cy"))
    runner = start_deliver(s, channel="push")
    try:
        wait_until(final(db, "bob", 1, "push"))
        wait_until(final(db, "cy", 1, "push"))
        send_events(s, critical("bob"))
        wait_until(final(db, "bob", 2, "push"))
    finally:
        runner.stop()
    disabled = dict(
        db.execute(
            "SELECT id, disabled_at IS NOT NULL FROM channel_endpoints WHERE id = ANY(%s)",
            ([live, gone, expired, alone],),
        ).fetchall()
    )
    assert disabled == {live: False, gone: True, expired: True, alone: True}
    assert [r["status"] for r in rows(db, "bob", "push")] == ["sent", "sent"]
    assert len(push.at("/ok/")) == 2 and len(push.at("/gone/")) == 2 and len(push.at("/expired/")) == 1
    (cy,) = rows(db, "cy", "push")
    assert (cy["status"], cy["status_reason"]) == ("failed", "endpoint_gone")
    assert [decode_headers(r.headers)["herald-dlt-reason"] for r in dlq(s, "push")] == ["endpoint_gone"]


def test_429_with_retry_after_is_retried_on_time(db: Conn, backend: Backend, push: PushPeer) -> None:
    # Tiers of 1 s: the 429's Retry-After of 2 s picks the 2 s tier, not the first.
    s = push_settings(backend, delivery={"retry_tiers": ["1s", "2s", "4s"], "max_attempts": 3, "lease_s": 10})
    subscribed(db, s, "dee", push.subscription("busy"))
    send_events(s, critical("dee"))
    deliver_until_final(s, db, "dee", channel="push")
    (row,) = rows(db, "dee", "push")
    assert (row["status"], row["attempts"]) == ("sent", 2)
    first, second = push.at("/busy/")
    assert (first.answered, second.answered) == (429, 201)
    waited = second.at - first.at
    assert 2.0 <= waited < 6.0, f"retried {waited:.2f}s after a Retry-After of 2 s"


def test_push_refuses_plain_http_and_private_targets_unless_allowed(
    db: Conn, backend: Backend, push: PushPeer
) -> None:
    s = push_settings(
        backend,
        push={"vapid_private_key": PRIVATE, "vapid_subject": "mailto:ops@example.com", "timeout_s": 2.0},
    )
    subscribed(db, s, "eve", push.subscription("ok"))
    send_events(s, critical("eve"))
    deliver_until_final(s, db, "eve", channel="push")
    (row,) = rows(db, "eve", "push")
    assert (row["status"], row["status_reason"]) == ("failed", "permanent")
    assert "HERALD_PUSH__ALLOW_PRIVATE_TARGETS" in row["last_error"]
    assert push.at("/") == [], "nothing reached a loopback push service"
