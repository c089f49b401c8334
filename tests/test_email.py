"""The email channel end to end: events in, SMTP out, every outcome recorded.

Real parts only: the session's broker and PostgreSQL, the real ingest, ``herald deliver
--channel email`` on the shared deliverer, and aiosmtpd on loopback. Each received message
is parsed from the bytes the server took (headers, both parts). Timers are short.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from config.settings import Settings
from consumers.dlq import decode_headers
from core.unsubscribe import read_token
from tests.conftest import Backend
from tests.helpers import make_settings
from tests.smtp_peer import SmtpPeer
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
UNSUBSCRIBE_SECRET = "test-unsubscribe-secret-0123456789"


@pytest.fixture
def smtp() -> Iterator[SmtpPeer]:
    p = SmtpPeer()
    yield p
    p.close()


def email_settings(backend: Backend, smtp: SmtpPeer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "delivery": {"retry_tiers": ["1s", "2s"], "max_attempts": 3, "lease_s": 10},
        "smtp": smtp.smtp_settings(timeout_s=2.0, pool_size=4),
        "policy": {"rate_limits": {"email": 100_000}},
        "app_url": "https://app.example.com/",
        "public_url": "https://herald.example.com",
        "unsubscribe_secret": UNSUBSCRIBE_SECRET,
    }
    values.update(overrides)
    return make_settings(backend.bootstrap, backend.database_url, **values)


def mailbox(db: Conn, settings: Settings, user: str, *addresses: str) -> list[int]:
    """A user who wants email, at these addresses."""
    return wants(db, settings, user, "email", addresses)


def test_an_email_arrives_with_both_parts_escaped_headers_and_a_working_unsubscribe(
    db: Conn, backend: Backend, smtp: SmtpPeer
) -> None:
    s = email_settings(backend, smtp)
    mailbox(db, s, "alice", "ok@example.org")
    send_events(
        s,
        critical(
            "alice",
            title="<script>alert('x')</script> Payment failed for 4242 4242 4242 4242",
            body="full body with secret-body-text",
            summary="Card 4111111111111111 declined & retried; mail bob@example.com",
            data={"secret": "secret-data-value"},
            target_url="/invoices/42?tab=a&b=c",
        ),
    )
    deliver_until_final(s, db, "alice", channel="email")

    (row,) = rows(db, "alice", "email")
    assert (row["status"], row["attempts"]) == ("sent", 1)
    (got,) = smtp.received
    msg = got.message
    assert got.recipients == ["ok@example.org"] and got.sender == "herald@example.com"
    assert msg["Message-ID"] == f"<{row['id']}@example.com>" == row["provider_message_id"]
    assert msg["From"] == "herald <herald@example.com>" and msg["To"] == "ok@example.org"
    assert msg["Subject"].startswith("<script>alert('x')</script> Payment failed for")
    assert msg.get_content_type() == "multipart/alternative"
    text, markup = got.part("plain"), got.part("html")
    assert "<script>" in text, "the text part is plain text"
    assert "<script>" not in markup and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in markup
    assert "https://app.example.com/invoices/42?tab=a&b=c" in text
    assert 'href="https://app.example.com/invoices/42?tab=a&amp;b=c"' in markup
    assert "declined &amp; retried" in markup

    # RFC 8058 one-click unsubscribe, with a token the API will accept for this user and channel.
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = str(msg["List-Unsubscribe"])
    assert link.startswith("<https://herald.example.com/v1/unsubscribe?token=") and link.endswith(">")
    token = parse_qs(urlsplit(link[1:-1]).query)["token"][0]
    assert read_token(UNSUBSCRIBE_SECRET, token) == ("alice", "email")
    assert link[1:-1] in text

    raw = got.raw.decode("utf-8", "replace") + text + markup
    for leaked in ("secret-body-text", "secret-data-value", "4242 4242 4242 4242", "4111111111111111"):
        assert leaked not in raw, f"{leaked!r} left the system"
    assert "bob@example.com" not in text + markup
    assert len(smtp.ids()) == 1


def test_421_then_accept_is_delivered_once_and_550_is_dead_lettered(
    db: Conn, backend: Backend, smtp: SmtpPeer
) -> None:
    s = email_settings(backend, smtp)
    mailbox(db, s, "busy", "busy1@example.org")
    mailbox(db, s, "refused", "refuse@example.org")
    send_events(s, critical("busy"), critical("refused"))
    runner = start_deliver(s, channel="email")
    try:
        wait_until(final(db, "busy", 1, "email"), what="the 421 retried")
        wait_until(final(db, "refused", 1, "email"), what="the 550 final")
    finally:
        runner.stop()
    (busy,) = rows(db, "busy", "email")
    assert (busy["status"], busy["attempts"]) == ("sent", 2)
    assert smtp.handler.tries[f"<{busy['id']}@example.com>"] == 2, "421 once, then accepted"
    assert smtp.ids()[f"<{busy['id']}@example.com>"] == 1, "delivered exactly once"
    (refused,) = rows(db, "refused", "email")
    assert (refused["status"], refused["status_reason"], refused["attempts"]) == ("failed", "permanent", 1)
    assert "550" in refused["last_error"]
    (dead,) = dlq(s, "email")
    assert decode_headers(dead.headers)["herald-dlt-reason"] == "permanent"
    assert json.loads(dead.value or b"")["delivery_id"] == str(refused["id"])


def test_server_down_20s_then_up_every_email_arrives_exactly_once(
    db: Conn, backend: Backend, smtp: SmtpPeer
) -> None:
    s = email_settings(
        backend,
        smtp,
        delivery={"retry_tiers": ["1s", "2s", "4s"], "max_attempts": 12, "lease_s": 5, "concurrency": 4},
        breaker={"min_attempts": 5, "failure_ratio": 0.7, "window_s": 60, "cooldown_s": 2},
    )
    mailbox(db, s, "carol", "ok@example.org")
    smtp.down()
    runner = start_deliver(s, channel="email")
    try:
        started = time.monotonic()
        send_events(s, *(critical("carol", title=f"first {i}") for i in range(15)))
        time.sleep(8)
        send_events(s, *(critical("carol", title=f"second {i}") for i in range(15)))
        time.sleep(max(0.0, 20 - (time.monotonic() - started)))
        smtp.up()
        wait_until(
            lambda: Counter(r["status"] for r in rows(db, "carol", "email")) == Counter({"sent": 30}),
            timeout=45,
            what="all 30 sent after the outage",
        )
    finally:
        runner.stop()
    ids = smtp.ids()
    assert len(ids) == 30 and set(ids.values()) == {1}, "every email arrives exactly once (by Message-ID)"
    assert dlq(s, "email") == []


def test_email_deliverer_refuses_to_start_without_a_relay(backend: Backend) -> None:
    from core.errors import ConfigError
    from herald.processes import run_deliver

    s = make_settings(backend.bootstrap, backend.database_url)
    with pytest.raises(ConfigError, match="HERALD_SMTP__HOST"):
        run_deliver(s, "email")
